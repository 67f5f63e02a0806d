"""Process-level set-up: distributed init (torchrun, Slurm, single process) and megatron on CPU."""

from megatron_prune.runtime.cpu_compat import apply_cpu_compat
from megatron_prune.runtime.device import DeviceError, on_gpu
from megatron_prune.runtime.distributed import (
    ParallelLayout,
    barrier,
    destroy,
    init_distributed,
    is_rank0,
    log0,
)

__all__ = [
    "DeviceError",
    "ParallelLayout",
    "apply_cpu_compat",
    "barrier",
    "destroy",
    "init_distributed",
    "is_rank0",
    "log0",
    "on_gpu",
]
