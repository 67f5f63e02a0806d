"""Qwen3 (dense), the second architecture family: conversion, importance, pruning of every axis, export, merge,
generation, distillation and NeMo 2, each checked against transformers' own Qwen3 or naive math written here.

Two random-weight shapes built with transformers' Qwen3Config, both with head_dim != hidden / heads:
- ``q3_4b_like``: Qwen3-4B scaled down by 32 (hidden 2560 -> 80, 32 heads -> 8 in 2 KV groups (4B: 8 groups),
  head_dim 128 -> 16, so heads x head_dim / hidden = 1.6 as in the 4B; FFN 9728 -> 304; tied embeddings);
- ``q3_tiny``: hidden 64, 8 heads in 4 groups, head_dim 12, FFN 96, untied (the shape test_prune's plan prunes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, write_token_dataset
from distributed_utils import run_ranks
from safetensors import safe_open
from test_conversion import (
    TOL,
    assert_same_safetensors,
    convert_then_logits,
    export,
    hf_logits,
    megatron_logits,
    sample_tokens,
)
from test_hf_export import hf_logits_fresh_process
from test_prune import _convert, _prune, naive_pruned_hf, random_plan_json

HEAD_DIM = 12


@pytest.fixture(scope="module")
def q3_4b_like(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("q3") / "hf4b", "qwen3", hidden_size=80, intermediate_size=304,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def q3_tiny(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("q3") / "hf", "qwen3", head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def q3_ckpts(q3_tiny, tmp_path_factory):
    """q3_tiny as our checkpoint saved at TP1 and at TP2 x PP2."""
    root = tmp_path_factory.mktemp("q3ckpt")
    run_ranks(_convert, 1, q3_tiny, root / "tp1", 1, 1)
    run_ranks(_convert, 4, q3_tiny, root / "tp2pp2", 2, 2)
    return root


def _hf_tensors(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


# ---------------------------------------------------------------------------------------------------
def test_config_maps_both_ways(q3_4b_like):
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import read_hf_config

    c = read_hf_config(q3_4b_like)
    arch = ModelArch.from_hf_config(c)
    assert (arch.model_type, arch.qk_norm, arch.kv_channels, arch.tie_embeddings) == ("qwen3", True, 16, True)
    assert not arch.qkv_bias and not arch.linear_bias
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(q3_4b_like)
    assert arch.param_count() == sum(p.numel() for p in model.parameters())  # q/k norms counted
    back = arch.to_hf_config().to_dict()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "model_type", "attention_bias"):
        assert back[key] == c[key], key


@pytest.mark.parametrize("tp,pp,others", [(1, 1, ()), (2, 2, ((1, 1), (1, 4), (2, 1)))])
def test_logits_match_transformers_at_every_layout(q3_4b_like, tmp_path, tp, pp, others):
    tokens = sample_tokens(1000)
    ref = hf_logits(q3_4b_like, tokens)
    results = run_ranks(convert_then_logits, tp * pp, q3_4b_like, tmp_path / "ckpt", tp, pp, tokens, others)
    for layout, logits in results[0].items():
        diff = (logits - ref).abs().max().item()
        assert diff <= TOL, f"TP,PP={layout}: max |diff| {diff}"


def test_roundtrip_is_bit_exact(q3_tiny, q3_ckpts, tmp_path):
    run_ranks(export, 2, q3_ckpts / "tp2pp2", tmp_path / "hf_out")  # one pipeline stage per rank
    assert_same_safetensors(q3_tiny, tmp_path / "hf_out")
    a = json.loads((q3_tiny / "config.json").read_text())
    b = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    for key in ("model_type", "head_dim", "hidden_size", "num_key_value_heads", "tie_word_embeddings"):
        assert a[key] == b[key], key


def test_prune_every_axis_matches_naive_pruning_and_exports(q3_tiny, q3_ckpts, tmp_path):
    """hidden 64->48, FFN 96->64, groups 4->2, heads 8->2, layers 4->2, pruned from the TP2xPP2 checkpoint at TP2;
    the reference prunes transformers' tensors by hand (q/k norms copied whole)."""
    arch = json.loads((q3_ckpts / "tp1" / "megatron_prune.json").read_text())["arch"]
    plan = random_plan_json(arch, seed=3)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    run_ranks(_prune, 2, q3_ckpts / "tp2pp2", tmp_path / "plan.json", tmp_path / "pruned", 2, 1)
    ref_dir = naive_pruned_hf(q3_tiny, plan, tmp_path / "naive", model_type="qwen3", D=HEAD_DIM)
    tokens = sample_tokens(1000)
    ref = hf_logits(ref_dir, tokens)
    (ours,) = run_ranks(megatron_logits, 1, tmp_path / "pruned", 1, 1, tokens)
    assert (ours - ref).abs().max().item() <= TOL
    run_ranks(export, 1, tmp_path / "pruned", tmp_path / "pruned_hf")
    got = hf_logits_fresh_process({"pruned": tmp_path / "pruned_hf"}, tokens, tmp_path)["pruned"]
    assert got["class"] == "Qwen3ForCausalLM"
    assert (got["logits"] - ours).abs().max().item() <= TOL
    src, out = _hf_tensors(q3_tiny), _hf_tensors(tmp_path / "pruned_hf")
    for j, layer in enumerate(plan["kept_layers"]):  # head pruning keeps the shared per-head norms whole
        for norm in ("q_norm", "k_norm"):
            assert torch.equal(out[f"model.layers.{j}.self_attn.{norm}.weight"],
                               src[f"model.layers.{layer}.self_attn.{norm}.weight"])


