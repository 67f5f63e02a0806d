"""Multi-rank launches never race for a port (a flaky EADDRINUSE on a busy machine)."""

from __future__ import annotations

import errno
import os
import socket
import threading

from megatron_prune.runtime.spawn import run_ranks


def _grab_port_then_all_reduce(rank_value: int):
    """Play the other process on a busy machine: try to take the rendezvous port before joining it."""
    import torch
    import torch.distributed as dist

    from megatron_prune.runtime import init_distributed

    port = int(os.environ["MASTER_PORT"])
    with socket.socket() as thief:
        try:
            thief.bind(("127.0.0.1", port))
            stolen = True
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e
            stolen = False
    init_distributed()
    t = torch.tensor([float(rank_value + dist.get_rank())])
    dist.all_reduce(t)
    return stolen, t.item(), dist.get_world_size()


def test_rendezvous_port_is_held_before_the_ranks_start():
    """The port handed to the ranks is already bound (by the launcher's store): nobody can take it first.

    With a port that is only picked (bound and released) in advance, the first rank to run finds it free.
    """
    results = run_ranks(_grab_port_then_all_reduce, 2, 10, threads=1)
    assert [r[0] for r in results] == [False, False]
    assert [r[1:] for r in results] == [(21.0, 2), (21.0, 2)]  # (10+0) + (10+1) on both ranks


def test_many_concurrent_launches_all_succeed():
    """Several launches at once (as when test files run side by side) each get their own rendezvous."""
    results, errors = {}, []

    def launch(i):
        try:
            results[i] = run_ranks(_grab_port_then_all_reduce, 2, 100 * i, threads=1)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=launch, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(3):
        assert [r[1] for r in results[i]] == [200.0 * i + 1] * 2


def test_single_process_needs_no_port(monkeypatch):
    """One process (no launcher) starts without choosing or binding any port."""
    import torch.distributed as dist

    from megatron_prune.runtime import destroy, init_distributed

    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "SLURM_PROCID", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    bound = []
    real_bind = socket.socket.bind

    def spy_bind(self, addr):
        bound.append(addr)
        return real_bind(self, addr)

    monkeypatch.setattr(socket.socket, "bind", spy_bind)
    try:
        layout = init_distributed()
        assert layout.world_size == 1 and dist.get_rank() == 0
    finally:
        destroy()
    assert bound == []
