"""Storage faults and killed jobs: one clear error on every rank, no partial output, no process left behind."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from distributed_utils import run_ranks


def _convert(hf_dir, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "tiny"
    run_ranks(_convert, 1, tiny_llama_dir, out)
    return out


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_on_a_full_disk(ckpt, out_root):
    """At DP2, make the disk 'fill up' at three points of a save (each on one rank only) and read back a
    truncated checkpoint; returns this rank's error messages."""
    from unittest import mock

    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from megatron_prune.checkpoint import CheckpointError, load_model, save_checkpoint
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    rank = dist.get_rank()
    model, meta = load_model(ckpt)
    real_write_item = dcp_fs._write_item

    def write_half_then_fail(*args, **kwargs):  # a shard write that runs out of room part-way
        stream = next(a for a in args if hasattr(a, "write"))
        stream.write(b"\0" * 100)
        _enospc()

    faults = {  # where the disk fills up -> the rank it happens on
        "shard": (mock.patch.object(dcp_fs, "_write_item", write_half_then_fail), 0),  # a .distcp file
        # megatron's common state: 0.16 torch.save's it to common.pt on rank 0 before the shards; 0.17+ torch.save's
        # it into the shards' state on every rank (a failure on rank 0 only must not leave rank 1 in dcp_save)
        "common": (mock.patch("megatron.core.dist_checkpointing.strategies.common.torch.save", _enospc), 0),
        "config": (mock.patch("megatron.core.dist_checkpointing.serialization.save_config", _enospc), 0),
        "ours": (mock.patch("megatron_prune.checkpoint.megatron.CheckpointMeta.to_json", _enospc), 0),
    }
    messages = {}
    for name, (patch, fail_rank) in faults.items():
        out = Path(out_root) / name
        with (patch if rank == fail_rank else mock.patch.object(dcp_fs, "_write_item", real_write_item)):
            try:
                save_checkpoint(model, meta.arch, out)
                messages[name] = None
            except CheckpointError as e:
                messages[name] = str(e)
        dist.barrier()
        messages[name + "_left"] = sorted(p.name for p in Path(out_root).iterdir()
                                          if p.name.startswith((name, f".{name}")))
    # a truncated shard, read at DP2: every rank names the file
    damaged = Path(out_root) / "damaged"
    if rank == 0:
        shutil.copytree(ckpt, damaged)
        shard = sorted(damaged.glob("*.distcp"))[0]
        os.truncate(shard, shard.stat().st_size // 2)
    dist.barrier()
    try:
        load_model(damaged)
        messages["truncated"] = None
    except CheckpointError as e:
        messages["truncated"] = str(e)
    return messages


def test_a_full_disk_or_a_truncated_shard_is_one_clear_error_on_every_rank(ckpt, tmp_path):
    results = run_ranks(_save_on_a_full_disk, 2, ckpt, tmp_path, timeout=600)
    for rank, messages in enumerate(results):
        for fault in ("shard", "common", "config", "ours"):
            assert messages[fault] is not None, (rank, fault)  # every rank raised, none hung
            assert messages[fault + "_left"] == [], (rank, fault)  # no output, no hidden .tmp
            if rank == 0 or fault != "ours":  # the cause reaches every rank (ours: "failed on rank 0")
                assert "No space left on device" in messages[fault], (rank, fault, messages[fault])
        shard = sorted((tmp_path / "damaged").glob("*.distcp"))[0]
        assert f"checkpoint shard {shard} is truncated" in messages["truncated"], messages["truncated"]


def _processes_in_session(sid: int) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid:
                found.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')[:120]}")
        except (OSError, ProcessLookupError):
            pass
    return found


VICTIM = textwrap.dedent("""
    import sys
    from megatron_prune.checkpoint import load_model, save_checkpoint
    from megatron_prune.checkpoint.nemo import save_nemo_checkpoint
    from megatron_prune.runtime import init_distributed

    if __name__ == "__main__":
        init_distributed(1, 1)
        model, meta = load_model(sys.argv[1])
        for i in range(1000):
            print("saving", flush=True)
            {writer}(model, meta.arch, sys.argv[2], overwrite=True)
""")


@pytest.mark.parametrize("writer", ["save_checkpoint", "save_nemo_checkpoint"])
def test_a_job_killed_while_saving_leaves_no_process_behind(ckpt, tmp_path, writer):
    """SIGKILL in the middle of a checkpoint save (ours or NeMo 2): nothing of the job (writer helpers, managers,
    forked copies) may outlive it. The job runs in a session of its own; afterwards that session must be empty."""
    script = tmp_path / "victim.py"
    script.write_text(VICTIM.replace("{writer}", writer))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    saves = 0
    for line in proc.stdout:
        saves += line.startswith("saving")
        if saves == 3:  # the third save has just begun
            time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.time() + 5
    while _processes_in_session(proc.pid) and time.time() < deadline:  # orphans would not go away
        time.sleep(0.2)
    left = _processes_in_session(proc.pid)
    for entry in left:  # clean up before failing
        os.kill(int(entry.split(":")[0]), signal.SIGKILL)
    assert left == [], f"processes outlived the killed job: {left}"


def test_a_stop_signal_inside_a_read_is_a_stop_not_damage(tmp_path, monkeypatch):
    """torch's checkpoint code gathers every exception of a read, a signal handler's StopRequested too, into a
    CheckpointException: the reader must report the stop (exit 75, run again), not a corrupt checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_prune.checkpoint import writer
    from megatron_prune.checkpoint.megatron import CheckpointError
    from megatron_prune.runtime.stop import StopRequested

    def load_stopped(state, directory):
        try:
            raise StopRequested("SIGTERM")
        except StopRequested as e:
            raise CheckpointException("load", {0: (e, None)}) from None

    def load_damaged(state, directory):
        raise CheckpointException("load", {0: (ValueError("bad bytes"), None)})

    monkeypatch.setattr(writer.dist_checkpointing, "load", load_stopped)
    with pytest.raises(StopRequested, match="stopped by SIGTERM"):
        writer.read_sharded({}, tmp_path)
    monkeypatch.setattr(writer.dist_checkpointing, "load", load_damaged)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        writer.read_sharded({}, tmp_path)
