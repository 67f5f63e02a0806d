"""Mixture of Experts (Mixtral, Qwen3-MoE): conversion at every TP/PP/EP layout, checked against transformers' own
MixtralForCausalLM / Qwen3MoeForCausalLM on random-weight models built from transformers' configs.

Routing ties must not flip between two implementations: the routers' weights are scaled by 50 (router logits of
order 10 instead of 0.2), and every test that compares logits first checks, in transformers' own forward, that the
k-th and (k+1)-th router logits of every token differ by far more than float32 rounding (``MIN_ROUTER_GAP``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks
from test_conversion import TOL, assert_same_safetensors, export, hf_logits, sample_tokens

ROUTER_SCALE = 50.0
MIN_ROUTER_GAP = 1e-3  # logits agree to ~1e-6; a smaller gap between the k-th and (k+1)-th expert could flip


def make_moe_model(out: Path, model_type: str, **overrides) -> Path:
    """A random-weight Mixtral or Qwen3-MoE (2 layers, hidden 64, 4 experts, top-2), saved as safetensors."""
    import transformers

    cfg = dict(vocab_size=1000, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
               num_experts_per_tok=2)
    if model_type == "mixtral":
        cfg.update(num_local_experts=4, router_aux_loss_coef=0.02)
        cls = transformers.MixtralConfig
    else:  # Qwen3-30B-A3B's router: softmax over all experts, the top-k weights not renormalised
        cfg.update(num_experts=4, moe_intermediate_size=32, head_dim=12, norm_topk_prob=False)
        cls = transformers.Qwen3MoeConfig
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**cfg), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):
                p.mul_(ROUTER_SCALE)
    model.save_pretrained(out, safe_serialization=True)
    return out


def router_logits(hf_dir: Path, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's router logits [tokens, experts] in transformers' forward."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    out = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, a, o: out.append((a[0].reshape(-1, a[0].shape[-1])
                                                                         @ m.weight.t()).detach()))
    with torch.no_grad():
        model(tokens)
    return out


def assert_routing_unambiguous(hf_dir: Path, tokens: torch.Tensor, k: int) -> None:
    for logits in router_logits(hf_dir, tokens):
        top = logits.topk(k + 1, dim=-1).values
        gap = (top[:, k - 1] - top[:, k]).min().item()
        assert gap > MIN_ROUTER_GAP, f"router top-{k} nearly tied (gap {gap}): choose another seed or scale"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    return make_moe_model(tmp_path_factory.mktemp("moe") / "mixtral", "mixtral")


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    return make_moe_model(tmp_path_factory.mktemp("moe") / "qwen3_moe", "qwen3_moe")


def moe_logits(ckpt, tp, pp, ep, tokens):
    """Full-vocab logits of a checkpoint loaded at tp x pp x ep (runs inside a rank)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.forward import broadcast_from_last_stage, gather_vocab, run_forward
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp, ep=ep)
    model, meta = load_model(ckpt)
    out = run_forward(model, [{"tokens": tokens}], 1, tokens.shape[1], tokens.shape[0],
                      lambda logits, batch: gather_vocab(logits, meta.arch))
    return broadcast_from_last_stage(out)[0]


def convert_then_moe_logits(hf_dir, out, layout, tokens, others=()):
    """Convert at ``layout`` (tp, pp, ep), then read the checkpoint back at that and other layouts."""
    from megatron_prune.pipelines.convert import hf_to_megatron

    tp, pp, ep = layout
    hf_to_megatron(hf_dir, out, tp=tp, pp=pp, ep=ep)
    return {lay: moe_logits(out, *lay, tokens) for lay in [layout, *others]}


