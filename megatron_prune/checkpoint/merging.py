"""Merging checkpoints of one shape: SLERP of two, linear / task-arithmetic of N.

Streaming: the output model's shard is the only whole-model memory on a rank; input weights are read one
group of tensors (one decoder layer, or one other tensor) at a time from each sharded checkpoint, at the
current TP/PP, through megatron's dist_checkpointing (which reads only this rank's slices).

SLERP is per Hugging Face tensor, as mergekit computes it: a fused megatron tensor is split into the tensors
its family's parameter table names (linear_qkv into q/k/v, per query group; linear_fc1 into gate/up), and each
gets its own angle. The dot products and norms of a TP-split tensor are summed over the TP group, so a merge
at TP2 equals the one at TP1. A list of t values is interpolated over the layers as mergekit does (layer i of L
at i / (L - 1); the embedding, final norm and output layer at the list's start).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_prune.arch import ModelArch

PARALLEL_EPS = 0.9995  # |cos| above this: the tensors are (anti)parallel, interpolate linearly


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot: float, norm_a: float, norm_b: float) -> torch.Tensor:
    """SLERP of ``a`` and ``b`` (shards of two whole tensors whose dot product and norms are given)."""
    if norm_a == 0.0 or norm_b == 0.0:
        cos = 1.0
    else:
        cos = dot / (norm_a * norm_b)
    if abs(cos) > PARALLEL_EPS:
        return (1 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, cos)))
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b


def layer_t(t: float | Sequence[float], layer: Optional[int], num_layers: int) -> float:
    """The interpolation factor of one tensor: a constant, or a list interpolated linearly over the layers.

    Layer ``i`` sits at ``i / (num_layers - 1)`` along the list (at its end for a one-layer model); tensors
    outside the decoder layers (``layer=None``) at its start: mergekit's rule for gradients.
    """
    if isinstance(t, (int, float)):
        return float(t)
    ts = [float(x) for x in t]
    if len(ts) == 1:
        return ts[0]
    pos = 0.0 if layer is None else (layer / (num_layers - 1) if num_layers > 1 else 1.0)
    x = pos * (len(ts) - 1)  # position along the list
    i = min(int(x), len(ts) - 2)
    return ts[i] + (x - i) * (ts[i + 1] - ts[i])


def hf_blocks(x: torch.Tensor, name: str, arch: ModelArch) -> list[torch.Tensor]:
    """Views of ``x`` (this rank's shard of megatron parameter ``name``), one per Hugging Face tensor it holds.

    Fused q/k/v: this shard's query groups, each [q heads, k, v]; the q rows of every group form one view, and
    so on. Fused gate/up: the two halves. Anything else: ``x`` itself. Writing into a view writes into ``x``.
    """
    from megatron_prune.models import family_of

    try:
        row, _ = family_of(arch).param(name)
    except KeyError:
        return [x]
    if row.fused == "qkv":
        d, hpg = arch.kv_channels, arch.heads_per_group
        per_group = x.view(-1, (hpg + 2) * d, *x.shape[1:])
        return [per_group[:, : hpg * d], per_group[:, hpg * d: (hpg + 1) * d], per_group[:, (hpg + 1) * d:]]
    if row.fused == "gate_up" and arch.gated:
        return list(x.chunk(2, dim=0))
    return [x]


def check_same_shape(ckpts: Sequence[str]):
    """The common ModelArch of ``ckpts``; a clear error naming the differing fields otherwise."""
    from megatron_prune.checkpoint import CheckpointError, read_meta

    metas = [read_meta(c) for c in ckpts]
    for c, m in zip(ckpts[1:], metas[1:]):
        if m.arch != metas[0].arch:
            raise CheckpointError(f"cannot merge {ckpts[0]} with {c}: their shapes differ "
                                  f"({metas[0].arch.differences(m.arch)}); "
                                  "merging needs checkpoints of one architecture (prune both the same way first)")
    return metas[0]


def _groups(names: list[str], sharded: dict) -> list[list[str]]:
    """Tensor names grouped by checkpoint key: one load per key gets that tensor of every layer this rank holds.

    A key of the layer-stacked tensors (decoder.layers.*) covers all layers; megatron's loader expects a request
    to cover every layer of the key across the ranks loading at once (one layer alone fails at world size 1),
    so every pipeline stage loads the same key in the same call: layer keys first, in one order everywhere.
    """
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(sharded[n].key, []).append(n)
    layered = sorted(k for k in groups if k.startswith("decoder.layers."))
    return [groups[k] for k in layered] + [groups[k] for k in sorted(set(groups) - set(layered))]


def _global_layer(name: str, arch: ModelArch) -> Optional[int]:
    """The global decoder layer of a parameter; None for the embedding, final norm and output layer."""
    from megatron_prune.model import layer_offset

    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    return layer_offset(arch) + int(m.group(1)) if m else None


def _load_group(sharded: dict, names: list[str], ckpt: str) -> dict[str, torch.Tensor]:
    """This rank's slices of ``names`` from ``ckpt`` (fresh tensors, the model is untouched)."""
    from megatron.core import dist_checkpointing

    request = {n: dataclasses.replace(sharded[n], data=torch.empty_like(sharded[n].data)) for n in names}
    # a subset of the model's tensors: the check that every shard of the checkpoint is read does not apply
    loaded = dist_checkpointing.load(request, str(ckpt), validate_access_integrity=False)
    return {n: loaded[n] for n in names}


def _is_tp_split(sh) -> bool:
    """Whether this rank holds only a TP slice of the tensor (from its sharding, not from param attributes,
    which megatron sets only when it initializes weights)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(sh, ShardedTensor):
        return any(f > 1 for f in sh.axis_fragmentations[sh.prepend_axis_num:])
    built = sh.build()  # a factory (e.g. SwiGLU's fc1): look at the tensors it stands for
    parts = built.values() if isinstance(built, dict) else built if isinstance(built, (list, tuple)) else [built]
    return any(_is_tp_split(p) for p in parts)


def _tp_sum(values: torch.Tensor, split: bool) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if split and dist.is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(values, group=ps.get_tensor_model_parallel_group())
    return values


@torch.no_grad()
def merge_into(model: torch.nn.Module, arch: ModelArch, ckpts: Sequence[str], method: str,
               t: float | Sequence[float] = 0.5, weights: Optional[Sequence[float]] = None,
               base: Optional[str] = None, bar=None) -> None:
    """Write the merge of ``ckpts`` into ``model`` (this rank's shard, same arch as the checkpoints).

    ``slerp``: two checkpoints, factor ``t`` (0 gives the first, 1 the second; a list varies by layer).
    ``linear``: sum_i weights_i * ckpt_i. With ``base`` (task arithmetic): base + sum_i weights_i (ckpt_i - base).
    """
    if method == "slerp" and (len(ckpts) != 2 or base is not None):
        raise ValueError("slerp merges exactly two checkpoints (no --base); use --method linear for more")
    if method == "linear":
        weights = list(weights) if weights is not None else [1.0 / len(ckpts)] * len(ckpts)
        if len(weights) != len(ckpts):
            raise ValueError(f"{len(weights)} weights for {len(ckpts)} checkpoints; give one weight per checkpoint")
    elif method != "slerp":
        raise ValueError(f"unknown merge method {method!r}; choose slerp or linear")
    sharded = {k: v for k, v in model.sharded_state_dict().items() if hasattr(v, "data") and torch.is_tensor(v.data)}
    target = model.state_dict()
    groups = _groups([n for n in sharded if n in target and not n.endswith("_extra_state")], sharded)
    # loading is collective: pipeline stages with fewer groups join the others' loads with empty requests
    count = torch.tensor([len(groups)])
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    groups += [[] for _ in range(int(count) - len(groups))]
    for names in groups:
        if method == "slerp":
            a, b = (_load_group(sharded, names, c) for c in ckpts)
            for n in names:
                x, y = a[n].double().contiguous(), b[n].double().contiguous()
                w = torch.empty_like(x)
                blocks = list(zip(*(hf_blocks(v, n, arch) for v in (x, y, w))))
                # one (dot, |x|^2, |y|^2) per Hugging Face tensor, summed over the TP group when split
                stats = _tp_sum(torch.stack([torch.stack([(bx * by).sum(), (bx * bx).sum(), (by * by).sum()])
                                             for bx, by, _ in blocks]), _is_tp_split(sharded[n]))
                tn = layer_t(t, _global_layer(n, arch), arch.num_layers)
                for (bx, by, bw), (dot, xx, yy) in zip(blocks, stats.tolist()):
                    bw.copy_(slerp(bx, by, tn, dot, math.sqrt(xx), math.sqrt(yy)))
                target[n].copy_(w.to(target[n].dtype))
        else:
            sources = list(zip(ckpts, weights))
            if base is not None:  # base + sum w_i (x_i - base) = (1 - sum w_i) base + sum w_i x_i
                sources.append((base, 1.0 - sum(weights)))
            acc = None
            for c, w in sources:
                part = _load_group(sharded, names, c)
                if acc is None:
                    acc = {n: w * part[n].double() for n in names}
                else:
                    for n in names:
                        acc[n] += w * part[n].double()
            for n in names:
                target[n].copy_(acc[n].to(target[n].dtype))
        if bar is not None:
            bar.update(len(names))
