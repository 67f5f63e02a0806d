"""Shared helpers for the benchmarks: spawn gloo ranks (like torchrun), time, and read per-process memory.

Kept inside bench/ on purpose (the benchmarks do not import from tests/).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, outdir, threads, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    try:
        result = fn(*args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        from megatron_prune.runtime import destroy

        destroy()


def run_ranks(fn, world_size: int, *args, threads: int | None = None, timeout: float = 1800):
    """``fn(*args)`` on ``world_size`` fresh spawned processes; per-rank return values in rank order.

    ``threads``: torch intra-op threads per rank (default: the machine's cores split evenly over the ranks,
    so TP1 and TP2 use the same total number of cores).
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, outdir, threads, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        msgs = [e.read_text() for e in (Path(outdir) / f"rank{r}.err" for r in range(world_size)) if e.exists()]
        for p in procs:
            if p.is_alive():
                p.kill()
                msgs.append(f"rank process {p.pid} timed out after {timeout}s")
        if msgs or any(p.exitcode != 0 for p in procs):
            raise RuntimeError("bench worker failed:\n" + "\n".join(msgs or [f"exit codes {[p.exitcode for p in procs]}"]))
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


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
