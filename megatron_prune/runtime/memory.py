"""Memory per rank of a training or distillation layout, from the shapes alone (no model is built).

Used by `megatron-prune plan` to refuse a layout before a job waits in a queue, and to rank the layouts
that fit. The estimate is for the most loaded rank: pipeline stage 0 holds the embedding and, in 1F1B,
the activations of the most micro-batches in flight; the last stage holds the output layer and the logits.

Bytes per parameter follow megatron-core's mixed-precision recipe: bf16 weights, fp32 gradient buffer
(grad_reduce_in_fp32), fp32 master weights + Adam m and v in the optimizer (12 bytes, sharded over DP with
the distributed optimizer). In fp32 there is no master copy (weights 4 + grads 4 + Adam 8).

Activations are counted tensor by tensor from what a Llama-style layer (RMSNorm, GQA attention with RoPE,
SwiGLU MLP, no dropout) keeps for its backward pass, per layer and micro-batch, with activation size e,
s = seq_len / cp, t = TP, t_sp = t with sequence parallelism else 1 (a = heads, g = query groups):

    Transformer Engine spec with a fused attention kernel (GPU):
      layer input, norm output, MLP norm input, its output       4*s*b*h*e / t_sp
      q, k, v after RoPE, attention output                      s*b*kv*(2a + 2g)*e / t
      fc1 output (gate and up) and fc2 input                    3*s*b*f*e / t
    megatron's local spec, unfused attention (the CPU path; measured with saved_tensors_hooks in the tests):
      layer input, norm outputs and their copies, residual      6*s*b*h*e / t_sp
      q and k, v repeated to every head, attention output       4*s*b*a*kv*e / t
      fc1 output, its SiLU, product, fc2 input                  5*s*b*f*e / t
      attention probabilities                                   a*s*s*b*e / t
    (without the gate, both f-terms shrink to 2: fc1 output and activation output). Selective recomputation drops
    the attention probabilities; full recomputation keeps only each layer's input plus one layer's activations
    during its recompute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.distill.losses import KL_CHUNK_ELEMENTS  # rows x vocab-shard elements per KL chunk
from megatron_prune.runtime.stages import split_for

GiB = 1024 ** 3
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class Layout:
    """How a training job is laid out. ``num_microbatches`` per step and DP replica (global batch / (mbs * dp))."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int = 1
    cp: int = 1  # context parallel: each rank holds seq_len / cp of every sequence
    micro_batch_size: int = 1
    num_microbatches: int = 1
    seq_len: int = 4096
    sequence_parallel: Optional[bool] = None  # None: on when tp > 1 (as every large-scale recipe does)
    recompute: str = "none"  # none | selective | full
    distributed_optimizer: bool = True
    implementation: str = "te"  # te: Transformer Engine with fused attention (GPU); local: megatron's local spec (CPU)

    @property
    def sp(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def check(self, arch: ModelArch) -> None:
        arch.check_parallel(self.tp, self.pp)
        if self.seq_len % (2 * self.cp) and self.cp > 1:
            raise ArchError(f"seq_len={self.seq_len} must be divisible by 2 x CP = {2 * self.cp} (load balancing)")
        if self.implementation not in ("te", "local"):
            raise ArchError(f"implementation must be te or local, got {self.implementation!r}")
        if self.recompute not in RECOMPUTE:
            raise ArchError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {self.recompute!r}")
        try:  # stages may differ in depth (runtime/stages.py); with VPP each holds a multiple of VPP layers
            split_for(arch.num_layers, self.pp, self.vpp)
        except ValueError as e:
            raise ArchError(f"num_layers={arch.num_layers} at PP={self.pp} VPP={self.vpp}: {e}") from e
        if self.vpp > 1 and self.num_microbatches % self.pp:
            raise ArchError(f"the interleaved schedule needs micro-batches per step ({self.num_microbatches}) "
                            f"divisible by PP={self.pp}")


@dataclass
class MemoryEstimate:
    """Bytes on the most loaded rank, by kind."""

    student_weights: int
    student_grads: int
    optimizer: int
    activations: int
    logits: int
    teacher_weights: int
    teacher_activations: int
    overhead: int
    stage: int = 0  # the pipeline stage of that rank (not a byte count)

    def _parts(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "stage"}

    @property
    def total(self) -> int:
        return sum(self._parts().values())

    def rows(self) -> list[tuple[str, float]]:
        return [(k.replace("_", " "), v / GiB) for k, v in self._parts().items()] + [("total", self.total / GiB)]


def _layers_per_stage(arch: ModelArch, pp: int, stage: int, vpp: int = 1) -> int:
    return split_for(arch.num_layers, pp, vpp)[stage]


def stage_param_count(arch: ModelArch, tp: int, pp: int, stage: int, vpp: int = 1) -> int:
    """Parameters held by one TP rank of pipeline stage ``stage`` (padded vocab, replicated norms counted once)."""
    h = arch.hidden_size
    norm = h * (2 if arch.normalization == "LayerNorm" else 1)
    per_layer_sharded = arch.layer_param_count() - 2 * norm
    n = _layers_per_stage(arch, pp, stage, vpp) * (per_layer_sharded // tp + 2 * norm)
    embed = arch.padded_vocab_size * h // tp
    if stage == 0:
        n += embed
    if stage == pp - 1:
        n += norm + (0 if arch.tie_embeddings and pp == 1 else embed)  # tied at PP>1: a copy on the last stage
    return n


def layer_activation_bytes(arch: ModelArch, layout: Layout, act_bytes: int) -> int:
    """Activations one layer keeps for backward, for one micro-batch, on one TP rank (see the module doc)."""
    s, b, h, f, kv = (layout.seq_len // layout.cp, layout.micro_batch_size, arch.hidden_size, arch.ffn_hidden_size,
                      arch.kv_channels)
    a, g, t = arch.num_attention_heads, arch.num_query_groups, layout.tp
    t_sp = t if layout.sp else 1
    if layout.implementation == "te":
        n = 4 * s * b * h / t_sp + s * b * kv * (2 * a + 2 * g) / t + (3 if arch.gated else 2) * s * b * f / t
    else:
        n = 6 * s * b * h / t_sp + 4 * s * b * a * kv / t + (5 if arch.gated else 2) * s * b * f / t
        if layout.recompute == "none":
            n += a * s * s * b / t
    return int(n * act_bytes)


def estimate_memory(student: ModelArch, layout: Layout, teacher: Optional[ModelArch] = None,
                    precision: str = "bf16", fp8_teacher: bool = False, overhead_gib: float = 0.0) -> MemoryEstimate:
    """Peak bytes on the most loaded rank of a training (``teacher`` None) or distillation step: the larger of
    pipeline stage 0 (embedding, the most micro-batches in flight) and the last stage (output layer, logits)."""
    if precision not in PRECISIONS:
        raise ArchError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    layout.check(student)
    if teacher is not None:
        layout.check(teacher)
    # stage 0 holds the most micro-batches in flight and the embedding, the last stage the logits; with stages of
    # unequal depth (runtime/stages.py) a deeper middle stage can hold more, so 1F1B looks at every stage
    stages = {0, layout.pp - 1} if layout.vpp > 1 else range(layout.pp)
    return max((_stage_memory(student, layout, teacher, precision, fp8_teacher, overhead_gib, st) for st in stages),
               key=lambda m: m.total)


def _in_flight(layout: Layout, stage: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at its peak. 1F1B: min(m, PP - stage). The
    interleaved schedule (Narayanan et al. 2021), in whole-stage units: PP (1 + (PP-1)/(PP VPP)) on stage 0,
    ((VPP-1) PP + 1) / VPP on the last."""
    pp, vpp = layout.pp, layout.vpp
    if vpp > 1:
        return pp * (1 + (pp - 1) / (pp * vpp)) if stage == 0 else ((vpp - 1) * pp + 1) / vpp
    return min(layout.num_microbatches, pp - stage)


def _stage_memory(student: ModelArch, layout: Layout, teacher: Optional[ModelArch], precision: str,
                  fp8_teacher: bool, overhead_gib: float, stage: int) -> MemoryEstimate:
    e = 2 if precision == "bf16" else 4
    stage_params = stage_param_count(student, layout.tp, layout.pp, stage, layout.vpp)
    if precision == "bf16":
        weights, grads, opt = 2 * stage_params, 4 * stage_params, 12 * stage_params
    else:
        weights, grads, opt = 4 * stage_params, 4 * stage_params, 8 * stage_params
    if layout.distributed_optimizer:  # sharded over the data-parallel x context-parallel group
        opt = math.ceil(opt / (layout.dp * layout.cp))

    L = _layers_per_stage(student, layout.pp, stage, layout.vpp)
    t_sp = layout.tp if layout.sp else 1
    s, b = layout.seq_len // layout.cp, layout.micro_batch_size
    layer = layer_activation_bytes(student, layout, e)
    if layout.recompute == "full":
        per_mb = L * s * b * student.hidden_size * e // t_sp
        transient = layer
    else:
        per_mb = L * layer
        transient = 0
    stage_input = s * b * (student.hidden_size + (teacher.hidden_size if teacher else 0)) * e // t_sp
    activations = int(_in_flight(layout, stage) * (per_mb + stage_input) + transient)

    # logits on the last stage (one micro-batch at a time; measured on the CPU, see docs/plan.md). Training:
    # the logits and the cross entropy's saved fp32 softmax. Distillation (distill/losses.py): student and
    # teacher logits, the KL's two fp32 working copies, and its chunked exp/difference temporaries (four
    # buffers of at most KL_CHUNK_ELEMENTS each).
    logits = 0
    if stage == layout.pp - 1:
        n = s * b * student.padded_vocab_size // layout.tp
        if teacher is None:
            logits = n * (e + 4)
        else:
            logits = 2 * n * e + 2 * n * 4 + 4 * min(n, KL_CHUNK_ELEMENTS) * 4

    t_weights = t_acts = 0
    if teacher is not None:
        t_weights = stage_param_count(teacher, layout.tp, layout.pp, stage, layout.vpp) * (1 if fp8_teacher else e)
        # forward only, no grad: a layer's input and output plus its transient working set, about two
        # layers' worth of saved activations at most (measured on the CPU)
        t_acts = 2 * layer_activation_bytes(teacher, Layout(**{**asdict(layout), "recompute": "none"}), e)
        # The teacher's forward of a micro-batch runs before the student's, so its working set and the
        # student's activations plus logits of that micro-batch are never alive together: count only what
        # the teacher phase adds beyond the student phase.
        per_mb_student = activations / max(_in_flight(layout, stage), 1) + logits
        t_acts = max(0, int(t_acts - per_mb_student))
    return MemoryEstimate(student_weights=weights, student_grads=grads, optimizer=opt, activations=activations,
                          logits=logits, teacher_weights=t_weights, teacher_activations=t_acts,
                          overhead=int(overhead_gib * GiB), stage=stage)


def candidate_layouts(student: ModelArch, num_gpus: int, gpus_per_node: int = 8, teacher: Optional[ModelArch] = None,
                      **layout_kwargs) -> list[Layout]:
    """Every (TP, PP) with TP within a node and both dividing the shapes, DP = the remaining GPUs.

    ``num_gpus`` counts the GPUs of one context-parallel slice (the world size divided by CP).
    """
    out = []
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and num_gpus % t == 0]
    for tp in tps:
        for pp in range(1, student.num_layers + 1):
            if num_gpus % (tp * pp):
                continue
            lay = Layout(tp=tp, pp=pp, dp=num_gpus // (tp * pp), **layout_kwargs)
            try:
                lay.check(student)
                if teacher is not None:
                    lay.check(teacher)
            except ArchError:
                continue
            out.append(lay)
    return out