def _scores(hf_dir, layouts, tokens):
    from test_importance import importance_worker

    return importance_worker(hf_dir, layouts, tokens, 2, [("mean", "l2")])


def test_importance_is_the_same_at_tp2_and_pp2(q3_tiny):
    tokens = sample_tokens(1000, batch=6, seq=16)
    (ref,) = run_ranks(_scores, 1, q3_tiny, [(1, 1)], tokens)
    ref = ref[(1, 1, "mean", "l2")]
    got = run_ranks(_scores, 2, q3_tiny, [(2, 1), (1, 2)], tokens)[0]
    for tp, pp in [(2, 1), (1, 2)]:
        s = got[(tp, pp, "mean", "l2")]
        for field in ("mlp", "heads", "query_groups", "embedding", "block_influence", "angle_matrix"):
            torch.testing.assert_close(getattr(s, field), getattr(ref, field), rtol=1e-5, atol=1e-6,
                                       msg=f"TP{tp} PP{pp} {field}")
    # the FFN score is the naive L2-over-batch of mean-over-sequence |input of down_proj| in transformers
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(q3_tiny, dtype=torch.float32)
    acts = []
    model.model.layers[2].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0]))
    with torch.no_grad():
        model(tokens)
    naive = acts[0].abs().mean(1).pow(2).sum(0).sqrt()
    torch.testing.assert_close(ref.mlp[2].float(), naive, rtol=1e-4, atol=1e-6)


def _generate(ckpt, prompts, tp, pp):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp)
    model, meta = load_model(ckpt, use_te=False)
    return generate(model, meta.arch, prompts, SamplingParams(max_new_tokens=6), batch_size=3, desc=None)


def test_greedy_generation_equals_transformers(q3_tiny, q3_ckpts):
    from test_generate import _hf_greedy

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 9, 3)]
    want = _hf_greedy(q3_tiny, prompts, new=6)
    for tp, pp in [(1, 1), (2, 1)]:
        got = run_ranks(_generate, tp * pp, q3_ckpts / "tp1", prompts, tp, pp)[0]
        assert got == want, (tp, pp)


def _merge_linear(a, b, out):
    from megatron_prune.pipelines.merge import merge

    merge([a, b], out, method="linear", weights=[0.25, 0.75], tp=2, pp=1)


