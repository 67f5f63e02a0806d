"""Pipeline stages of unequal depth (runtime/stages.py): 5 and 6 layers at PP=2, every result against PP=1.

Models (random Llamas, hidden 64, 8 heads in 4 groups): A and B with 5 layers (B = A moved a little, to merge),
C with 6 layers. At PP=2 the automatic split is [3, 2] for 5 layers, [3, 3] for 6, and [4, 2] for 6 with VPP=2;
the override --decoder-first-pipeline-num-layers 1 gives [1, 4]. Three spawns (1 rank, 2 ranks, 1 rank) that
the tests share: the PP=1 references, the PP=2 (and TP=2) runs, then every written checkpoint read at TP=1 PP=1.
Tolerances (float32 on CPU): logits 1e-4 (as test_conversion), scores and losses 1e-5 relative.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_hf_model, write_token_dataset
from distributed_utils import run_ranks
from test_conversion import TOL, hf_logits, megatron_logits, sample_tokens


# ---- (f) the split rule, against hand-written expectations ---------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    ((26, 4), [6, 7, 7, 6]),  # 7 is the smallest largest stage; full middle stages, equal ends
    ((25, 2), [13, 12]),  # the last stage (output layer + loss) gets the fewer
    ((5, 4), [2, 1, 1, 1]),
    ((30, 4), [7, 8, 8, 7]),
    ((32, 4), [8, 8, 8, 8]),  # divisible: the even split, as megatron's default
    ((9, 4), [2, 3, 3, 1]),
    ((10, 3), [3, 4, 3]),
    ((7, 1), [7]),
    ((6, 2, None, None, 2), [4, 2]),  # VPP=2: every stage a multiple of 2
    ((26, 4, None, None, 2), [6, 8, 8, 4]),
    ((26, 4, 5), [5, 7, 7, 7]),  # Megatron-LM's rule: the other stages split the rest evenly
    ((26, 4, None, 5), [7, 7, 7, 5]),
    ((26, 4, 5, 5), [5, 8, 8, 5]),
    ((25, 2, 20), [20, 5]),
    ((7, 2, 3, 4), [3, 4]),
])
def test_stage_layers(args, expected):
    from megatron_prune.runtime.stages import stage_layers

    assert stage_layers(*args) == expected


@pytest.mark.parametrize("args,match", [
    ((4, 5), "PP=5 is more than the 4 layers"),
    ((26, 4, 4), r"leaves 22 of the 26 layers for the other 3 .* that fit: 2, 5, 8"),
    ((26, 4, 3, 2), "leaves 21 of the 26 layers for the other 2"),
    ((7, 2, 3, 3), "give two numbers that sum to 7"),
    ((5, 1, 2), "needs --pp >= 2"),
    ((26, 4, 0), "must be at least 1"),
    ((26, 4, 23), "leaves 3 of the 26 layers for the other 3"),  # 1 each: fits; 24 leaves 2 for 3: does not
    ((5, 2, None, None, 2), "cannot be split over PP=2 stages of multiples of VPP=2"),
    ((26, 4, 5, None, 2), r"\[5, 7, 7, 7\].*multiple of 2"),
])
def test_impossible_splits(args, match):
    from megatron_prune.runtime.stages import StageError, stage_layers

    if args == (26, 4, 23):  # the boundary: [23, 1, 1, 1] is fine, 24 is not
        assert stage_layers(*args) == [23, 1, 1, 1]
        args, match = (26, 4, 24), "leaves 2 of the 26 layers for the other 3"
    with pytest.raises(StageError, match=match):
        stage_layers(*args)


def test_megatron_config_of_a_split():
    """The split reaches megatron's TransformerConfig, whose own layer counts agree with ours."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_prune.arch import ModelArch
    from megatron_prune.runtime.stages import megatron_kwargs, stage_layers

    arch = ModelArch(num_layers=26, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                     vocab_size=1000)
    for pp, vpp in ((4, None), (2, None), (4, 2), (2, 2), (3, None)):
        split = stage_layers(26, pp, vpp=vpp or 1)
        cfg = arch.to_transformer_config(pp=pp, virtual_pipeline_model_parallel_size=vpp, **megatron_kwargs(split))
        for rank in range(pp):
            chunks = range(vpp or 1)
            built = sum(get_num_layers_to_build(cfg, vp_stage=v if vpp else None, pp_rank=rank) for v in chunks)
            assert built == split[rank], (pp, vpp, rank)
            if not vpp:
                assert get_transformer_layer_offset(cfg, pp_rank=rank) == sum(split[:rank])
        if vpp:  # every layer in exactly one chunk of one rank
            owned = sorted(get_transformer_layer_offset(cfg, vp_stage=v, pp_rank=r) + i for r in range(pp)
                           for v in range(vpp) for i in range(get_num_layers_to_build(cfg, vp_stage=v, pp_rank=r)))
            assert owned == list(range(26)), (pp, vpp)


