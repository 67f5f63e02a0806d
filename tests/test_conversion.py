"""Hugging Face <-> Megatron conversion, checked against transformers' own forward at every layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from distributed_utils import run_ranks
from safetensors import safe_open

TOL = 1e-4


def hf_logits(hf_dir: Path, tokens: torch.Tensor, attn: str = "sdpa") -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        return model(tokens).logits


def sample_tokens(vocab: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def megatron_logits(ckpt, tp, pp, tokens):
    """Full-vocab logits of a checkpoint loaded at tp x pp (runs inside a rank)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.forward import broadcast_from_last_stage, gather_vocab, run_forward
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp)
    model, meta = load_model(ckpt)
    out = run_forward(model, [{"tokens": tokens}], 1, tokens.shape[1], tokens.shape[0],
                      lambda logits, batch: gather_vocab(logits, meta.arch))
    return broadcast_from_last_stage(out)[0]


def convert_then_logits(hf_dir, out, tp, pp, tokens, other_layouts=()):
    """Convert at tp x pp, then read the checkpoint back at that and other layouts of the same world."""
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, tp=tp, pp=pp)
    return {layout: megatron_logits(out, *layout, tokens) for layout in [(tp, pp), *other_layouts]}


def export(ckpt, out):
    from megatron_prune.pipelines.convert import megatron_to_hf

    megatron_to_hf(ckpt, out)
    return True


def assert_same_safetensors(a: Path, b: Path):
    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("tp,pp,others", [(1, 1, ()), (2, 1, ((1, 2),)), (2, 2, ((4, 1), (1, 4), (1, 1)))])
def test_synthetic_llama_logits_match_transformers(tiny_llama_dir, tmp_path, tp, pp, others):
    tokens = sample_tokens(1000)
    ref = hf_logits(tiny_llama_dir, tokens)
    results = run_ranks(convert_then_logits, tp * pp, tiny_llama_dir, tmp_path / "ckpt", tp, pp, tokens, others)
    for rank_result in results:
        for layout, logits in rank_result.items():
            assert logits.shape == ref.shape
            diff = (logits - ref).abs().max().item()
            assert diff <= TOL, f"layout TP,PP={layout}: max |diff| {diff}"
    # saved at one layout and loaded at another: the same logits
    first = results[0][(tp, pp)]
    for layout, logits in results[0].items():
        assert torch.allclose(logits, first, atol=1e-5, rtol=0), layout


def test_synthetic_roundtrip_is_bit_exact(tiny_llama_dir, tmp_path):
    run_ranks(convert_then_logits, 2, tiny_llama_dir, tmp_path / "ckpt", 2, 1, sample_tokens(1000, 1, 4))
    run_ranks(export, 2, tmp_path / "ckpt", tmp_path / "hf_out")  # one pipeline stage per rank
    assert_same_safetensors(tiny_llama_dir, tmp_path / "hf_out")
    a = json.loads((tiny_llama_dir / "config.json").read_text())
    b = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "model_type"):
        assert a[key] == b[key], key


def test_qwen2_biases_tied_embeddings_tp2(tmp_path):
    hf_dir = make_hf_model(tmp_path / "qwen", "qwen2", tie_word_embeddings=True, vocab_size=512)
    tokens = sample_tokens(512)
    ref = hf_logits(hf_dir, tokens)
    results = run_ranks(convert_then_logits, 2, hf_dir, tmp_path / "ckpt", 2, 1, tokens, ((1, 2),))
    for layout, logits in results[0].items():
        assert (logits - ref).abs().max().item() <= TOL, layout
    run_ranks(export, 1, tmp_path / "ckpt", tmp_path / "hf_out")
    assert_same_safetensors(hf_dir, tmp_path / "hf_out")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (3, 1), (1, 2)])
def test_smollm2_logits_match_transformers(smol_hf_dir, tmp_path, tp, pp):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smol_hf_dir)
    tokens = tok(["The quick brown fox jumps over the lazy dog because it was",
                  "In the beginning God created the heaven and the earth. And"], return_tensors="pt").input_ids
    ref = hf_logits(smol_hf_dir, tokens)
    results = run_ranks(convert_then_logits, tp * pp, smol_hf_dir, tmp_path / "ckpt", tp, pp, tokens)
    logits = results[0][(tp, pp)]
    diff = (logits - ref).abs().max().item()
    assert diff <= TOL, f"SmolLM2 TP{tp} PP{pp}: max |diff| {diff}"
    if tp == 1:  # same math as transformers' eager attention: equal up to last-bit noise
        eager = hf_logits(smol_hf_dir, tokens, attn="eager")
        assert (logits - eager).abs().max().item() <= 1e-6
    if (tp, pp) == (1, 2):  # HF -> Megatron -> HF is bit-exact, exported from 2 pipeline stages
        run_ranks(export, 2, tmp_path / "ckpt", tmp_path / "hf_out")
        assert_same_safetensors(smol_hf_dir, tmp_path / "hf_out")
        back = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_out")
        assert back("hello world").input_ids == tok("hello world").input_ids