# ---------------------------------------------------------------------------------------------------
def test_configs_map_both_ways(mixtral, qwen3_moe):
    import transformers

    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import read_hf_config

    for hf_dir, norm, ffn in ((mixtral, True, 48), (qwen3_moe, False, 32)):
        c = read_hf_config(hf_dir)
        arch = ModelArch.from_hf_config(c)
        assert (arch.num_experts, arch.moe_router_topk, arch.moe_ffn_hidden_size) == (4, 2, ffn)
        assert arch.moe_norm_topk_prob is norm
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        assert arch.param_count() == sum(p.numel() for p in model.parameters())
        assert arch.active_param_count() == arch.param_count() - 2 * 2 * 3 * 64 * ffn  # 2 idle experts x 2 layers
        back = arch.to_hf_config().to_dict()
        for key in ("hidden_size", "num_hidden_layers", "num_experts_per_tok", "num_local_experts",
                    "router_aux_loss_coef", "model_type", "moe_intermediate_size", "norm_topk_prob"):
            assert back.get(key) == c.get(key), key
        assert ModelArch.from_hf_config(back) == arch


@pytest.mark.parametrize("family,layout,others", [
    ("mixtral", (1, 1, 2), ((2, 1, 1), (1, 2, 1), (1, 1, 1))),
    ("qwen3_moe", (2, 2, 1), ((1, 2, 2), (2, 1, 2), (1, 1, 4))),
])
def test_logits_match_transformers_at_every_layout(request, tmp_path, family, layout, others):
    """Converted at EP2 (Mixtral) and at TP2 x PP2 (Qwen3-MoE), read back at TP/PP/EP 1, 2 and 4."""
    hf_dir = request.getfixturevalue(family)
    tokens = sample_tokens(1000)
    assert_routing_unambiguous(hf_dir, tokens, 2)
    ref = hf_logits(hf_dir, tokens)
    world = max(layout[0] * layout[1] * layout[2], *(a * b * c for a, b, c in others))
    results = run_ranks(convert_then_moe_logits, world, hf_dir, tmp_path / "ckpt", layout, tokens, others)
    assert len(results[0]) == 1 + len(others)
    for lay, logits in results[0].items():
        diff = (logits - ref).abs().max().item()
        print(f"{family} TP,PP,EP={lay}: max |logits - transformers'| {diff:.2e}")
        assert diff <= TOL, f"{family} TP,PP,EP={lay}: max |diff| {diff}"


def _convert_ep(hf_dir, out, ep):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, ep=ep)
    return True


def test_roundtrip_from_expert_parallel_checkpoint_is_bit_exact(mixtral, qwen3_moe, tmp_path):
    for hf_dir in (mixtral, qwen3_moe):
        name = hf_dir.name
        run_ranks(_convert_ep, 2, hf_dir, tmp_path / name, 2)
        run_ranks(export, 2, tmp_path / name, tmp_path / f"{name}_hf")
        assert_same_safetensors(hf_dir, tmp_path / f"{name}_hf")
        a = json.loads((hf_dir / "config.json").read_text())
        b = json.loads((tmp_path / f"{name}_hf" / "config.json").read_text())
        for key in ("model_type", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "intermediate_size",
                    "moe_intermediate_size", "router_aux_loss_coef", "architectures"):
            assert a.get(key) == b.get(key), (name, key)


# ---------------------------------------------------------------------------------------------------
def _config(tmp_path, name, **changes) -> Path:
    src = tmp_path / name
    src.mkdir()
    c = dict(model_type="mixtral", vocab_size=1000, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2)
    c.update(changes)
    (src / "config.json").write_text(json.dumps(c))
    return src


def test_bad_moe_inputs_fail_before_loading_with_one_line(tmp_path):
    """No weights at all next to these configs: each fails on the config alone, naming the fix."""
    from megatron_prune.inputs import InputError
    from megatron_prune.pipelines.convert import check_convert

    cases = [(dict(num_local_experts=0), 1, "num_local_experts >= 1"),
             (dict(num_experts_per_tok=5), 1, "num_experts_per_tok to at most 4"),
             (dict(model_type="qwen3_moe", num_experts=0, moe_intermediate_size=32), 1, "set num_experts >= 1"),
             ({}, 3, "--ep that divides them")]
    for i, (changes, ep, fix) in enumerate(cases):
        with pytest.raises(InputError) as e:
            check_convert(_config(tmp_path, f"c{i}", **changes), tmp_path / "out", None, 1, 1, "auto", False, ep)
        assert fix in str(e.value) and "\n" not in str(e.value), str(e.value)
    run = subprocess.run([sys.executable, "-m", "megatron_prune.cli", "convert", str(tmp_path / "c3"),
                          str(tmp_path / "out"), "--ep", "3"], capture_output=True, text=True)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "--ep that divides them" in lines[0], run.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
