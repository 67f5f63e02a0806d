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
    out["leaks"] = [k for k in before
                    if not (after_ours[k] is before[k] or (k == "modes" and after_ours[k] == before[k]))]
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


def _probe() -> dict:
    """What another library sees of torch's CUDA on this CPU machine (an exception's type, or the value)."""
    def outcome(fn):
        try:
            return repr(fn())
        except BaseException as e:  # noqa: BLE001 - the type is the answer
            return type(e).__name__

    return {"ones(device=cuda)": outcome(lambda: torch.ones(1, device="cuda").device),
            "current_device": outcome(torch.cuda.current_device),
            "synchronize": outcome(torch.cuda.synchronize),
            "tensor.cuda": outcome(lambda: torch.ones(1).cuda().device),
            "module.cuda": outcome(lambda: next(torch.nn.Linear(1, 1).cuda().parameters()).device),
            "type": outcome(lambda: torch.ones(1).type()),
            "device_count": outcome(torch.cuda.device_count)}


def _ours_then_probe(ckpt: str) -> dict:
    from megatron_prune.checkpoint import load_model
    from megatron_prune.runtime import init_distributed

    init_distributed(tp=1, pp=1)
    model, _ = load_model(ckpt)
    with torch.no_grad():
        model(torch.arange(3, 12)[None], torch.arange(9)[None], None)
    return _probe()


def test_other_libraries_see_torch_cuda_as_in_a_clean_process(tiny_chat_ckpt):
    (mixed,) = run_ranks(_ours_then_probe, 1, str(tiny_chat_ckpt))
    (clean,) = run_ranks(_probe, 1)
    assert mixed == clean
    assert clean["type"] == "'torch.FloatTensor'" and clean["ones(device=cuda)"] != "device(type='cpu')"


# ---- a GPU machine whose CUDA does not start: one line, never a silent fall-back to the CPU ---------------

def _decide(env, available=False, build="12.8", nvidia=False):
    from megatron_prune.runtime.device import decide

    return decide(env, cuda_available=available, cuda_build=build, nvidia_present=lambda: nvidia)


TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
SRUN = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}


@pytest.mark.parametrize("env, nvidia, why", [
    ({"CUDA_VISIBLE_DEVICES": "0"}, False, "CUDA_VISIBLE_DEVICES=0"),
    ({**TORCHRUN, "CUDA_VISIBLE_DEVICES": "0,1"}, False, "CUDA_VISIBLE_DEVICES=0,1"),
    ({**SRUN, "SLURM_STEP_GPUS": "0,1"}, False, "SLURM_STEP_GPUS=0,1"),
    ({**SRUN, "SLURM_GPUS_ON_NODE": "4"}, False, "SLURM_GPUS_ON_NODE=4"),
    ({**SRUN, "SLURM_JOB_GPUS": "0"}, False, "SLURM_JOB_GPUS=0"),  # GPU index 0, not "no GPU"
    ({**SRUN, "SLURM_GPUS": "a100:2"}, False, "SLURM_GPUS=a100:2"),
    ({**TORCHRUN}, True, "torchrun/srun on a machine with an NVIDIA driver"),
    ({**SRUN}, True, "torchrun/srun on a machine with an NVIDIA driver"),
])
def test_expected_gpu_without_cuda_is_one_line_naming_cause_and_fix(env, nvidia, why):
    from megatron_prune.runtime import DeviceError

    with pytest.raises(DeviceError) as err:
        _decide(env, nvidia=nvidia)
    msg = str(err.value)
    assert "\n" not in msg and why in msg and "MEGATRON_PRUNE_DEVICE=cpu" in msg and "driver" in msg
    assert _decide({**env, "MEGATRON_PRUNE_DEVICE": "cpu"}, nvidia=nvidia) is False  # the way out it names


@pytest.mark.parametrize("env, nvidia, build", [
    ({}, False, "12.8"),  # this machine: a CUDA wheel, no GPU, nothing asks for one
    ({**TORCHRUN}, False, "12.8"),  # torchrun/srun on a CPU machine (every multi-rank test here)
    ({**SRUN, "SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS": "a100:0"}, False, "12.8"),
    ({"CUDA_VISIBLE_DEVICES": ""}, True, "12.8"),  # GPUs hidden on purpose
    ({"CUDA_VISIBLE_DEVICES": "-1"}, False, "12.8"),
    ({}, True, "12.8"),  # a single process (no launcher) on a machine with a driver: not a launched GPU job
    ({"CUDA_VISIBLE_DEVICES": "0", **TORCHRUN}, True, ""),  # a CPU wheel: the CPU is what was installed
])
def test_cpu_machines_run_on_the_cpu_as_before(env, nvidia, build):
    assert _decide(env, nvidia=nvidia, build=build) is False
    assert _decide(env, available=True, nvidia=nvidia, build=build) is True


def test_device_setting():
    from megatron_prune.runtime import DeviceError

    assert _decide({"MEGATRON_PRUNE_DEVICE": "cpu"}, available=True) is False
    assert _decide({"MEGATRON_PRUNE_DEVICE": "cuda"}, available=True) is True
    for bad in ("cuda", "tpu"):
        with pytest.raises(DeviceError, match="MEGATRON_PRUNE_DEVICE"):
            _decide({"MEGATRON_PRUNE_DEVICE": bad})


@pytest.fixture
def broken_cuda(monkeypatch):
    """A CUDA build of torch whose CUDA does not start, on a machine where a GPU was asked for."""
    from megatron_prune.runtime import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("MEGATRON_PRUNE_DEVICE", raising=False)
    device._reset()
    yield
    device._reset()


def test_init_distributed_stops_before_starting_anything(broken_cuda):
    import torch.distributed as dist

    from megatron_prune.runtime import DeviceError, init_distributed, on_gpu

    with pytest.raises(DeviceError, match=r"a GPU is expected here \(CUDA_VISIBLE_DEVICES=0\)"):
        init_distributed()
    with pytest.raises(DeviceError):
        on_gpu()  # every other asker gets the same answer
    assert not dist.is_initialized()


FAKE_BROKEN_CUDA = """
import sys
import torch
torch.cuda.is_available = lambda: False  # a CUDA build whose driver is too old
torch.version.cuda = "12.8"
from megatron_prune.cli import main
sys.exit(main())
"""


def test_torchrun_prints_it_once(tiny_llama_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "broken_cuda_cli.py"
    script.write_text(FAKE_BROKEN_CUDA)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("MEGATRON_PRUNE_DEVICE", None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), "convert", str(tiny_llama_dir), str(tmp_path / "out"), "--tp", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 0
    ours = [ln for ln in out.stderr.splitlines() if "megatron-prune" in ln]
    assert len(ours) == 1, out.stderr
    assert ours[0].startswith("megatron-prune convert: error: a GPU is expected here (CUDA_VISIBLE_DEVICES=0)")
    assert "MEGATRON_PRUNE_DEVICE=cpu" in ours[0]
    assert "File \"" + str(Path(__file__).parents[1] / "megatron_prune") not in out.stderr  # no traceback of ours
    assert not (tmp_path / "out").exists()
