"""Write and read megatron distributed checkpoints without helper processes, and explain storage faults.

megatron-core's ``torch_dist`` save strategy writes through helper processes: a ``multiprocessing`` Manager
(spawned once, kept for the life of the job) and one forked copy of the job per write bucket. A job killed
while saving leaves them behind, re-parented to PID 1 (forked copies hold the job's memory). We keep the same
on-disk format (megatron's planner and metadata, torch.distributed.checkpoint files) but write from this
process only, so nothing of ours can outlive it.

Storage faults (a full disk, a truncated ``.distcp`` shard) surface from megatron and torch as tracebacks per
rank, some of them ``BaseException`` (torch's ``CheckpointException``). Here they become one
:class:`~megatron_prune.checkpoint.megatron.CheckpointError` naming the file and the cause, raised on every rank
(the ranks agree before raising, so none is left waiting in a collective).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner, mcore_to_pyt_state_dict
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException

from megatron_prune.runtime.compat import group_by_sharded_key, torch_dist_save_strategy_base
from megatron_prune.runtime.distributed import any_rank


class _PeerFailed(RuntimeError):
    """Another rank failed before this one reached the write."""


class InProcessTorchDistSave(torch_dist_save_strategy_base()):
    """megatron's ``torch_dist`` format (backend and version), written by the calling process (one I/O thread).

    A subclass of megatron's own strategy (the kind every megatron-core release uses as given, see
    runtime/compat.py) whose ``save`` writes in-process instead of through the async machinery.
    """

    def __init__(self):
        super().__init__("torch_dist", 1, thread_count=1)
        self.entered = False  # reached save() (the ranks' first agreement)
        self.written = False  # the shards and .metadata are on disk

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        self.entered = True
        # Serializing the state is local to each rank (megatron-core 0.17+ torch.save's the common state into it):
        # a failure there must reach the agreement below, not leave the other ranks waiting inside dcp_save.
        failure: Optional[BaseException] = None
        try:
            state = mcore_to_pyt_state_dict(group_by_sharded_key(sharded_state_dict), is_loading=False)
        except Exception as e:
            failure = e
        # also answers rank 0's failure writing megatron 0.16's common.pt before save() (see _release_peers)
        if any_rank(failure is not None):
            raise failure or _PeerFailed("another rank failed before the write")
        dcp_save(state,
                 storage_writer=FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))
        self.written = True


def _root_causes(error: BaseException) -> list[BaseException]:
    """The exceptions behind ``error``: torch's per-rank failures, then each one's __cause__/__context__ chain."""
    found, todo = [], [error]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is f for f in found):
            continue
        found.append(e)
        if isinstance(e, CheckpointException):
            todo.extend(exc for exc, _trace in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return found


def stop_inside(error: BaseException):
    """The stop signal (StopRequested) that ``error`` wraps, if any: torch's checkpoint code gathers every
    exception of a read or write, a signal handler's too, into a CheckpointException."""
    from megatron_prune.runtime.stop import StopRequested

    return next((e for e in _root_causes(error) if isinstance(e, StopRequested)), None)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def explain_write_error(error: BaseException, directory: Path) -> str:
    """One line: what failed while writing ``directory`` and why (a full disk is recognised by errno or by the
    file system having no room left, since torch's writer reports it as 'unexpected pos')."""
    causes = _root_causes(error)
    os_errors = [e for e in causes if isinstance(e, OSError)]
    where = next((f" ({e.filename})" for e in os_errors if e.filename), "")
    try:
        free = shutil.disk_usage(_nearest_existing(directory)).free
    except OSError:
        free = None
    if any(e.errno == errno.ENOSPC for e in os_errors) or (free is not None and free < (1 << 20)):
        return (f"No space left on device while writing {directory}{where}; the partial output was removed; "
                f"free some space or write elsewhere, then re-run")
    if os_errors:
        e = os_errors[-1]
        return f"{e.strerror or e} while writing {directory}{where}; the partial output was removed"
    last = causes[-1]
    return f"writing {directory} failed: {type(last).__name__}: {last}; the partial output was removed"


