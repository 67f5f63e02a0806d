"""`megatron-prune plan`: memory per rank of a distillation (or training) layout, before anything is queued.

Prints the breakdown for the layout asked for (and refuses it when it does not fit the GPU), then the
layouts of the same GPU count that fit, best first (least model parallelism, then least memory).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.runtime.memory import GiB, Layout, MemoryEstimate, candidate_layouts, estimate_memory

SHAPE_KEYS = {"layers": "num_layers", "hidden": "hidden_size", "ffn": "ffn_hidden_size",
              "heads": "num_attention_heads", "groups": "num_query_groups", "query_groups": "num_query_groups",
              "vocab": "vocab_size", "kv_channels": "kv_channels"}


class PlanDoesNotFit(ArchError):
    """The asked layout needs more memory than the GPU has (the message says how much and what fits)."""


def parse_shape(spec: str) -> ModelArch:
    """A checkpoint of ours, a Hugging Face directory, or ``layers=80,hidden=8192,ffn=28672,heads=64,groups=8,
    vocab=128256`` (also ``tied=1``)."""
    p = Path(spec)
    if p.exists():
        from megatron_prune.checkpoint.megatron import METADATA_FILE

        if (p / METADATA_FILE).is_file():
            from megatron_prune.checkpoint import read_meta

            return read_meta(p).arch
        if (p / "config.json").is_file():
            from megatron_prune.checkpoint.hf import read_hf_config

            return ModelArch.from_hf_config(read_hf_config(p))
        raise ArchError(f"{spec} is neither a megatron-prune checkpoint nor a Hugging Face directory (config.json)")
    if "=" not in spec:
        raise FileNotFoundError(f"model {spec!r} not found: give a checkpoint, a Hugging Face directory, or a shape "
                                "like layers=32,hidden=4096,ffn=14336,heads=32,groups=8,vocab=128256")
    values: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key in ("tied", "tie_embeddings"):
            values["tie_embeddings"] = value.lower() in ("1", "true", "yes")
            continue
        if key not in SHAPE_KEYS:
            raise ArchError(f"unknown shape key {key!r} in {spec!r}; use {', '.join(SHAPE_KEYS)}, tied")
        if SHAPE_KEYS[key] in values:
            raise ArchError(f"shape key {key!r} given twice in {spec!r}")
        try:
            values[SHAPE_KEYS[key]] = int(value)
        except ValueError:
            raise ArchError(f"shape key {key!r} needs an integer, got {value!r}") from None
    missing = {"num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size"} - set(values)
    if missing:
        raise ArchError(f"shape {spec!r} lacks {', '.join(k for k, v in SHAPE_KEYS.items() if v in missing)}")
    values.setdefault("num_query_groups", values["num_attention_heads"])
    return ModelArch(**values)


def format_estimate(est: MemoryEstimate, gpu_gib: float) -> str:
    lines = [f"  {name:<20} {gib:8.2f} GiB" for name, gib in est.rows()]
    verdict = "fits" if est.total <= gpu_gib * GiB else "DOES NOT FIT"
    lines.append(f"  {'GPU memory':<20} {gpu_gib:8.2f} GiB  -> {verdict}")
    return "\n".join(lines)


def describe(lay: Layout) -> str:
    return (f"TP{lay.tp} PP{lay.pp}" + (f" VPP{lay.vpp}" if lay.vpp > 1 else "")
            + (f" CP{lay.cp}" if lay.cp > 1 else "") + f" DP{lay.dp}"
            + (" SP" if lay.sp else "") + (f" recompute={lay.recompute}" if lay.recompute != "none" else ""))


def plan(student: str, teacher: Optional[str] = None, tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1, dp: int = 1,
         micro_batch_size: int = 1, global_batch_size: Optional[int] = None, seq_len: int = 4096,
         precision: str = "bf16", fp8_teacher: bool = False, distributed_optimizer: bool = True,
         recompute: str = "none", gpu_memory_gib: float = 80.0, overhead_gib: float = 2.0,
         gpus_per_node: int = 8, top: int = 5, implementation: str = "te") -> dict:
    """Estimate the asked layout, list the layouts of the same GPU count that fit; raise PlanDoesNotFit if it
    does not fit. Returns {"asked": (layout, estimate), "fitting": [(layout, estimate), ...]}."""
    s_arch = parse_shape(student)
    t_arch = parse_shape(teacher) if teacher else None
    if t_arch is not None and t_arch.vocab_size != s_arch.vocab_size:
        raise ArchError(f"teacher vocab {t_arch.vocab_size} != student vocab {s_arch.vocab_size}: distillation "
                        "compares logits token by token, so both need the same tokenizer")
    for name, value in (("--tp", tp), ("--pp", pp), ("--vpp", vpp), ("--cp", cp), ("--dp", dp),
                        ("--micro-batch-size", micro_batch_size), ("--seq-len", seq_len)):
        if value < 1:
            raise ArchError(f"{name} must be >= 1, got {value}")
    if global_batch_size is not None and global_batch_size < 1:
        raise ArchError(f"--global-batch-size must be >= 1, got {global_batch_size}")
    if gpus_per_node < 1:
        raise ArchError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")
    if gpu_memory_gib <= 0:
        raise ArchError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib}")
    if overhead_gib < 0:
        raise ArchError(f"--overhead-gib must be >= 0, got {overhead_gib}")
    from megatron_prune import inputs
    from megatron_prune.runtime.stages import check_virtual_stages

    check_virtual_stages(pp, vpp)
    inputs.arch_fits(s_arch, tp, pp, "STUDENT", vpp)
    if t_arch is not None:
        inputs.arch_fits(t_arch, tp, pp, "--teacher", vpp, main=False)
    gbs = global_batch_size or micro_batch_size * dp
    if gbs % (micro_batch_size * dp):
        raise ArchError(f"--global-batch-size {gbs} is not a multiple of micro batch {micro_batch_size} x DP {dp}")
    common = dict(micro_batch_size=micro_batch_size, seq_len=seq_len, recompute=recompute, cp=cp,
                  distributed_optimizer=distributed_optimizer, implementation=implementation)
    asked = Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, num_microbatches=gbs // (micro_batch_size * dp), **common)
    kwargs = dict(teacher=t_arch, precision=precision, fp8_teacher=fp8_teacher, overhead_gib=overhead_gib)
    est = estimate_memory(s_arch, asked, **kwargs)
    fitting = []
    for lay in candidate_layouts(s_arch, asked.world_size // cp, gpus_per_node, t_arch, **common):
        if gbs % (micro_batch_size * lay.dp):
            continue
        lay = replace(lay, num_microbatches=gbs // (micro_batch_size * lay.dp))
        e = estimate_memory(s_arch, lay, **kwargs)
        if e.total <= gpu_memory_gib * GiB:
            fitting.append((lay, e))
    fitting.sort(key=lambda le: (le[0].tp * le[0].pp, le[1].total))
    from megatron_prune.runtime import log0

    what = f"distill {t_arch.describe()} -> {s_arch.describe()}" if t_arch else f"train {s_arch.describe()}"
    log0(f"{what}\nseq {seq_len}, micro batch {micro_batch_size}, global batch {gbs}, {precision}"
         + (", FP8 teacher weights" if fp8_teacher else "")
         + (", distributed optimizer" if distributed_optimizer else "")
         + f", {overhead_gib:g} GiB fixed overhead per GPU (CUDA context, NCCL, allocator)\n\n"
         f"{describe(asked)} on {asked.world_size} GPUs, most loaded rank (pipeline stage {est.stage}):\n"
         f"{format_estimate(est, gpu_memory_gib)}\n")
    log0(f"layouts of {asked.world_size} GPUs that fit {gpu_memory_gib:g} GiB (least model parallelism first):")
    for lay, e in fitting[:top]:
        log0(f"  {describe(lay):<40} {e.total / GiB:8.2f} GiB")
    if not fitting:
        log0("  none: add GPUs, recompute activations (--recompute selective/full), shorten the sequence, "
             "or use FP8 teacher weights")
    if est.total > gpu_memory_gib * GiB:
        hint = f"; {describe(fitting[0][0])} fits ({fitting[0][1].total / GiB:.1f} GiB)" if fitting else ""
        raise PlanDoesNotFit(f"{describe(asked)} needs {est.total / GiB:.1f} GiB per GPU, more than the "
                             f"{gpu_memory_gib:g} GiB available{hint}")
    return {"asked": (asked, est), "fitting": fitting}
