"""merge: SLERP(A, A) = A, t=0/1 give the inputs, TP2 == TP1, merged tensors == naive per-tensor SLERP and
naive task arithmetic written here; differing shapes are refused with the differing fields named."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks


def _convert(pairs):
    from megatron_prune.pipelines.convert import hf_to_megatron

    for hf_dir, out in pairs:
        hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def two_ckpts(tiny_llama_dir, tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("merge")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # B: A fine-tuned a little (a small angle) plus one tensor far from A
        for name, p in model.named_parameters():
            scale = 1.0 if "layers.1.mlp.up_proj" in name else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=0.1))
    model.save_pretrained(d / "b_hf", safe_serialization=True)
    run_ranks(_convert, 1, [(tiny_llama_dir, d / "a"), (d / "b_hf", d / "b")])
    return d / "a", d / "b", d


def _merge_and_read(a, b, d):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.pipelines.merge import merge
    from megatron_prune.runtime import init_distributed

    jobs = {"ab_tp1": ([a, b], dict(t=0.3), 1, 1), "ab_tp2": ([a, b], dict(t=0.3), 2, 1),
            "ab_pp2": ([a, b], dict(t=0.3), 1, 2), "aa": ([a, a], dict(t=0.5), 1, 1),
            "t0": ([a, b], dict(t=0.0), 1, 1), "t1": ([a, b], dict(t=1.0), 1, 1),
            "by_layer": ([a, b], dict(t=[0.0, 1.0]), 1, 2),
            "task": ([b, a], dict(method="linear", weights=[0.7, 0.5], base=a), 2, 1)}
    for name, (ckpts, kw, tp, pp) in jobs.items():
        merge(ckpts, d / name, tp=tp, pp=pp, **kw)
    init_distributed(1, 1)
    out = {}
    for name in ["a", "b"] + list(jobs):
        model, _ = load_model(d / name if name not in ("a", "b") else {"a": a, "b": b}[name])
        out[name] = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra" not in k}
    return out


def _naive_slerp(a, b, t):
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float((a64 / a64.norm()) @ (b64 / b64.norm())) if a64.norm() > 0 and b64.norm() > 0 else 1.0
    if abs(cos) > 0.9995:
        w = (1 - t) * a64 + t * b64
    else:
        th = math.acos(cos)
        w = math.sin((1 - t) * th) / math.sin(th) * a64 + math.sin(t * th) / math.sin(th) * b64
    return w.reshape(a.shape).float()


@pytest.fixture(scope="module")
def merged(two_ckpts):
    return run_ranks(_merge_and_read, 2, *two_ckpts)[0]


def test_slerp_identity_and_endpoints(merged):
    for k, v in merged["a"].items():
        assert torch.allclose(merged["aa"][k], v, atol=1e-6), k
        assert torch.equal(merged["t0"][k], v), k
        assert torch.equal(merged["t1"][k], merged["b"][k]), k


D, HPG, GROUPS = 8, 2, 4  # the tiny Llama: head dim, heads per query group, groups


def hf_tensors(state: dict) -> dict:
    """Our megatron state dict as Hugging Face tensors, split by hand here: linear_qkv per query group into q, k,
    v; linear_fc1 into gate and up (independent of megatron_prune's own export)."""
    out = {}
    for k, v in state.items():
        if k.endswith("linear_qkv.weight"):
            per_group = v.reshape(GROUPS, (HPG + 2) * D, -1)
            for part, rows in zip("qkv", per_group.split([HPG * D, D, D], dim=1)):
                out[k.replace("linear_qkv", f"{part}_proj")] = rows.reshape(-1, v.shape[-1])
        elif k.endswith("linear_fc1.weight"):
            out[k.replace("linear_fc1", "gate_proj")], out[k.replace("linear_fc1", "up_proj")] = v.chunk(2)
        else:
            out[k] = v
    return out


def test_slerp_matches_naive_per_hf_tensor_and_tp2_equals_tp1(merged):
    """mergekit's SLERP: one angle per Hugging Face tensor (q, k, v, gate, up each their own)."""
    a, b = hf_tensors(merged["a"]), hf_tensors(merged["b"])
    m = {layout: hf_tensors(merged[layout]) for layout in ("ab_tp1", "ab_tp2", "ab_pp2")}
    slerped = 0
    for k in a:
        ref = _naive_slerp(a[k], b[k], 0.3)
        assert torch.allclose(m["ab_tp1"][k], ref, atol=1e-6, rtol=1e-5), k
        assert torch.allclose(m["ab_tp2"][k], m["ab_tp1"][k], atol=1e-6, rtol=1e-6), k
        assert torch.equal(m["ab_pp2"][k], m["ab_tp1"][k]), k
        slerped += not torch.allclose(ref, 0.7 * a[k] + 0.3 * b[k], atol=1e-6)
    assert slerped > 0  # some tensor really took the spherical path, not the linear one
    assert {k.rsplit(".", 2)[-2] for k in a} >= {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def test_slerp_by_layer(merged):
    """t=[0, 1] over 4 layers: layer i at i/3; the embedding, final norm and output layer at the list's start
    (mergekit evaluates a gradient at t=0 for tensors outside the layers)."""
    a, b, m = hf_tensors(merged["a"]), hf_tensors(merged["b"]), hf_tensors(merged["by_layer"])
    n_layers = 4
    for k in a:
        t = int(k.split(".")[2]) / (n_layers - 1) if k.startswith("decoder.layers.") else 0.0
        ref = _naive_slerp(a[k], b[k], t)
        assert torch.allclose(m[k], ref, atol=1e-6, rtol=1e-5), k


def test_task_arithmetic(merged):
    a, b = merged["a"], merged["b"]
    for k in a:  # base a + 0.7 (b - a) + 0.5 (a - a)
        assert torch.allclose(merged["task"][k], a[k] + 0.7 * (b[k] - a[k]), atol=1e-5), k


def test_different_shapes_refused(two_ckpts, tmp_path):
    from megatron_prune.checkpoint import CheckpointError
    from megatron_prune.checkpoint.merging import check_same_shape

    a, b, _ = two_ckpts
    other = tmp_path / "other"
    shutil.copytree(b, other)
    meta = json.loads((other / "megatron_prune.json").read_text())
    meta["arch"]["ffn_hidden_size"] = 64
    (other / "megatron_prune.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="ffn_hidden_size: 96 != 64"):
        check_same_shape([str(a), str(other)])


def _merge_alone_and_read(a, b, out):
    """One process (the usual `megatron-prune merge` run): every tensor of the model loaded by this rank."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.pipelines.merge import merge

    merge([a, b], out, t=0.3)
    model, _ = load_model(out)
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra" not in k}


def test_merge_on_one_process_equals_the_two_rank_merge(merged, two_ckpts):
    a, b, d = two_ckpts
    (alone,) = run_ranks(_merge_alone_and_read, 1, a, b, d / "alone")
    for k, v in merged["ab_tp1"].items():
        assert torch.equal(alone[k], v), k


def _merge_export(a, b, out, t):
    from megatron_prune.pipelines.convert import megatron_to_hf
    from megatron_prune.pipelines.merge import merge

    merge([a, b], out, t=t, tp=2, pp=1)
    megatron_to_hf(out, str(out) + "_hf")


@pytest.mark.parametrize("t", [0.3, [0.0, 0.3, 1.0]], ids=["t0.3", "t-list"])
def test_slerp_equals_mergekit(two_ckpts, tiny_llama_dir, tmp_path, t):
    """mergekit 0.1.5 (PyPI, runs offline on local folders) merges the same two Hugging Face models: every tensor
    of our TP2 merge, exported, equals its output (mergekit computes in float32, we in float64)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    a, b, d = two_ckpts
    run_ranks(_merge_export, 2, a, b, tmp_path / "ours", t)
    hf_a, hf_b = Path(tiny_llama_dir).absolute(), (d / "b_hf").absolute()
    config = {"merge_method": "slerp", "base_model": str(hf_a), "models": [{"model": str(hf_a)}, {"model": str(hf_b)}],
              "parameters": {"t": t}, "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    ours = {}
    for f in (tmp_path / "ours_hf").glob("*.safetensors"):
        ours.update(load_file(str(f)))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