def _release_peers(strategy: InProcessTorchDistSave) -> None:
    """Join the collective the other ranks wait in after a failure that was local to this rank."""
    try:
        if not strategy.entered:  # failed in megatron's common-state write (rank 0): answer the agreement
            any_rank(True)
        elif strategy.written:  # failed in megatron's metadata.json write (rank 0): answer its barrier
            dist.barrier()
    except Exception:  # a peer is gone already: nothing to release
        pass


def write_sharded(state: dict, directory: Path) -> None:
    """``dist_checkpointing.save(state, directory)`` from this process; collective.

    On any failure every rank raises CheckpointError with the reason (the caller removes the directory).
    """
    from megatron_prune.checkpoint.megatron import CheckpointError

    strategy = InProcessTorchDistSave()
    message: Optional[str] = None
    stop = None
    try:
        dist_checkpointing.save(state, str(directory), sharded_strategy=strategy)
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        stop = stop_inside(e)
        if stop is not None:
            message = f"stopped by {stop.reason}"
        elif not isinstance(e, _PeerFailed):
            message = explain_write_error(e, directory)
        _release_peers(strategy)
        message = message or "__peer__"
    messages = [message]
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    failed = [(rank, m) for rank, m in enumerate(messages) if m]
    if failed:
        real = [(rank, m) for rank, m in failed if m != "__peer__"] or failed
        rank, m = real[0]
        if stop is not None:  # a stop signal, not a fault: the caller removes the partial write and stops
            raise stop
        raise CheckpointError(m if m != "__peer__" else f"writing {directory} failed on rank {rank}")


def _shard_problems(directory: Path) -> list[str]:
    """Shard files that are missing or shorter than the .metadata says (the usual damage: a copy cut short)."""
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as e:
        return [f"{directory / '.metadata'} is unreadable ({type(e).__name__}: {e})"]
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(need.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"checkpoint shard {path} is missing")
        elif path.stat().st_size < size:
            problems.append(f"checkpoint shard {path} is truncated ({path.stat().st_size} bytes, "
                            f"the metadata needs {size})")
    return problems


def _common_state_in_shards(directory) -> bool:
    """megatron-core 0.19+ writes no common.pt and no 'common_backend' in metadata.json (runtime/compat.py)."""
    import json

    try:
        return "common_backend" not in json.loads((Path(directory) / "metadata.json").read_text())
    except (OSError, ValueError):
        return False


def written_by_newer_megatron(error: BaseException, directory) -> Optional[str]:
    """The one-line explanation when ``error`` is megatron-core < 0.19 failing on a checkpoint that 0.19+ wrote
    (no common.pt: the common state is inside the shards); None for any other error."""
    last = _root_causes(error)[-1]
    if not (isinstance(last, FileNotFoundError) and "common.pt" in str(last) and _common_state_in_shards(directory)):
        return None
    import megatron.core

    return (f"could not read checkpoint {directory}: it has no common.pt, which megatron-core "
            f"{megatron.core.__version__} needs: it was written by megatron-core 0.19 or later (which keeps the "
            "common state inside the shards); read it with megatron-core >= 0.19, or convert it there to Hugging "
            "Face (`megatron-prune convert CKPT HF_DIR`) and import that here")


def read_sharded(state: dict, directory: Path) -> dict:
    """``dist_checkpointing.load(state, directory)``; a damaged checkpoint raises CheckpointError naming the
    damaged file (every rank: torch gathers read failures before raising)."""
    from megatron_prune.checkpoint.megatron import CheckpointError

    try:
        return dist_checkpointing.load(state, str(directory))
    except (Exception, CheckpointException) as e:  # megatron and torch raise many types for damaged files
        stop = stop_inside(e)
        if stop is not None:  # a stop signal during the read, not damage
            raise stop from None
        problems = _shard_problems(Path(directory))
        last = _root_causes(e)[-1]
        newer = written_by_newer_megatron(e, directory)
        if problems:
            reason = "; ".join(problems)
        elif newer:
            raise CheckpointError(newer) from None
        else:
            reason = f"it is corrupt or does not match the model ({type(last).__name__}: {str(last)[:300]})"
        raise CheckpointError(f"could not read checkpoint {directory}: {reason}; restore it from a copy or "
                              f"re-create it") from None