def _expert_scores(hf_dir, layouts, tokens):
    """Inside each rank: build the model from HF weights at every (tp, pp, ep) and score it (micro-batches of 2)."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import load_hf_into_model, read_hf_config
    from megatron_prune.importance import compute_importance
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    out = {}
    for tp, pp, ep in layouts:
        init_distributed(tp, pp, ep=ep)
        arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
        model = build_model(arch, use_te=False)
        load_hf_into_model(model, arch, hf_dir)
        out[(tp, pp, ep)] = compute_importance(model, arch, tokens, 2, desc=None)
    return out


def naive_expert_scores(hf_dir, tokens) -> list[dict]:
    """Per layer, the expert scores written out on transformers' own model: its router's softmax and top-k, and
    each expert's SwiGLU applied by hand to the tokens routed to it (the weights read from the experts' module)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    k, norm = cfg.num_experts_per_tok, getattr(cfg, "norm_topk_prob", True)
    inputs = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(tokens)
    out = []
    for x, layer in zip(inputs, model.model.layers, strict=True):
        probs = torch.softmax(x @ layer.mlp.gate.weight.t(), dim=-1)
        top, idx = probs.topk(k, dim=-1)
        if norm:
            top = top / top.sum(-1, keepdim=True)
        experts = layer.mlp.experts
        n = probs.shape[1]
        s = {m: torch.zeros(n) for m in ("tokens", "output_l2", "reap")}
        s["moe_ffn"] = torch.zeros(n, experts.down_proj.shape[-1])
        for e in range(n):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            gate, up = (x[rows] @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            y = torch.linalg.vector_norm(act @ experts.down_proj[e].t(), dim=-1)
            g = top[rows, slot]
            s["tokens"][e] = len(rows)
            s["output_l2"][e] = y.mean() if len(rows) else 0.0
            s["reap"][e] = (g * y).mean() if len(rows) else 0.0
            s["moe_ffn"][e] = act.square().sum(0).sqrt()
        s["router_prob"] = probs.mean(0)
        out.append(s)
    return out


def test_expert_importance_is_the_same_at_every_layout_and_equals_naive_math(qwen3_moe):
    """Routed-token count, Model Optimizer's mean output L2, REAP, the router's mean probability and the expert-FFN
    neuron L2: equal at TP1, TP2, EP2 and PP2, and to the naive per-expert math on transformers' model."""
    tokens = sample_tokens(1000, batch=6, seq=16)
    assert_routing_unambiguous(qwen3_moe, tokens, 2)
    (ref,) = run_ranks(_expert_scores, 1, qwen3_moe, [(1, 1, 1)], tokens)
    ref = ref[(1, 1, 1)]
    naive = naive_expert_scores(qwen3_moe, tokens)
    for layer, want in enumerate(naive):
        for metric, value in want.items():
            torch.testing.assert_close(ref.experts[metric][layer], value, rtol=1e-4, atol=1e-5,
                                       msg=f"layer {layer} {metric}")
    assert ref.experts["tokens"].sum().item() == 2 * 2 * tokens.numel()  # top-2 over 2 layers
    got = run_ranks(_expert_scores, 2, qwen3_moe, [(2, 1, 1), (1, 1, 2), (1, 2, 1)], tokens)[0]
    print({m: ref.experts[m][0].tolist() for m in ("tokens", "output_l2", "reap")})
    for layout, s in got.items():
        for metric, value in ref.experts.items():
            torch.testing.assert_close(s.experts[metric], value, rtol=1e-5, atol=1e-6, msg=f"{layout} {metric}")
        torch.testing.assert_close(s.heads, ref.heads, rtol=1e-5, atol=1e-6, msg=f"{layout} heads")


# ---------------------------------------------------------------------------------------------------
def _plan_from_scores(ckpt, tokens, target, plan_file):
    """Inside a rank: score the checkpoint at TP1 and plan ``target`` from the scores (REAP ranks the experts)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.importance import compute_importance
    from megatron_prune.prune import PruneTarget, make_plan
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, meta = load_model(ckpt)
    scores = compute_importance(model, meta.arch, tokens, 2, desc=None)
    make_plan(scores, meta.arch, PruneTarget.parse(target)).save(plan_file)
    return scores.experts["reap"]


def _hf_tensors(d: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def naive_pruned_moe(src: Path, plan: dict, out: Path) -> Path:
    """Qwen3-MoE's Hugging Face tensors pruned by hand: the router's kept rows, the kept experts renumbered, each
    kept expert's kept neurons (rows of gate/up_proj, columns of down_proj)."""
    from safetensors.torch import save_file

    t = _hf_tensors(src)
    new = {k: v for k, v in t.items() if ".mlp." not in k}
    for layer, (experts, neurons) in enumerate(zip(plan["kept_experts"], plan["kept_moe_ffn"], strict=True)):
        p = f"model.layers.{layer}.mlp."
        new[p + "gate.weight"] = t[p + "gate.weight"][experts]
        for e_new, (e, keep) in enumerate(zip(experts, neurons, strict=True)):
            for name in ("gate_proj", "up_proj"):
                new[f"{p}experts.{e_new}.{name}.weight"] = t[f"{p}experts.{e}.{name}.weight"][keep]
            new[f"{p}experts.{e_new}.down_proj.weight"] = t[f"{p}experts.{e}.down_proj.weight"][:, keep]
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    target = plan["target_arch"]
    c.update(num_local_experts=target["num_experts"], num_experts=target["num_experts"],
             moe_intermediate_size=target["moe_ffn_hidden_size"], num_experts_per_tok=target["moe_router_topk"])
    (out / "config.json").write_text(json.dumps(c))
    return out


def test_prune_experts_expert_ffn_and_topk_matches_naive_pruning_and_exports(qwen3_moe, tmp_path):
    """4 -> 3 experts per layer (the lowest REAP score dropped), expert FFN 32 -> 24, top-2 -> top-1, pruned at TP2
    from a checkpoint saved at EP2; checked against transformers' tensors pruned by hand, and exported."""
    from test_hf_export import hf_logits_fresh_process
    from test_prune import _prune

    run_ranks(_convert_ep, 2, qwen3_moe, tmp_path / "ckpt", 2)
    calib = sample_tokens(1000, batch=6, seq=16)
    (reap,) = run_ranks(_plan_from_scores, 1, tmp_path / "ckpt", calib, "experts=3,moe_ffn=24,topk=1",
                        tmp_path / "plan.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    for layer, kept in enumerate(plan["kept_experts"]):  # each layer drops its own lowest-REAP expert
        assert kept == sorted(reap[layer].argsort(descending=True)[:3].tolist())
    run_ranks(_prune, 2, tmp_path / "ckpt", tmp_path / "plan.json", tmp_path / "pruned", 2, 1)
    ref_dir = naive_pruned_moe(qwen3_moe, plan, tmp_path / "naive")
    tokens = sample_tokens(1000)
    assert_routing_unambiguous(ref_dir, tokens, 1)
    ref = hf_logits(ref_dir, tokens)
    (ours,) = run_ranks(moe_logits, 1, tmp_path / "pruned", 1, 1, 1, tokens)
    print(f"kept experts {plan['kept_experts']}: max |ours - naive| {(ours - ref).abs().max().item():.2e}")
    assert (ours - ref).abs().max().item() <= TOL
    run_ranks(export, 1, tmp_path / "pruned", tmp_path / "pruned_hf")
    got = hf_logits_fresh_process({"pruned": tmp_path / "pruned_hf"}, tokens, tmp_path)["pruned"]
    assert got["class"] == "Qwen3MoeForCausalLM"
    print(f"exported, fresh transformers: max |diff| {(got['logits'] - ours).abs().max().item():.2e}")
    assert (got["logits"] - ours).abs().max().item() <= TOL
    src, out = _hf_tensors(qwen3_moe), _hf_tensors(tmp_path / "pruned_hf")
    for layer, kept in enumerate(plan["kept_experts"]):  # the router's kept rows are unchanged
        name = f"model.layers.{layer}.mlp.gate.weight"
        assert torch.equal(out[name], src[name][kept])


def test_pruning_at_expert_parallel_layouts_moves_kept_experts_between_ranks(qwen3_moe, tmp_path):
    """4 -> 2 experts per layer, expert FFN 32 -> 24, pruned by the CLI at EP2 and at TP2 x EP2 (4 ranks) from a
    checkpoint saved at EP2. The kept experts are chosen so that each must move to another EP rank (layer 0 keeps
    experts 0 and 1, both on EP rank 0, and expert 1 becomes EP rank 1's; layer 1 keeps 2 and 3, both on rank 1).
    Both outputs give the logits of transformers' tensors pruned by hand. An EP that does not divide the kept
    experts is refused before loading."""
    run_ranks(_convert_ep, 2, qwen3_moe, tmp_path / "ckpt", 2)
    run_ranks(_plan_from_scores, 1, tmp_path / "ckpt", sample_tokens(1000, batch=4, seq=16), "experts=2,moe_ffn=24",
              tmp_path / "scored_plan.json")
    plan = json.loads((tmp_path / "scored_plan.json").read_text())
    plan["kept_experts"] = [[0, 1] if layer % 2 == 0 else [2, 3] for layer in range(len(plan["kept_experts"]))]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    ref = hf_logits(naive_pruned_moe(qwen3_moe, plan, tmp_path / "naive"), sample_tokens(1000))
    for tp, ep in ((1, 2), (2, 2)):
        out = tmp_path / f"pruned_tp{tp}ep{ep}"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * ep), "-m",
                              "megatron_prune.cli", "prune", str(tmp_path / "ckpt"), "--plan",
                              str(tmp_path / "plan.json"), "--out", str(out), "--tp", str(tp), "--ep", str(ep)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        (ours,) = run_ranks(moe_logits, 1, out, 1, 1, 1, sample_tokens(1000))
        print(f"pruned at TP{tp} EP{ep}: max |ours - naive| {(ours - ref).abs().max().item():.2e}")
        assert (ours - ref).abs().max().item() <= TOL
    run = subprocess.run([sys.executable, "-m", "megatron_prune.cli", "prune", str(tmp_path / "ckpt"), "--plan",
                          str(tmp_path / "plan.json"), "--out", str(tmp_path / "bad"), "--ep", "4"],
                         capture_output=True, text=True)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "EP=4 does not divide the 2 experts" in lines[0], run.stderr
    assert not (tmp_path / "bad").exists()


def test_search_takes_an_active_parameter_budget(qwen3_moe):
    """Active parameters (what one token uses) counted by hand: everything but the (experts - top-k) idle experts."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import read_hf_config
    from megatron_prune.prune.search_space import Budget, SearchSpace, candidate_name, candidates, target_spec

    source = ModelArch.from_hf_config(read_hf_config(qwen3_moe))
    space = SearchSpace(experts=[2, 3, 4], moe_ffn=[16, 32], topk=[1, 2])

    def naive_active(a):
        h = a.hidden_size
        attn = h * (8 + 2 * 4) * 12 + 8 * 12 * h + 2 * 12  # q, k, v, o and the q/k norms
        per_layer = 2 * h + attn + a.num_experts * h + a.moe_router_topk * 3 * h * a.moe_ffn_hidden_size
        return 2 * 1000 * h + h + a.num_layers * per_layer

    budget = Budget(active_params=naive_active(source.replace(moe_router_topk=1)), tolerance=0.01)
    found = candidates(source, space, budget)
    assert found and all(a.moe_router_topk <= a.num_experts for a in found)
    for a in found:
        assert a.active_param_count() == naive_active(a)
        assert abs(a.active_param_count() / budget.active_params - 1) <= 0.01
    assert "L2-h64-e2k1-f32" in [candidate_name(a)[:15] for a in found]
    assert target_spec(source, source.replace(num_experts=3, moe_router_topk=1)) == "experts=3,topk=1"


# ---------------------------------------------------------------------------------------------------
def _distill_step(teacher, student, data, out, tp, pp, ep, **options):
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import train

    cfg = TrainConfig(teacher=str(teacher), student=str(student), data=[str(data)], out=str(out), tp=tp, pp=pp, ep=ep,
                      seq_len=16, micro_batch_size=1, global_batch_size=4, steps=1, optimizer="sgd", lr=1.0,
                      min_lr=1.0, warmup_steps=0, weight_decay=0.0, clip_grad=1e9, kd_loss="forward", ce_weight=0.5,
                      save_every=1, dataset_cache=str(Path(out).parent / "cache"), **options)
    return train(cfg)[-1]


def test_distillation_keeps_the_students_router_loss_apart_and_is_the_same_at_every_layout(mixtral, tmp_path):
    """Mixtral teacher -> Mixtral student with its experts pruned to FFN 32 of 48: the student's load-balancing loss
    (coefficient 0.02 from the config) is logged as ``moe_aux``, apart from ``kd``; one step gives the same losses and
    gradient norm at TP1, PP2, EP2, TP2 and TP2 x EP2 (sequence parallel at TP2), with an intermediate-state loss
    too. A dense teacher works as well."""
    from conftest import write_token_dataset
    from test_prune import _prune

    run_ranks(_convert_ep, 1, mixtral, tmp_path / "teacher", 1)
    run_ranks(_plan_from_scores, 1, tmp_path / "teacher", sample_tokens(1000, batch=4, seq=16), "moe_ffn=32",
              tmp_path / "plan.json")
    run_ranks(_prune, 1, tmp_path / "teacher", tmp_path / "plan.json", tmp_path / "student", 1, 1)
    write_token_dataset(tmp_path / "data", num_docs=30, doc_len=50, vocab=1000)
    records = {lay: run_ranks(_distill_step, lay[0] * lay[1] * lay[2], tmp_path / "teacher", tmp_path / "student",
                              tmp_path / "data", tmp_path / f"run{''.join(map(str, lay))}", *lay)[0]
               for lay in [(1, 1, 1), (1, 2, 1), (1, 1, 2), (2, 1, 1), (2, 1, 2)]}
    ref = records[(1, 1, 1)]
    print(ref)
    assert ref["kd"] > 0 and ref["moe_aux"] > 0
    assert ref["loss"] == pytest.approx(ref["kd"] + 0.5 * ref["lm"], rel=1e-5)  # the aux loss is not in "loss"
    for layout, rec in records.items():
        for key in ("loss", "kd", "lm", "moe_aux", "grad_norm"):
            assert rec[key] == pytest.approx(ref[key], rel=1e-4), (layout, key)
    # a dense teacher (a random Llama of the same vocabulary) teaches the MoE student at EP2 as well
    from conftest import make_hf_model

    make_hf_model(tmp_path / "llama_hf", num_hidden_layers=2)
    run_ranks(_convert_ep, 1, tmp_path / "llama_hf", tmp_path / "dense", 1)
    rec = run_ranks(_distill_step, 2, tmp_path / "dense", tmp_path / "student", tmp_path / "data",
                    tmp_path / "run_dense", 1, 1, 2)[0]
    assert rec["kd"] > 1e-3 and rec["moe_aux"] == pytest.approx(ref["moe_aux"], rel=1e-4)
    # the intermediate-state loss (layer 1 of each, and the embeddings) at TP2 x PP2 equals TP1: the states are
    # sequence shards at TP2 and are gathered for the loss
    states = dict(intermediate_layers=[[1, 1]], embedding_loss=True)
    step = functools.partial(_distill_step, **states)
    one, four = (run_ranks(step, n, tmp_path / "teacher", tmp_path / "student", tmp_path / "data", tmp_path / f"is{n}",
                           *lay)[0] for n, lay in ((1, (1, 1, 1)), (4, (2, 2, 1))))
    assert one["is"] > 0
    for key in ("loss", "kd", "lm", "is", "moe_aux", "grad_norm"):
        assert four[key] == pytest.approx(one[key], rel=1e-4), key


def test_expert_targets_plan_and_refuse_with_the_fix(qwen3_moe):
    """Plans from made-up scores: per-layer and same-in-every-layer expert choice, each expert its own neurons; and
    targets that cannot be reached fail with the fix."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import read_hf_config
    from megatron_prune.importance.scores import ImportanceScores
    from megatron_prune.prune import PruneTarget, make_plan
    from megatron_prune.prune.plan import PlanError

    arch = ModelArch.from_hf_config(read_hf_config(qwen3_moe))
    g = torch.Generator().manual_seed(0)
    L, E = arch.num_layers, arch.num_experts
    reap = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 9.0]])  # summed over layers: 5, 3, 6, 11
    scores = ImportanceScores(
        arch=arch.to_dict(), seq_agg="mean", batch_agg="l2", num_samples=1, seq_len=1,
        mlp=torch.zeros(L, arch.ffn_hidden_size), heads=torch.rand(L, 8, generator=g), query_groups=torch.rand(L, 4),
        embedding=torch.rand(64, generator=g), embedding_layers=torch.rand(L, 2, 64), block_influence=torch.rand(L),
        angle_matrix=torch.rand(L + 1, L + 1),
        experts={"reap": reap, "output_l2": reap.flip(1), "tokens": reap, "router_prob": reap,
                 "moe_ffn": torch.rand(L, E, arch.moe_ffn_hidden_size, generator=g)})
    per_layer = make_plan(scores, arch, PruneTarget.parse("experts=2,moe_ffn=16"))
    assert per_layer.kept_experts == [[0, 2], [2, 3]]
    for j, kept in enumerate(per_layer.kept_experts):
        for k, e in enumerate(kept):
            assert per_layer.kept_moe_ffn[j][k] == sorted(scores.experts["moe_ffn"][j, e].argsort(descending=True)[:16]
                                                          .tolist())
    same = make_plan(scores, arch, PruneTarget.parse("experts=2,expert_choice=all_layers"))
    assert same.kept_experts == [[2, 3], [2, 3]]
    by_l2 = make_plan(scores, arch, PruneTarget.parse("experts=2,expert_metric=output_l2"))
    assert by_l2.kept_experts == [[1, 3], [0, 1]]
    assert make_plan(scores, arch, PruneTarget.parse("topk=1")).target_arch.moe_router_topk == 1
    for target, fix in (("experts=1", "topk=1"), ("ffn=32", "moe_ffn=N"), ("experts=5", "larger than"),
                        ("experts=2,expert_metric=magic", "reap"), ("experts=2,expert_choice=some", "all_layers")):
        with pytest.raises(PlanError, match=fix):
            make_plan(scores, arch, PruneTarget.parse(target))


