"""NeMo 2's own code on a CPU-only machine, for launch/real_tools/nemo2_check.py (never imported by megatron-prune).

NeMo and its megatron-core assume a GPU in a few places that have nothing to do with checkpoints: fused kernels
switched on by default in TransformerConfig, CUDA streams, RNG state and synchronisation, ``device="cuda"``
tensor factories, and a step that moves loaded tensors to the GPU. Each is redirected to the CPU here, so that
NeMo's own checkpoint code (io.json, model.yaml, strict dist-checkpoint loading, its importers) runs unchanged.
"""

import contextlib

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.overrides import TorchFunctionMode

_FUSIONS = ("apply_rope_fusion", "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm",
            "gradient_accumulation_fusion", "bias_dropout_fusion", "cross_entropy_loss_fusion")
_post_init = TransformerConfig.__post_init__


def _post_init_on_cpu(self):
    for name in _FUSIONS:
        if getattr(self, name, False):
            setattr(self, name, False)
    _post_init(self)


TransformerConfig.__post_init__ = _post_init_on_cpu


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.current_device = lambda: torch.device("cpu")
torch.cuda.empty_cache = lambda: None
torch.cuda.is_initialized = lambda: False
torch.cuda.Stream = _Stream
torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
torch.cuda.current_stream = lambda *a, **k: _Stream()
torch.cuda.manual_seed = lambda *a, **k: None
torch.cuda.manual_seed_all = lambda *a, **k: None
torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

import megatron.core.tensor_parallel.random as _rng  # noqa: E402

_rng._get_cuda_rng_state = lambda *a, clone=False, **k: torch.get_rng_state()
_rng._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

import nemo.lightning.io.pl as _pl  # noqa: E402

_pl._fix_tensors_device = lambda checkpoint: checkpoint  # moves loaded tensors to the GPU


class _CudaToCpu(TorchFunctionMode):
    """megatron's literal ``device="cuda"`` tensor factories (the causal mask) on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        d = kwargs.get("device")
        if isinstance(d, int) or (isinstance(d, str) and d.startswith("cuda")) or \
                (isinstance(d, torch.device) and d.type == "cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


_CudaToCpu().__enter__()