def test_memory_planner_follows_the_split():
    """Per-stage parameters of the planner: 26 layers at PP=4 sum to the PP=1 count, and the stages hold
    [6, 7, 7, 6] layers (the deeper middle stages are counted, not ceil(26 / 4) everywhere)."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.runtime.memory import Layout, stage_param_count

    arch = ModelArch(num_layers=26, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                     vocab_size=1000)
    per_stage = [stage_param_count(arch, 1, 4, s) for s in range(4)]
    assert sum(per_stage) == stage_param_count(arch, 1, 1, 0)
    assert per_stage[1] == per_stage[2] == 7 * arch.layer_param_count()
    assert per_stage[0] - 6 * arch.layer_param_count() == arch.padded_vocab_size * 64  # + the embedding
    Layout(pp=4, vpp=2, num_microbatches=8).check(arch)  # [6, 8, 8, 4]
    with pytest.raises(ValueError, match="stages of multiples of VPP=4"):
        Layout(pp=4, vpp=4, num_microbatches=8).check(arch)


# ---- the models and the three spawns ---------------------------------------------------------------------------
def _plan_6_to_5(arch: dict, seed: int = 0) -> dict:
    """6 -> 5 layers (layer 1 dropped: kept layers 3 and 4 move from stage 1 to stage 0 of [3, 2]), and every
    width axis pruned: hidden 64->48, FFN 96->64, groups 4->2, heads 8->2."""
    rng = random.Random(seed)
    kept = [0, 2, 3, 4, 5]
    groups = [sorted(rng.sample(range(4), 2)) for _ in kept]
    return {"source_arch": arch,
            "target_arch": dict(arch, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=2,
                                num_layers=5),
            "kept_layers": kept, "kept_hidden": sorted(rng.sample(range(64), 48)),
            "kept_ffn": [sorted(rng.sample(range(96), 64)) for _ in kept], "kept_groups": groups,
            "kept_heads": [[[rng.randrange(2)] for _ in g] for g in groups]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("uneven")
    make_hf_model(root / "hf_a", num_hidden_layers=5)
    make_hf_model(root / "hf_c", num_hidden_layers=6)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf_a", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.std().clamp(min=0.1))
    model.save_pretrained(root / "hf_b", safe_serialization=True)
    write_token_dataset(root / "data", num_docs=30, doc_len=50, vocab=1000)
    (root / "prompts.jsonl").write_text('{"tokens": [5, 17, 300, 42]}\n{"tokens": [7, 7, 900]}\n')
    return root


def _train_cfg(root, out, student, teacher=None, pp=1, vpp=1):
    from megatron_prune.training.config import TrainConfig

    return TrainConfig(teacher=teacher and str(teacher), student=str(student), data=[str(root / "data")], out=str(out),
                       pp=pp, vpp=vpp, seq_len=16, micro_batch_size=1, global_batch_size=4, steps=1, optimizer="sgd",
                       lr=1.0, min_lr=1.0, warmup_steps=0, weight_decay=0.0, clip_grad=1e9, ce_weight=0.5,
                       save_every=1, dataset_cache=str(root / "cache"))


def _train(cfg) -> dict:
    from megatron_prune.training.trainer import Trainer

    return Trainer(cfg).run()[-1]


def _scores(ckpt, pp, tokens):
    """Importance scores (every width and depth metric, and the LM-loss drop of blocks of 1 and 2 layers)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.importance.compute import compute_importance
    from megatron_prune.importance.depth import lm_loss_drop
    from megatron_prune.runtime import init_distributed

    init_distributed(1, pp)
    model, meta = load_model(ckpt)
    s = compute_importance(model, meta.arch, tokens[:, :-1], micro_batch_size=2, desc=None)
    base, drops = lm_loss_drop(model, meta.arch, tokens, micro_batch_size=2, block_sizes=(1, 2))
    out = {k: getattr(s, k) for k in ("mlp", "heads", "query_groups", "embedding", "block_influence", "angle_matrix")}
    out.update({f"head_{k}": v for k, v in s.head_variants.items()}, base=torch.tensor(base),
               **{f"drop{n}": d for n, d in drops.items()})
    return out


