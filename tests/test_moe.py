"""Mixture of Experts (Mixtral, Qwen3-MoE): conversion at every TP/PP/EP layout, checked against transformers' own
MixtralForCausalLM / Qwen3MoeForCausalLM on random-weight models built from transformers' configs.

Routing ties must not flip between two implementations: the routers' weights are scaled by 50 (router logits of
order 10 instead of 0.2), and every test that compares logits first checks, in transformers' own forward, that the
k-th and (k+1)-th router logits of every token differ by far more than float32 rounding (``MIN_ROUTER_GAP``).
"""

from __future__ import annotations

import json
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
    for layout, s in got.items():
        for metric, value in ref.experts.items():
            torch.testing.assert_close(s.experts[metric], value, rtol=1e-5, atol=1e-6, msg=f"{layout} {metric}")
        torch.testing.assert_close(s.heads, ref.heads, rtol=1e-5, atol=1e-6, msg=f"{layout} heads")