def _generate(ckpt, prompts, tp, pp, ep):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp, ep=ep)
    model, meta = load_model(ckpt, use_te=False)
    return generate(model, meta.arch, prompts, SamplingParams(max_new_tokens=6), batch_size=3, desc=None)


def test_greedy_generation_equals_transformers(mixtral, tmp_path):
    from test_generate import _hf_greedy

    run_ranks(_convert_ep, 1, mixtral, tmp_path / "ckpt", 1)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 9, 3)]
    want = _hf_greedy(mixtral, prompts, new=6)
    assert run_ranks(_generate, 1, tmp_path / "ckpt", prompts, 1, 1, 1)[0] == want


def _loss_and_tokens(ckpt, windows, prompts, ep):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1, ep=ep)
    model, meta = load_model(ckpt, use_te=False)
    loss = lm_loss(model, meta.arch, windows, 2, desc=None).lm_loss
    return loss, generate(model, meta.arch, prompts, SamplingParams(max_new_tokens=6), batch_size=1, desc=None)


def test_eval_and_generation_at_ep2_with_uneven_data_parallel_splits(mixtral, tmp_path, monkeypatch):
    """At EP2 the experts' all-to-all spans both data-parallel ranks, so both must run the same forwards: 5 windows
    (3 + 2 per rank) and 3 prompts one at a time (2 + 1) would leave one rank waiting forever. The LM loss equals
    EP1's and the greedy tokens equal transformers'. Importance refuses, before loading, a sample count that does
    not split over the data-parallel ranks."""
    from test_generate import _hf_greedy

    from megatron_prune.inputs import InputError
    from megatron_prune.pipelines.importance import check_importance

    run_ranks(_convert_ep, 1, mixtral, tmp_path / "ckpt", 1)
    windows = sample_tokens(1000, batch=5, seq=17)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (4, 7, 2)]
    want = _hf_greedy(mixtral, prompts, new=6)
    (one,) = run_ranks(_loss_and_tokens, 1, tmp_path / "ckpt", windows, prompts, 1)
    assert one[1] == want
    for loss, tokens in run_ranks(_loss_and_tokens, 2, tmp_path / "ckpt", windows, prompts, 2, timeout=600):
        assert loss == pytest.approx(one[0], rel=1e-6) and tokens == want
    monkeypatch.setenv("RANK", "0")  # as torchrun starts rank 0 of 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="--samples 5 does not split evenly.*use a multiple of 2"):
        check_importance(tmp_path / "ckpt", tmp_path / "no_data", tmp_path / "s.pt", 5, 16, 1, (), 8, 1, 1, ep=2)