def _read_only_verbs(root, pp) -> dict:
    """eval (LM loss), generate (model A: [3, 2] at PP=2), specdec (target C [3, 3], draft A [3, 2])."""
    from megatron_prune.generation import SamplingParams
    from megatron_prune.pipelines.eval import evaluate_checkpoint
    from megatron_prune.pipelines.generate import generate_file
    from megatron_prune.pipelines.specdec import specdec

    params = SamplingParams(max_new_tokens=6)
    out = {"eval": evaluate_checkpoint(root / "a", root / "data", seq_len=16, micro_batch_size=2, max_sequences=8,
                                       pp=pp).lm_loss}
    generate_file(root / "a", root / "prompts.jsonl", root / f"gen_pp{pp}.jsonl", params, pp=pp, chat=False)
    report = specdec(root / "c", root / "a", root / "prompts.jsonl", ks=(2,), params=params, pp=pp, chat=False)
    out["specdec"] = {k: v for k, v in report["k"][2].items() if k not in ("seconds", "speedup", "tokens_per_s")}
    return out


def _pp1(root, tokens):
    from megatron_prune.pipelines.convert import hf_to_megatron, megatron_to_hf
    from megatron_prune.pipelines.merge import merge
    from megatron_prune.prune import PrunePlan
    from megatron_prune.prune.checkpoint import prune_checkpoint
    from megatron_prune.runtime import init_distributed

    for name in ("a", "b", "c"):
        hf_to_megatron(root / f"hf_{name}", root / name)
    plan = _plan_6_to_5(json.loads((root / "c" / "megatron_prune.json").read_text())["arch"])
    (root / "plan.json").write_text(json.dumps(plan))
    out = {"logits": megatron_logits(root / "a", 1, 1, tokens), "scores": _scores(root / "a", 1, tokens)}
    init_distributed(1, 1)
    prune_checkpoint(root / "c", PrunePlan.load(root / "plan.json"), root / "pruned_pp1")
    merge([root / "a", root / "b"], root / "merged_pp1", t=[0.0, 1.0])  # t by layer: follows the global index
    megatron_to_hf(root / "a", root / "export_pp1")
    out["distill"] = _train(_train_cfg(root, root / "distill_pp1", root / "a", teacher=root / "c"))
    out["train_c"] = _train(_train_cfg(root, root / "train_c_pp1", root / "c"))
    out.update(_read_only_verbs(root, 1))
    return out


def _pp2(root, tokens):
    from megatron_prune.pipelines.convert import hf_to_megatron, megatron_to_hf
    from megatron_prune.pipelines.merge import merge
    from megatron_prune.prune import PrunePlan
    from megatron_prune.prune.checkpoint import prune_checkpoint
    from megatron_prune.runtime import init_distributed
    from megatron_prune.runtime.stages import current_split, request_split

    out = {"logits": megatron_logits(root / "a", 1, 2, tokens)}  # the TP1 PP1 checkpoint at [3, 2]
    out["split"] = current_split(5)
    hf_to_megatron(root / "hf_a", root / "a_pp2", tp=1, pp=2)  # (a) import at [3, 2]
    request_split(1, None)  # --decoder-first-pipeline-num-layers 1: [1, 4]
    hf_to_megatron(root / "hf_a", root / "a_first1", tp=1, pp=2)
    out["split_first1"] = current_split(5)
    out["logits_first1"] = megatron_logits(root / "a_first1", 1, 2, tokens)
    request_split()
    out["logits_tp2"] = megatron_logits(root / "a_pp2", 2, 1, tokens)  # saved at uneven PP=2, read at TP=2
    out["scores"] = _scores(root / "a", 2, tokens)  # (b)
    init_distributed(1, 2)
    prune_checkpoint(root / "c", PrunePlan.load(root / "plan.json"), root / "pruned_pp2")  # (c) [3, 3] -> [3, 2]
    merge([root / "a", root / "b"], root / "merged_pp2", t=[0.0, 1.0], pp=2)  # (e)
    megatron_to_hf(root / "a", root / "export_pp2")
    # (d) distillation: student [3, 2], teacher [3, 3]; train at PP=2 x VPP=2 with [4, 2] (2 + 1 layers per chunk)
    out["distill"] = _train(_train_cfg(root, root / "distill_pp2", root / "a", teacher=root / "c", pp=2))
    out["train_c"] = _train(_train_cfg(root, root / "train_c_vpp", root / "c", pp=2, vpp=2))
    out.update(_read_only_verbs(root, 2))
    return out


