"""Pruning: plans from scores, and pruned weights checked against a naive pruning of the HF tensors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks
from test_conversion import TOL, hf_logits, megatron_logits, sample_tokens

D, HPG = 8, 2  # tiny model: kv_channels and heads per group


def random_plan_json(arch: dict, seed: int = 0) -> dict:
    """A plan that prunes every axis: hidden 64->48, FFN 96->64, groups 4->2, heads 8->2, layers 4->2."""
    rng = random.Random(seed)
    groups = [sorted(rng.sample(range(4), 2)) for _ in range(2)]
    return {
        "source_arch": arch,
        "target_arch": dict(arch, hidden_size=48, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=2,
                            num_layers=2),
        "kept_layers": [1, 3],
        "kept_hidden": sorted(rng.sample(range(64), 48)),
        "kept_ffn": [sorted(rng.sample(range(96), 64)) for _ in range(2)],
        "kept_groups": groups,
        "kept_heads": [[[rng.randrange(HPG)] for _ in g] for g in groups],
    }


def naive_pruned_hf(src_hf: Path, plan: dict, out: Path, model_type: str = "llama", D: int = D) -> Path:
    """Prune the Hugging Face tensors by hand (independent of megatron_prune) and save a transformers model.

    ``qwen3``: the per-head q/k norms (one head_dim vector each) are copied whole; ``D``: the head dim."""
    import transformers
    from safetensors.torch import load_file

    sd = load_file(str(src_hf / "model.safetensors"))
    hid = torch.tensor(plan["kept_hidden"])
    new = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:, hid],
           "lm_head.weight": sd["lm_head.weight"][:, hid], "model.norm.weight": sd["model.norm.weight"][hid]}
    for j, layer in enumerate(plan["kept_layers"]):
        p, q = f"model.layers.{layer}.", f"model.layers.{j}."
        heads = [g * HPG + h for g, hs in zip(plan["kept_groups"][j], plan["kept_heads"][j]) for h in hs]
        qrows = torch.tensor([h * D + k for h in heads for k in range(D)])
        kvrows = torch.tensor([g * D + k for g in plan["kept_groups"][j] for k in range(D)])
        ffn = torch.tensor(plan["kept_ffn"][j])
        new[q + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"][qrows][:, hid]
        new[q + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"][kvrows][:, hid]
        new[q + "self_attn.v_proj.weight"] = sd[p + "self_attn.v_proj.weight"][kvrows][:, hid]
        new[q + "self_attn.o_proj.weight"] = sd[p + "self_attn.o_proj.weight"][hid][:, qrows]
        new[q + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"][ffn][:, hid]
        new[q + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"][ffn][:, hid]
        new[q + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][hid][:, ffn]
        new[q + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"][hid]
        new[q + "post_attention_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"][hid]
        if model_type == "qwen3":
            new[q + "self_attn.q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            new[q + "self_attn.k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
    t = plan["target_arch"]
    config_cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[model_type]
    cfg = config_cls(vocab_size=1000, hidden_size=t["hidden_size"], intermediate_size=t["ffn_hidden_size"],
                                   num_hidden_layers=t["num_layers"], num_attention_heads=t["num_attention_heads"],
                                   num_key_value_heads=t["num_query_groups"], head_dim=D, max_position_embeddings=256,
                                   tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.load_state_dict(new)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _convert(hf_dir, out, tp, pp):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, tp=tp, pp=pp)


def _prune(src, plan_file, out, tp, pp):
    from megatron_prune.prune import PrunePlan
    from megatron_prune.prune.checkpoint import prune_checkpoint
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp)
    prune_checkpoint(src, PrunePlan.load(plan_file), out)


def _params_at_tp1(ckpt):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, _ = load_model(ckpt)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _apply_in_memory_and_logits(src, plan_file, tokens):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.forward import gather_vocab, run_forward
    from megatron_prune.prune import PrunePlan, apply_plan
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    plan = PrunePlan.load(plan_file)
    model, _ = load_model(src)
    pruned = apply_plan(model, plan)
    out = run_forward(pruned, [{"tokens": tokens}], 1, tokens.shape[1], tokens.shape[0],
                      lambda logits, b: gather_vocab(logits, plan.target_arch))
    return out[0]


@pytest.fixture(scope="module")
def sources(tiny_llama_dir, tmp_path_factory):
    """The tiny model as Megatron checkpoints saved at TP1 and at TP2xPP2, and a plan file."""
    root = tmp_path_factory.mktemp("prune")
    run_ranks(_convert, 1, tiny_llama_dir, root / "src_tp1", 1, 1)
    run_ranks(_convert, 4, tiny_llama_dir, root / "src_tp2pp2", 2, 2)
    arch = json.loads((root / "src_tp1" / "megatron_prune.json").read_text())["arch"]
    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(random_plan_json(arch)))
    return root, plan_file


def test_pruned_checkpoint_matches_naive_pruning_in_transformers(tiny_llama_dir, sources, tmp_path):
    root, plan_file = sources
    run_ranks(_prune, 2, root / "src_tp2pp2", plan_file, tmp_path / "pruned", 2, 1)
    ref_dir = naive_pruned_hf(tiny_llama_dir, json.loads(plan_file.read_text()), tmp_path / "naive_hf")
    tokens = sample_tokens(1000)
    ref = hf_logits(ref_dir, tokens)
    (ours,) = run_ranks(megatron_logits, 1, tmp_path / "pruned", 1, 1, tokens)
    assert (ours - ref).abs().max().item() <= TOL
    # carries its parent and plan; exports to HF and gives the same logits in transformers
    meta = json.loads((tmp_path / "pruned" / "megatron_prune.json").read_text())
    assert meta["provenance"]["parent"] == str((root / "src_tp2pp2").absolute())
    assert json.loads((tmp_path / "pruned" / "prune_plan.json").read_text())["kept_layers"] == [1, 3]
    from test_conversion import export

    run_ranks(export, 1, tmp_path / "pruned", tmp_path / "pruned_hf")
    assert (hf_logits(tmp_path / "pruned_hf", tokens) - ours).abs().max().item() <= TOL


def test_same_pruned_weights_for_every_source_and_target_layout(sources, tmp_path):
    root, plan_file = sources
    cases = {"tp1_to_tp1": ("src_tp1", 1, 1, 1), "tp2pp2_to_tp1": ("src_tp2pp2", 1, 1, 1),
             "tp1_to_tp2": ("src_tp1", 2, 1, 2), "tp1_to_pp2": ("src_tp1", 1, 2, 2),
             "tp2pp2_to_tp2pp2": ("src_tp2pp2", 2, 2, 4)}
    weights = {}
    for name, (src, tp, pp, world) in cases.items():
        run_ranks(_prune, world, root / src, plan_file, tmp_path / name, tp, pp)
        (weights[name],) = run_ranks(_params_at_tp1, 1, tmp_path / name)
    first = weights["tp1_to_tp1"]
    for name, w in weights.items():
        assert sorted(w) == sorted(first)
        for k in first:
            assert torch.equal(w[k], first[k]), (name, k)  # selection only: bit-identical


def test_in_memory_apply_equals_checkpoint_pruning(tiny_llama_dir, sources, tmp_path):
    root, plan_file = sources
    ref_dir = naive_pruned_hf(tiny_llama_dir, json.loads(plan_file.read_text()), tmp_path / "naive_hf")
    tokens = sample_tokens(1000)
    (ours,) = run_ranks(_apply_in_memory_and_logits, 1, root / "src_tp1", plan_file, tokens)
    assert (ours - hf_logits(ref_dir, tokens)).abs().max().item() <= TOL


def test_identity_plan_reproduces_the_model(sources, tmp_path):
    from megatron_prune.arch import ModelArch
    from megatron_prune.prune import identity_plan

    root, _ = sources
    arch = ModelArch.from_dict(json.loads((root / "src_tp1" / "megatron_prune.json").read_text())["arch"])
    identity_plan(arch).save(tmp_path / "identity.json")
    run_ranks(_prune, 2, root / "src_tp1", tmp_path / "identity.json", tmp_path / "same", 1, 2)
    tokens = sample_tokens(1000)
    (a,) = run_ranks(megatron_logits, 1, root / "src_tp1", 1, 1, tokens)
    (b,) = run_ranks(megatron_logits, 1, tmp_path / "same", 1, 1, tokens)
    assert torch.equal(a, b)


# ------------------------------------------------------------------- plans from scores, and errors
def fake_scores(arch, seed=0):
    from megatron_prune.importance import ImportanceScores

    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    return ImportanceScores(
        arch=arch.to_dict(), seq_agg="mean", batch_agg="l2", num_samples=1, seq_len=1,
        mlp=torch.rand(L, arch.ffn_hidden_size, generator=g),
        heads=torch.rand(L, arch.num_attention_heads, generator=g),
        query_groups=torch.rand(L, arch.num_query_groups, generator=g),
        embedding=torch.rand(arch.hidden_size, generator=g),
        embedding_layers=torch.rand(L, 2, arch.hidden_size, generator=g), block_influence=torch.rand(L, generator=g),
        angle_matrix=torch.zeros(L + 1, L + 1),
        angular={n: torch.rand(L - n + 1, generator=g) for n in range(1, L)})


TINY = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
            vocab_size=1000)


def test_plan_keeps_the_top_scored_units():
    from megatron_prune.arch import ModelArch
    from megatron_prune.prune import PruneTarget, make_plan

    arch = ModelArch(**TINY)
    s = fake_scores(arch)
    plan = make_plan(s, arch, PruneTarget.parse("hidden=48,ffn=64,groups=2,heads=2,layers=3"))
    assert plan.kept_hidden == sorted(torch.argsort(s.embedding, descending=True)[:48].tolist())
    assert plan.kept_layers == sorted(torch.argsort(s.block_influence, descending=True)[:3].tolist())
    for j, layer in enumerate(plan.kept_layers):
        assert plan.kept_ffn[j] == sorted(torch.argsort(s.mlp[layer], descending=True)[:64].tolist())
        assert plan.kept_groups[j] == sorted(torch.argsort(s.query_groups[layer], descending=True)[:2].tolist())
        for g, heads in zip(plan.kept_groups[j], plan.kept_heads[j]):
            assert heads == [int(torch.argmax(s.heads[layer].reshape(4, 2)[g]))]
    # angular: drop the contiguous block with the smallest distance
    plan = make_plan(s, arch, PruneTarget.parse("layers=2,depth_metric=angular"))
    start = int(torch.argmin(s.angular[2]))
    assert plan.kept_layers == [i for i in range(4) if not start <= i < start + 2]
    assert plan.target_arch.param_count() < arch.param_count()


@pytest.mark.parametrize("spec,match", [
    ("hidden=128", "larger than the source"),
    ("heads=6,groups=4", "not divisible by query groups"),
    ("colour=3", "unknown target axis 'colour'"),
    ("layers=2,drop_layers=1", "either layers=N or drop_layers"),
    ("depth_metric=vibes,layers=2", "unknown depth metric"),
    ("hidden", "not KEY=VALUE"),
])
def test_impossible_targets_fail_before_any_work(spec, match):
    from megatron_prune.arch import ModelArch
    from megatron_prune.prune import PlanError, PruneTarget, make_plan

    arch = ModelArch(**TINY)
    with pytest.raises(PlanError, match=match):
        make_plan(fake_scores(arch), arch, PruneTarget.parse(spec))


def test_target_not_divisible_by_target_tp(sources, tmp_path):
    from megatron_prune.arch import ModelArch
    from megatron_prune.prune import PruneTarget, make_plan

    root, _ = sources
    arch = ModelArch.from_dict(json.loads((root / "src_tp1" / "megatron_prune.json").read_text())["arch"])
    make_plan(fake_scores(arch), arch, PruneTarget.parse("groups=3,heads=3")).save(tmp_path / "p.json")
    with pytest.raises(RuntimeError, match="num_query_groups=3 is not divisible by TP=2"):
        run_ranks(_prune, 2, root / "src_tp1", tmp_path / "p.json", tmp_path / "out", 2, 1)
    assert not (tmp_path / "out").exists()