def _merge_and_loss(a, b, out, windows):
    """A linear merge of two MoE checkpoints at TP2, then the merged model's LM loss at EP2."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.pipelines.merge import merge
    from megatron_prune.runtime import init_distributed

    merge([a, b], out, method="linear", weights=[0.25, 0.75], tp=2, pp=1)
    init_distributed(1, 1, ep=2)
    model, meta = load_model(out)
    return lm_loss(model, meta.arch, windows, 2, desc=None).lm_loss


def test_merge_and_eval_run_on_moe(mixtral, tmp_path):
    """A linear merge equals the naive weighted sum of the Hugging Face tensors (router and experts included), and
    its LM loss at EP2 equals transformers' on the exported merge."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "b_hf", safe_serialization=True)
    run_ranks(_convert_ep, 1, mixtral, tmp_path / "a", 1)
    run_ranks(_convert_ep, 1, tmp_path / "b_hf", tmp_path / "b", 1)
    windows = sample_tokens(1000, batch=4, seq=17)
    loss = run_ranks(_merge_and_loss, 2, tmp_path / "a", tmp_path / "b", tmp_path / "m", windows)[0]
    run_ranks(export, 1, tmp_path / "m", tmp_path / "m_hf")
    a, b, m = _hf_tensors(mixtral), _hf_tensors(tmp_path / "b_hf"), _hf_tensors(tmp_path / "m_hf")
    assert sorted(m) == sorted(a)
    for k in a:
        torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-6, msg=k)
    assert_routing_unambiguous(tmp_path / "m_hf", windows[:, :-1], 2)
    logits = hf_logits(tmp_path / "m_hf", windows[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), windows[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(want, rel=1e-5)