def _read_all(root, tokens):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.runtime import init_distributed

    out = {"logits": megatron_logits(root / "a_pp2", 1, 1, tokens)}
    init_distributed(1, 1)
    for name in ("a", "c", "pruned_pp1", "pruned_pp2", "merged_pp1", "merged_pp2", "distill_pp1/step_0000001",
                 "distill_pp2/step_0000001", "train_c_pp1/step_0000001", "train_c_vpp/step_0000001"):
        model, _ = load_model(root / name)
        out[name] = {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}
    return out


@pytest.fixture(scope="module")
def runs(setup):
    tokens = sample_tokens(1000, batch=4, seq=17)
    pp1 = run_ranks(_pp1, 1, setup, tokens)[0]
    pp2 = run_ranks(_pp2, 2, setup, tokens)
    read = run_ranks(_read_all, 1, setup, tokens)[0]
    return {"tokens": tokens, "pp1": pp1, "pp2": pp2[-1], "pp2_ranks": pp2, "read": read}


def test_hf_import_at_uneven_pp2_matches_pp1_and_transformers(runs, setup):
    tokens = runs["tokens"]
    ref = hf_logits(setup / "hf_a", tokens)
    assert runs["pp2"]["split"] == [3, 2] and runs["pp2"]["split_first1"] == [1, 4]
    torch.testing.assert_close(runs["pp1"]["logits"][..., :1000], ref, rtol=TOL, atol=TOL)
    for key in ("logits", "logits_first1", "logits_tp2"):  # every rank gets them (broadcast from the last stage)
        for rank in runs["pp2_ranks"]:
            torch.testing.assert_close(rank[key], runs["pp1"]["logits"], rtol=TOL, atol=TOL, msg=key)
    torch.testing.assert_close(runs["read"]["logits"], runs["pp1"]["logits"], rtol=TOL, atol=TOL)
    w = runs["read"]  # the checkpoint saved at [3, 2] holds the same weights as the one saved at PP=1
    torch.testing.assert_close(_weights(setup, "a_pp2"), w["a"], rtol=0, atol=0)


def _weights(root, name):
    (out,) = run_ranks(_state, 1, root / name)
    return out


def _state(ckpt):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, _ = load_model(ckpt)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


def test_importance_at_uneven_pp2_equals_pp1(runs):
    ref, got = runs["pp1"]["scores"], runs["pp2"]["scores"]
    assert ref["mlp"].shape == (5, 96) and ref["drop2"].shape == (4,)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k].double(), rtol=1e-5, atol=1e-7, msg=k)


def test_prune_written_at_uneven_pp2_equals_pp1(runs):
    w = runs["read"]
    assert w["pruned_pp1"]["decoder.layers.4.mlp.linear_fc2.weight"].shape == (48, 64)
    for k, v in w["pruned_pp1"].items():
        torch.testing.assert_close(w["pruned_pp2"][k], v, rtol=0, atol=0, msg=k)


def test_distill_and_vpp_train_step_at_uneven_pp2_equal_pp1(runs):
    """One SGD step (lr 1): the losses and the weight updates of PP=2 ([3, 2] student, [3, 3] teacher) and of
    PP=2 x VPP=2 ([4, 2]) equal PP=1's."""
    w = runs["read"]
    for run, ref_ckpt, ckpt, start in (("distill", "distill_pp1", "distill_pp2", "a"),
                                       ("train_c", "train_c_pp1", "train_c_vpp", "c")):
        ref, got = runs["pp1"][run], runs["pp2"][run]
        assert ref["loss"] > 0 and (run == "train_c" or ref["kd"] > 0)
        for key in ("loss", "kd", "lm"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-5), (run, key)
        a, b = w[f"{ref_ckpt}/step_0000001"], w[f"{ckpt}/step_0000001"]
        moved = sum((a[k] - w[start][k]).abs().sum().item() for k in a)
        assert moved > 0
        for k in a:
            torch.testing.assert_close(b[k] - w[start][k], a[k] - w[start][k], rtol=1e-5, atol=1e-7, msg=f"{run} {k}")


