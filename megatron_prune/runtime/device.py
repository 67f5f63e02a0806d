"""The one CPU/GPU decision of a process, made once: :func:`on_gpu`.

Every module that needs to know (distributed init, the model build, the transformer config, the trainer's dtype,
teacher logits) asks this function instead of ``torch.cuda.is_available()``.

The rule:

* ``MEGATRON_PRUNE_DEVICE=cpu`` runs on the CPU, ``=cuda`` (or ``gpu``) requires CUDA; unset (or ``auto``):
* CUDA works (``torch.cuda.is_available()``): the GPU;
* CUDA does not work but this process was clearly meant to use a GPU: stop with :class:`DeviceError`, one line
  that names the cause and the fix, instead of silently running a GPU job on the CPU. "Meant to" is: torch is a
  CUDA build, and either ``CUDA_VISIBLE_DEVICES`` names a device, or Slurm gave the job/step GPUs
  (``SLURM_STEP_GPUS``, ``SLURM_JOB_GPUS``, ``SLURM_GPUS*``), or the process was started by torchrun or srun on a
  machine with an NVIDIA driver (``/dev/nvidia*`` or ``nvidia-smi``);
* otherwise (a CPU-only machine, a CPU build of torch): the CPU.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

ENV = "MEGATRON_PRUNE_DEVICE"
_NO_DEVICE = {"", "-1", "none", "nodevfiles", "void"}
_SLURM_GPU_IDS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")  # the GPU indices given ("0" is GPU 0)
_SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_NODE",
                     "SLURM_GPUS_PER_SOCKET")  # counts, "[type:]n" ("0" is none)

_decision: Optional[bool] = None


class DeviceError(ValueError):
    """This process was meant to run on a GPU and cannot (printed by the CLI as one line, by rank 0 only)."""

    rank0_only = True


def _nvidia_driver_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def cuda_expected(environ: Mapping[str, str], nvidia_present=_nvidia_driver_present) -> Optional[str]:
    """Why this environment expects a GPU (a phrase for the message), or None."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() not in _NO_DEVICE:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for var in _SLURM_GPU_IDS + _SLURM_GPU_COUNTS:
        value = environ.get(var, "").strip()
        if not value or value.lower() in ("none", "(null)", "n/a"):
            continue
        if var in _SLURM_GPU_COUNTS and value.rsplit(":", 1)[-1].strip() in ("0", ""):
            continue
        return f"Slurm gave this job GPUs ({var}={value})"
    launched = ("RANK" in environ and "WORLD_SIZE" in environ) or ("SLURM_PROCID" in environ
                                                                     and "SLURM_STEP_ID" in environ)
    if launched and nvidia_present():
        return "torchrun/srun on a machine with an NVIDIA driver"
    return None


def _cuda_failure() -> str:
    """torch's own reason why CUDA does not start (its first line), when it gives one."""
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - any failure is the reason we report
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f": {line}"
    return ""


def decide(environ: Optional[Mapping[str, str]] = None, cuda_available=None, cuda_build=None,
           nvidia_present=_nvidia_driver_present) -> bool:
    """True for the GPU, False for the CPU; raises DeviceError (see the module docstring). Pure apart from the
    defaults: the environment, ``torch.cuda.is_available()``, ``torch.version.cuda`` (``cuda_build=""``: a CPU
    build)."""
    env = os.environ if environ is None else environ
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    wanted = env.get(ENV, "auto").strip().lower() or "auto"
    if wanted == "cpu":
        return False
    if wanted in ("cuda", "gpu"):
        if not available:
            raise DeviceError(f"{ENV}={env[ENV]} but torch cannot use CUDA (torch.cuda.is_available() is False"
                              f"{_cuda_failure()}); fix the GPU driver/CUDA install or set {ENV}=cpu")
        return True
    if wanted != "auto":
        raise DeviceError(f"{ENV}={env[ENV]} is not one of cpu, cuda, auto")
    if available:
        return True
    built_for = torch.version.cuda if cuda_build is None else cuda_build
    if not built_for:
        return False  # a CPU build of torch: the CPU is what was installed
    why = cuda_expected(env, nvidia_present)
    if why is None:
        return False
    raise DeviceError(
        f"a GPU is expected here ({why}) but torch {torch.__version__} (built for CUDA {built_for}) cannot use it"
        f"{_cuda_failure() if cuda_available is None else ''} -- usually an NVIDIA driver older than that CUDA, or "
        f"no GPU in the allocation; fix the driver or the allocation, or set {ENV}=cpu to run on the CPU anyway")


def on_gpu() -> bool:
    """Whether this process runs on CUDA. Decided once per process (see :func:`decide`)."""
    global _decision
    if _decision is None:
        _decision = decide()
    return _decision


def device() -> torch.device:
    """This rank's device: the current CUDA device on the GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def _reset() -> None:
    """Forget the decision (tests)."""
    global _decision
    _decision = None
