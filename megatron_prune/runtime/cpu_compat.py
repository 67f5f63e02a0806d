"""Let megatron-core run on a machine without CUDA.

megatron-core hard-codes CUDA in a handful of places (``torch.cuda.current_device()`` as a device,
``.cuda()`` on tensors and modules, literal ``device="cuda"`` in tensor factories, the CUDA RNG state
helpers of its tensor-parallel RNG tracker, and from 0.17 on CUDA streams and events in the gradient
buffers of its DDP). On a CPU-only machine we redirect each of them to the CPU.
Nothing here is applied when CUDA is available. It covers megatron-core 0.16 through 0.19 (what differs between
those releases is detected in compat.py).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from megatron_prune.runtime.compat import megatron_rng_module

_applied = False


def _to_cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, an int index, a cuda torch.device) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=`` arguments of every torch function call from CUDA to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return func(*args, **kwargs)


def _identity_cuda(self, *args, **kwargs):
    return self


_tensor_type = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """``t.type()`` names CPU tensors as CUDA ones (megatron's optimizer asserts 'torch.cuda.FloatTensor');
    ``t.type(dtype)`` (a cast) is unchanged."""
    if dtype is None and not kwargs:
        name = _tensor_type(self)
        # (the torch-function mode can route this call through here twice: rename once)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    return _tensor_type(self, dtype, non_blocking, **kwargs)


def _cpu_rng_state(device=-1, clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _CpuEvent:
    """A CUDA event on a machine where every op has finished when it returns: always complete."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """A CUDA stream on the CPU: work is synchronous, so waiting on another stream or event is a no-op.

    megatron-core 0.17+ DDP calls ``torch.cuda.current_stream().wait_event(...)`` on every gradient sync."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_CPU_STREAM = _CpuStream()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Patch torch and megatron-core so megatron runs on the CPU. Returns True when patches were applied.

    Idempotent; a no-op when CUDA is available.
    """
    global _applied
    if _applied:
        return True
    if torch.cuda.is_available():
        return False

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.device_count = lambda: 0
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.current_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.default_stream = lambda *a, **k: _CPU_STREAM
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.stream = lambda stream=None: _CPU_STREAM
    torch.Tensor.cuda = _identity_cuda
    torch.nn.Module.cuda = _identity_cuda
    torch.Tensor.type = _cuda_type_name

    tp_random = megatron_rng_module()
    tp_random._get_cuda_rng_state = _cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state

    _CudaToCpuMode().__enter__()  # stays active for the life of the process
    _applied = True
    return True
