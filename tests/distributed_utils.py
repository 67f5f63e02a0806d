"""Run a function on N gloo ranks (separate processes, like torchrun does) and collect what each returns."""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, outdir, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, 2 // world_size))
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


def run_ranks(fn, world_size: int, *args, timeout: float = 600):
    """``fn(*args)`` on ``world_size`` ranks; returns the list of per-rank return values (rank order)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, outdir, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        errors = [(Path(outdir) / f"rank{r}.err") for r in range(world_size)]
        msgs = [e.read_text() for e in errors if e.exists()]
        for p in procs:
            if p.is_alive():
                p.kill()
                msgs.append(f"rank process {p.pid} timed out after {timeout}s")
        if msgs or any(p.exitcode != 0 for p in procs):
            raise RuntimeError("distributed worker failed:\n" + "\n".join(msgs or [f"exit codes {[p.exitcode for p in procs]}"]))
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
