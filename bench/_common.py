"""Shared helpers for the benchmarks: time, and read per-process memory (ranks come from the package's
own local launcher, re-exported here as ``run_ranks``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from megatron_prune.runtime.spawn import run_ranks  # noqa: F401  (used by the bench scripts)


def synced_times(fn):
    """(wall seconds, CPU seconds of this process) of ``fn()``, each the max over ranks, and its result.

    CPU time (all threads of the process) is much less sensitive than wall time to other jobs competing
    for the same cores, so on a shared machine it is the steadier figure of the two.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    c1 = time.process_time()
    if dist.is_initialized():
        dist.barrier()
    dt = torch.tensor([time.perf_counter() - t0, c1 - c0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt[0]), float(dt[1]), out


def synced_time(fn):
    """Wall seconds of ``fn()`` across all ranks (barrier before and after; max over ranks), and its result."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    if dist.is_initialized():
        dist.barrier()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt), out


# ---- memory: this process's resident set, read from /proc (Linux) ----------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process."""
    return _status_kb("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0: ``echo 5 > clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) of this process since start or the last :func:`reset_peak_rss`."""
    return _status_kb("VmHWM") * 1024


def median(xs):
    return statistics.median(xs)


def gb(n: float) -> str:
    return f"{n / 2**30:.2f}"


def save_random_models(root, archs: dict) -> None:
    """Randomly initialised checkpoints ``root/NAME`` for ``{NAME: ModelArch}`` (run on one rank)."""
    from megatron_prune.checkpoint import save_checkpoint
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    for name, arch in archs.items():
        save_checkpoint(build_model(arch), arch, Path(root) / name)


def write_token_dataset(prefix, num_docs: int, doc_len: int, vocab: int, rng=None):
    """A Megatron indexed dataset (``prefix``.bin/.idx) of ``num_docs`` random-token documents."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0) if rng is None else rng
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(num_docs):
        builder.add_document(torch.from_numpy(rng.integers(0, vocab, size=doc_len, dtype=np.int32)), [doc_len])
    builder.finalize(f"{prefix}.idx")
    return prefix
