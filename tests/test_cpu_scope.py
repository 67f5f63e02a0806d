"""The CPU compatibility layer is visible to megatron-core only, never to other libraries in the process.

After our code has run (init_distributed, a model built and loaded, forward/backward, a checkpoint saved and an
export written), torch.cuda's functions, Tensor.cuda/type/to, Module.cuda and torch's function-mode stack are the
very objects torch had before; lm-eval's own ``hf`` model and transformers' ``device_map`` loading in that process
give the same numbers as in a clean process. And a GPU machine whose CUDA fails to start stops with one line
instead of running on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from distributed_utils import run_ranks

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CUDA_NAMES = ["current_device", "synchronize", "set_device", "device_count", "manual_seed", "manual_seed_all",
              "get_rng_state", "set_rng_state", "empty_cache", "memory_allocated", "max_memory_allocated",
              "current_stream", "default_stream", "Stream", "Event", "stream", "is_available", "mem_get_info",
              "get_device_properties", "get_device_name", "device", "reset_peak_memory_stats"]


def torch_state() -> dict:
    """Everything of torch the CPU layer used to change, as the objects themselves (compared with ``is``)."""
    from torch.overrides import _get_current_function_mode_stack

    state = {f"torch.cuda.{n}": getattr(torch.cuda, n, None) for n in CUDA_NAMES}
    for cls in (torch.Tensor, torch.nn.Module, torch.nn.Parameter):
        for n in ("cuda", "type", "to"):
            state[f"{cls.__name__}.{n}"] = cls.__dict__.get(n)
    state["modes"] = list(_get_current_function_mode_stack())
    state["torch.ones"] = torch.ones
    state["torch.empty"] = torch.empty
    return state


def assert_same_torch(before: dict, after: dict) -> None:
    changed = [k for k in before if not (after[k] is before[k] or (k == "modes" and after[k] == before[k]))]
    assert not changed, f"our code left torch changed: {changed}"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


# ---- nothing leaks: state compared before and after our code (TP2 and PP2, forward, backward, save, load) ----

def _our_code_leaves_torch_alone(tmp):
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint import load_model, save_checkpoint
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    before = torch_state()
    results = {}
    for tp, pp in [(2, 1), (1, 2)]:
        layout = init_distributed(tp=tp, pp=pp)
        arch = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                         num_query_groups=2, vocab_size=256, tie_embeddings=True)
        model = build_model(arch)
        assert all(p.device.type == "cpu" for p in model.parameters()) and layout.device.type == "cpu"
        out = f"{tmp}/tp{tp}pp{pp}"
        save_checkpoint(model, arch, out)
        loaded, _ = load_model(out)
        tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        if pp == 1:
            loss = loaded(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).mean()
            loss.backward()
            results[(tp, pp)] = loss.item()
        assert_same_torch(before, torch_state())
    return results


def test_our_code_leaves_torch_as_it_was(tmp_path):
    r0, r1 = run_ranks(_our_code_leaves_torch_alone, 2, str(tmp_path))
    assert r0[(2, 1)] == pytest.approx(r1[(2, 1)], rel=1e-6)
    assert 4.0 < r0[(2, 1)] < 7.0


# ---- lm-eval's hf model and transformers' device_map in the process that ran our code ---------------------

REQUESTS = [("Question: What is 2 plus 3?\nAnswer:", " 5"), ("Question: What is 2 plus 3?\nAnswer:", " apple"),
            ("The quick brown fox", " jumps over the lazy dog."), ("Once upon a time", " there was")]


def _hf_numbers(hf_dir: str) -> dict:
    """lm-eval's own ``hf`` model and transformers with ``device_map``, on ``hf_dir`` (CPU)."""
    import transformers
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_dir, device="cpu", batch_size=2, dtype="float32")
    ll = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)], disable_tqdm=True)
    ids = torch.arange(3, 40).reshape(1, -1)
    out = {"ll": [tuple(x) for x in ll]}
    for device_map in ("cpu", "auto"):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, device_map=device_map, dtype=torch.float32)
        with torch.no_grad():
            out[device_map] = model(ids).logits
    return out


def _ours_then_hf(ckpt: str, hf_dir: str) -> dict:
    from megatron_prune.checkpoint import load_model
    from megatron_prune.pipelines.convert import megatron_to_hf
    from megatron_prune.runtime import init_distributed

    before = torch_state()
    init_distributed(tp=1, pp=1)
    model, meta = load_model(ckpt)
    with torch.no_grad():
        tokens = torch.arange(3, 40).reshape(1, -1)
        ours = model(tokens, torch.arange(tokens.shape[1])[None], None)[..., : meta.arch.vocab_size]
    megatron_to_hf(ckpt, hf_dir)  # the folder lm-eval and transformers read next
    after_ours = torch_state()
    out = _hf_numbers(hf_dir)
    out["ours"] = ours
    out["leaks"] = [k for k in before if not (after_ours[k] is before[k] or (k == "modes" and after_ours[k] == before[k]))]
    return out


def test_lm_eval_hf_and_device_map_after_our_code(tiny_chat_ckpt, tmp_path):
    hf_dir = str(tmp_path / "exported")
    (mixed,) = run_ranks(_ours_then_hf, 1, str(tiny_chat_ckpt), hf_dir)  # our code, then theirs, one process
    (clean,) = run_ranks(_hf_numbers, 1, hf_dir)  # theirs alone, in a fresh process
    assert mixed["ll"] == clean["ll"]
    for device_map in ("cpu", "auto"):
        torch.testing.assert_close(mixed[device_map], clean[device_map], rtol=0, atol=0)
    torch.testing.assert_close(mixed["ours"], clean["cpu"], rtol=1e-4, atol=1e-4)  # and the same model
    assert mixed["leaks"] == []
