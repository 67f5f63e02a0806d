"""Distributed start-up from torchrun, Slurm's srun, or a plain single process.

One entry point, :func:`init_distributed`, reads the launcher's environment, starts torch.distributed
(gloo on CPU, NCCL on GPU) and megatron's ``parallel_state`` for the requested TP/PP; data parallelism
is whatever is left of the world size.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_prune.runtime.cpu_compat import apply_cpu_compat
from megatron_prune.runtime.device import on_gpu as _on_gpu


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the TP x PP x DP grid."""

    tp: int
    pp: int
    dp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    vpp: int = 1  # virtual pipeline stages (model chunks) per rank: megatron's interleaved schedule when > 1
    ep: int = 1  # expert-parallel size (MoE): the experts split over this many data-parallel ranks

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _slurm_master_addr(env) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    return env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")


def detect_launch_env(environ=None) -> LaunchEnv:
    """Read rank/world/master from torchrun's or srun's variables; a single process otherwise."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    # SLURM_STEP_ID is set inside an srun step, not in the batch script itself.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_NTASKS", env.get("SLURM_STEP_NUM_TASKS", "1"))),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _slurm_master_addr(env),
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    # a single process needs no rendezvous and so no port (0): see init_distributed
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)), "single")


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 for a single process), before any process group."""
    return detect_launch_env().rank


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, vpp: int = 1, ep: int = 1) -> ParallelLayout:
    """Start torch.distributed and megatron's model-parallel groups for ``tp`` x ``pp``.

    ``ep`` > 1 (Mixture of Experts): each expert lives on one of ``ep`` ranks of the data-parallel group (the
    rest of the model is replicated there), split over TP like a dense MLP (expert-tensor-parallel size = TP).
    ``vpp`` > 1 splits each pipeline rank's layers into that many virtual stages (model chunks, see
    model.build_chunks) run by megatron's interleaved 1F1B schedule. Safe to call again with the same
    layout; a different layout re-creates megatron's groups.
    """
    from megatron_prune.runtime.stages import check_virtual_stages

    if vpp < 1:
        raise ValueError(f"--vpp must be at least 1, got {vpp}")
    check_virtual_stages(pp, vpp)
    on_gpu = _on_gpu()  # the process's one CPU/GPU decision; DeviceError when a GPU is expected but unusable
    if not on_gpu:
        apply_cpu_compat()  # megatron-core's own view of torch on the CPU (nothing else in the process sees it)
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    launch = detect_launch_env()
    if not dist.is_initialized():
        if on_gpu:  # modulo: with --gpus-per-task=1 every task sees a single device 0
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        if launch.launcher == "single":
            # an in-memory store: no port is picked, so none can be lost to another process on a busy machine
            rendezvous = {"store": dist.HashStore()}
        else:
            # an explicit init_method (not MASTER_* in os.environ), so child processes of this one that start
            # their own megatron-prune do not inherit our rendezvous port. Under torchrun (and run_ranks) the
            # launcher already holds a store on that port and every rank connects to it as a client
            # (TORCHELASTIC_USE_AGENT_STORE): no port is chosen and bound later, so there is no race.
            rendezvous = {"init_method": f"tcp://{launch.master_addr}:{launch.master_port}"}
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=int(os.environ.get("MP_DIST_TIMEOUT_MIN", "30"))),
            **rendezvous,
        )
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP*PP = {tp}*{pp}; launch {tp * pp}*k processes "
            f"(e.g. torchrun --nproc-per-node {tp * pp}) or change --tp/--pp"
        )
    if ep < 1 or world % (tp * pp * ep) != 0:
        raise ValueError(f"world size {world} is not divisible by TP*PP*EP = {tp}*{pp}*{ep}; launch "
                         f"{tp * pp * ep}*k processes or change --ep")
    if ps.model_parallel_is_initialized():
        if (
            ps.get_tensor_model_parallel_world_size() != tp
            or ps.get_pipeline_model_parallel_world_size() != pp
            or (ps.get_virtual_pipeline_model_parallel_world_size() or 1) != vpp
            or ps.get_expert_model_parallel_world_size() != ep
        ):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                     expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    return ParallelLayout(
        tp=tp,
        pp=pp,
        dp=ps.get_data_parallel_world_size(),
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        vpp=vpp,
        ep=ep,
    )


def destroy() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    """Global rank 0; before torch.distributed starts, the launcher's RANK says (torchrun sets it)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def log0(*args, **kwargs) -> None:
    """print() on global rank 0 only."""
    if is_rank0():
        kwargs.setdefault("file", sys.stdout)
        print(*args, flush=True, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce; collective over the world)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