def test_linear_merge_equals_naive_average_of_hf_tensors(q3_tiny, q3_ckpts, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(q3_tiny, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "b_hf", safe_serialization=True)
    run_ranks(_convert, 1, tmp_path / "b_hf", tmp_path / "b", 1, 1)
    run_ranks(_merge_linear, 2, q3_ckpts / "tp1", tmp_path / "b", tmp_path / "m")
    run_ranks(export, 1, tmp_path / "m", tmp_path / "m_hf")
    a, b, m = _hf_tensors(q3_tiny), _hf_tensors(tmp_path / "b_hf"), _hf_tensors(tmp_path / "m_hf")
    assert sorted(m) == sorted(a)
    for k in a:
        torch.testing.assert_close(m[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-6, msg=k)


def _distill_step(teacher, student, data, out, tp, pp):
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import train

    cfg = TrainConfig(teacher=str(teacher), student=str(student), data=[str(data)], out=str(out), tp=tp, pp=pp,
                      seq_len=16, micro_batch_size=1, global_batch_size=4, steps=1, optimizer="sgd", lr=1.0,
                      min_lr=1.0, warmup_steps=0, weight_decay=0.0, clip_grad=1e9, kd_loss="forward", ce_weight=0.5,
                      save_every=1, dataset_cache=str(Path(out).parent / "cache"))
    return train(cfg)[-1]


def test_distillation_step_is_the_same_at_tp2_and_pp2(q3_ckpts, tmp_path):
    arch = json.loads((q3_ckpts / "tp1" / "megatron_prune.json").read_text())["arch"]
    (tmp_path / "plan.json").write_text(json.dumps(random_plan_json(arch)))
    run_ranks(_prune, 1, q3_ckpts / "tp1", tmp_path / "plan.json", tmp_path / "student", 1, 1)
    write_token_dataset(tmp_path / "data", num_docs=30, doc_len=50, vocab=1000)
    records = {(tp, pp): run_ranks(_distill_step, tp * pp, q3_ckpts / "tp1", tmp_path / "student", tmp_path / "data",
                                   tmp_path / f"run{tp}{pp}", tp, pp)[0] for tp, pp in [(1, 1), (2, 1), (1, 2)]}
    ref = records[(1, 1)]
    assert ref["kd"] > 0 and ref["lm"] > 0
    for layout, rec in records.items():
        for key in ("loss", "kd", "lm", "grad_norm"):
            assert rec[key] == pytest.approx(ref[key], rel=1e-4), (layout, key)


def _to_nemo_and_back(ckpt, nemo, back, tokens):
    from test_nemo import foreign_logits

    from megatron_prune.pipelines.convert import convert

    convert(ckpt, nemo, to="nemo", dtype="float32")
    nemo_logits = foreign_logits(nemo, 1, 1, tokens)
    convert(nemo, back, to="megatron")
    return nemo_logits


def test_nemo2_writer_and_reader_know_qwen3(q3_tiny, q3_ckpts, tmp_path):
    import yaml

    tokens = sample_tokens(1000)
    ref = hf_logits(q3_tiny, tokens)
    (nemo_logits,) = run_ranks(_to_nemo_and_back, 1, q3_ckpts / "tp1", tmp_path / "nemo", tmp_path / "back", tokens)
    model_yaml = yaml.safe_load((tmp_path / "nemo" / "context" / "model.yaml").read_text())
    assert model_yaml["_target_"].endswith("qwen3.Qwen3Model")
    assert model_yaml["config"]["_target_"].endswith("qwen3.Qwen3Config")
    assert model_yaml["config"]["qk_layernorm"] is True and model_yaml["config"]["kv_channels"] == HEAD_DIM
    assert (nemo_logits - ref).abs().max().item() <= TOL
    (back,) = run_ranks(megatron_logits, 1, tmp_path / "back", 1, 1, tokens)
    assert (back - ref).abs().max().item() <= TOL


# ---------------------------------------------------------------------------------------------------
UNSUPPORTED = ["gemma", "phi3", "deepseek_v3", "nemotron_h", "falcon_mamba", "qwen3_next"]


def _check_message(line: str, model_type: str) -> None:
    for expected in (repr(model_type), "llama, mistral, qwen2", "qwen3", "megatron_prune/models/<family>/"):
        assert expected in line, (expected, line)


def test_unsupported_families_get_one_line_before_anything_is_loaded(tmp_path):
    from megatron_prune.arch import ArchError, ModelArch

    for model_type in UNSUPPORTED:
        with pytest.raises(ArchError) as e:
            ModelArch.from_hf_config({"model_type": model_type, "hidden_size": 64})
        _check_message(str(e.value), model_type)
    src = tmp_path / "src"  # the command line: a config.json and no weights at all, one line, exit 2
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gemma", "hidden_size": 64}))
    run = subprocess.run([sys.executable, "-m", "megatron_prune.cli", "convert", str(src), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, run.stderr
    _check_message(lines[0], "gemma")
    assert not (tmp_path / "out").exists()


def test_unsupported_gguf_is_refused_from_its_header(tmp_path):
    """A GGUF file (written by the gguf package's own writer) is refused before transformers dequantizes it."""
    import gguf

    from megatron_prune.arch import ArchError
    from megatron_prune.checkpoint.hf import gguf_architecture, gguf_to_hf

    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_architecture(path) == "gemma"
    with pytest.raises(ArchError) as e:
        gguf_to_hf(path, tmp_path / "out")
    _check_message(str(e.value), "gemma")
    assert not (tmp_path / "out").exists()