def test_merge_and_hf_export_at_uneven_pp2(runs, setup):
    from safetensors.torch import load_file

    w = runs["read"]
    for k, v in w["merged_pp1"].items():
        torch.testing.assert_close(w["merged_pp2"][k], v, rtol=0, atol=1e-6, msg=k)
    key = "decoder.layers.{}.mlp.linear_fc2.weight"  # t by layer 0 -> 1: layer 0 is A's, layer 4 is B's
    assert not torch.equal(w["merged_pp1"][key.format(4)], w["merged_pp1"][key.format(0)])
    original = load_file(str(setup / "hf_a" / "model.safetensors"))
    for name in ("export_pp1", "export_pp2"):
        exported = {}
        for f in sorted((setup / name).glob("*.safetensors")):
            exported.update(load_file(str(f)))
        assert set(exported) == set(original), name
        for k, v in original.items():
            torch.testing.assert_close(exported[k], v, rtol=0, atol=0, msg=f"{name} {k}")


def test_eval_generate_and_specdec_at_uneven_pp2_equal_pp1(runs, setup):
    assert runs["pp2"]["eval"] == pytest.approx(runs["pp1"]["eval"], rel=1e-5)
    gen = {pp: [json.loads(line) for line in (setup / f"gen_pp{pp}.jsonl").read_text().splitlines()] for pp in (1, 2)}
    assert len(gen[1]) == 2 and all(len(r["tokens"]) == 6 for r in gen[1])
    assert [r["tokens"] for r in gen[2]] == [r["tokens"] for r in gen[1]]
    ref, got = runs["pp1"]["specdec"], runs["pp2"]["specdec"]
    assert ref["equals_target_greedy"] is True
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k


# ---- (g) the command line: the flags, checked before anything is loaded --------------------------------------
@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from test_cli_errors import make_inputs

    return make_inputs(tmp_path_factory.mktemp("uneven_cli"))


def _cli_cases(r):
    ck, data, out = str(r / "ckpt"), str(r / "tokens"), str(r / "new_out")  # ckpt: 4 layers
    first, last = "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers"
    tr = ["--student", ck, "--data", data, "--out", out, "--steps", "1"]
    return [
        (["eval", ck, "--data", data, first, "2"], [first, "needs --pp >= 2"]),
        (["eval", ck, "--data", data, "--pp", "3", first, "3"],
         ["CKPT has 4 layers", "leaves 1 of the 4 layers", f"values of {first} that fit: 2"]),
        (["eval", ck, "--data", data, "--pp", "2", first, "2", last, "3"], ["give two numbers that sum to 4"]),
        (["eval", ck, "--data", data, "--pp", "5"], ["PP=5 is more than num_layers=4"]),
        (["eval", ck, "--data", data, "--pp", "2", last, "0"], [last, "positive"]),
        (["train", *tr, "--pp", "2", "--vpp", "4"], ["--student has 4 layers", "--vpp values that fit: [2]"]),
        (["train", *tr, "--pp", "2", "--vpp", "2", first, "3"], ["[3, 1]", "multiple of 2"]),
        (["plan", ck, "--pp", "3", last, "3"], ["STUDENT has 4 layers", "leaves 1 of the 4 layers"]),
        (["search", ck, "--scores", str(r / "not_scores.safetensors"), "--out", out, "--valid-data", data,
          "--params", "230K", "--pp", "2", first, "1"], ["search writes candidates of many depths"]),
        (["convert", str(r / "hf"), out, "--pp", "2", first, "4"], ["SRC", "leaves 0 of the 4 layers"]),
    ]


@pytest.mark.parametrize("index", range(10))
def test_cli_refuses_impossible_splits_in_one_line(index, cli_inputs):
    from test_cli_errors import run_in_process

    from megatron_prune.runtime.stages import requested_split

    argv, fragments = _cli_cases(cli_inputs)[index]
    code, err = run_in_process(argv)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megatron-prune {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err, (argv, fragment, err)
    assert requested_split() == (None, None)  # the flags do not outlive the command
    assert not (cli_inputs / "new_out").exists()


def test_cli_accepts_an_uneven_layout(cli_inputs):
    """A layout megatron can build gets past every check (to the process group, which the test forbids)."""
    from test_cli_errors import _Loaded, run_in_process

    ck, data = str(cli_inputs / "ckpt"), str(cli_inputs / "tokens")
    for extra in (["--pp", "3"], ["--pp", "2", "--decoder-last-pipeline-num-layers", "3"]):
        with pytest.raises(_Loaded):
            run_in_process(["eval", ck, "--data", data, *extra])
