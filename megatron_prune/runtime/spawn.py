"""Run a function on N local ranks (spawned processes with torchrun's variables) and collect the results.

For tests, benchmarks and notebooks: the same multi-rank code path as torchrun, from one Python call.

The rendezvous is race-free the way torchrun's is: this (parent) process hosts the TCPStore on a port the OS
assigns while binding it, and tells the ranks to connect to it as clients (``TORCHELASTIC_USE_AGENT_STORE``,
honoured by ``init_process_group``'s ``tcp://`` rendezvous). No port is ever picked first and bound later, so
another process on a busy machine cannot take it in between (EADDRINUSE).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.multiprocessing as mp


def _host_store(timeout: float):
    """A TCPStore server owned by this process, bound to a port the OS picks atomically."""
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=timeout))


# What every rank imports anyway: the fork server imports it once, and each rank is forked from it.
PRELOAD = ["torch", "torch.distributed", "transformers", "megatron.core", "megatron.core.models.gpt",
           "megatron.core.dist_checkpointing", "megatron.core.distributed", "megatron.core.optimizer",
           "megatron.core.pipeline_parallel", "megatron_prune.runtime", "megatron_prune.checkpoint",
           "megatron_prune.forward"]


def _context():
    """A fork server that has imported torch and megatron-core: a rank starts in well under a second instead
    of re-importing them (seconds per rank; most of a multi-rank test's time). Each rank is still a fresh
    process forked from a server that has run no torch op and started no thread pool."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _entry(fn, rank, world_size, port, outdir, threads, args, environ):
    os.environ.clear()  # a forked rank starts with the server's environment: give it the caller's
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(threads)
    import warnings

    warnings.filterwarnings("ignore")
    try:
        result = fn(*args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    except BaseException:
        (Path(outdir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        from megatron_prune.runtime import destroy

        destroy()


def run_ranks(fn, world_size: int, *args, threads: Optional[int] = None, timeout: float = 1800) -> list:
    """``fn(*args)`` on ``world_size`` fresh processes; returns their return values in rank order.

    ``fn`` must be importable (a module-level function). ``threads``: torch threads per rank (default: the
    machine's cores split over the ranks). A failing rank raises RuntimeError with its traceback.
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = _context()
    store = _host_store(timeout)  # kept alive (and its port held) until every rank has finished
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_entry,
                             args=(fn, r, world_size, store.port, outdir, threads, args, dict(os.environ)))
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
            raise RuntimeError("distributed worker failed:\n"
                               + "\n".join(msgs or [f"exit codes {[p.exitcode for p in procs]}"]))
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
