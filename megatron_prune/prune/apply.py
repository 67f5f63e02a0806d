"""Apply a PrunePlan to weights: in memory, or straight from a sharded checkpoint.

Both paths build the pruned GPTModel at the current TP/PP and fill every parameter by selecting kept
indices from the source tensor it comes from (in place when the layer stays on its pipeline stage). Hidden
channels are not TP-sharded and are selected locally; heads, query groups and FFN neurons are TP-sharded,
so each TP rank contributes the kept rows it owns and one all-reduce over the TP group assembles the
pruned rows (other ranks add exact zeros), of which each rank keeps its own target shard. Memory per rank
stays at one source shard plus one pruned shard (plus the layers that change stage).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megatron_prune.models import family_of
from megatron_prune.models.family import expert_index
from megatron_prune.prune.plan import PrunePlan

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _tp(expert: bool = False):
    """(size, rank, group) of tensor parallelism; an expert's weights split over megatron's expert-TP group."""
    from megatron.core import parallel_state as ps

    if expert:
        return (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank(),
                ps.get_expert_tensor_parallel_group())
    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


def _ep():
    from megatron.core import parallel_state as ps

    return (ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank(),
            ps.get_expert_model_parallel_group())


def select_tp_sharded(local: torch.Tensor, axis: int, index: list[int], expert: bool = False) -> torch.Tensor:
    """This TP rank's shard of ``full.index_select(axis, index)``, where ``local`` is its shard of ``full``.

    Collective over the TP group (the expert-TP group for an expert's weights; every rank calls it with the same
    ``index``).
    """
    tp, tp_rank, group = _tp(expert)
    idx = torch.tensor(index, dtype=torch.long, device=local.device)
    if tp == 1:
        return local.index_select(axis, idx)
    n = local.shape[axis]
    start = tp_rank * n
    shape = list(local.shape)
    shape[axis] = len(index)
    out = local.new_zeros(shape)
    mine = (idx >= start) & (idx < start + n)
    out.index_copy_(axis, mine.nonzero().flatten(), local.index_select(axis, idx[mine] - start))
    dist.all_reduce(out, group=group)
    chunk = len(index) // tp
    return out.narrow(axis, tp_rank * chunk, chunk).contiguous()


def _qkv_rows(plan: PrunePlan, j: int) -> list[int]:
    """Source rows of megatron's per-group interleaved [q heads, k, v] layout that target layer j keeps."""
    s = plan.source_arch
    d, hpg = s.kv_channels, s.heads_per_group
    rows = []
    for g, heads in zip(plan.kept_groups[j], plan.kept_heads[j]):
        base = g * (hpg + 2) * d
        for h in heads:
            rows.extend(range(base + h * d, base + (h + 1) * d))
        rows.extend(range(base + hpg * d, base + (hpg + 2) * d))  # k and v of the group
    return rows


def _proj_cols(plan: PrunePlan, j: int) -> list[int]:
    s = plan.source_arch
    d, hpg = s.kv_channels, s.heads_per_group
    return [(g * hpg + h) * d + k for g, heads in zip(plan.kept_groups[j], plan.kept_heads[j]) for h in heads
            for k in range(d)]


def _select(src: torch.Tensor, dim: int, kind: str, plan: PrunePlan, j: int, tp_split: bool,
            expert: int | None = None) -> torch.Tensor:
    """Keep the units of pruning kind ``kind`` along ``dim`` (see models/family.py DIM_KINDS); ``expert``: the
    target expert an expert parameter belongs to."""
    if kind == "hidden":  # never split over TP
        return src.index_select(dim, torch.tensor(plan.kept_hidden, device=src.device))
    index = {"ffn": lambda: plan.kept_ffn[j], "qkv": lambda: _qkv_rows(plan, j), "heads": lambda: _proj_cols(plan, j),
             "experts": lambda: plan.kept_experts[j], "moe_ffn": lambda: plan.kept_moe_ffn[j][expert]}
    if kind not in index:  # vocab, None: nothing to prune
        return src
    if tp_split:
        return select_tp_sharded(src, dim, index[kind](), expert=expert is not None)
    return src.index_select(dim, torch.tensor(index[kind](), device=src.device))


def pruned_value(name: str, src: torch.Tensor, plan: PrunePlan, j: int, expert: int | None = None) -> torch.Tensor:
    """The pruned value of parameter ``name``; ``j`` is the target (global) layer index for layer params.

    Driven by the family's parameter table: every dimension is cut by its pruning kind, the hidden one
    first (local, and it makes the TP exchange of the others smaller). ``expert``: for an expert's parameter,
    its global target expert (``src`` is the kept source expert's tensor, see :func:`expert_source`).
    """
    row, _ = family_of(plan.source_arch).param(name)
    order = sorted(range(len(row.dims)), key=lambda d: row.dims[d] != "hidden")
    parts = [src]
    if row.fused == "gate_up" and plan.source_arch.gated:  # local shard is [gate_r; up_r]: each half on its own
        parts = list(src.chunk(2, dim=0))
    out = []
    for part in parts:
        for d in order:
            part = _select(part, d, row.dims[d], plan, j, tp_split=row.tp_dim == d, expert=expert)
        out.append(part)
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


@torch.no_grad()
def fill_pruned(target_model: torch.nn.Module, source: dict[str, torch.Tensor], plan: PrunePlan) -> None:
    """Fill ``target_model`` (target arch) from ``source``: target parameter name -> the source-width tensor it
    is cut from (see :func:`source_tensors`)."""
    from megatron_prune.model import layer_offset

    offset = layer_offset(plan.target_arch)
    ep, ep_rank, _ = _ep()
    for name, param in target_model.named_parameters():  # the same order on every rank of a stage
        m = _LAYER_RE.match(name)
        j = offset + int(m.group(1)) if m else -1
        pattern, local = expert_index(name)
        if local is None:
            value = pruned_value(name, source[name].detach(), plan, j)
        else:
            target_expert = ep_rank * (plan.target_arch.num_experts // ep) + local
            value = pruned_value(name, expert_source(source, pattern, plan, j, local), plan, j, target_expert)
        if value.shape != param.shape:
            raise RuntimeError(f"{name}: pruned shape {tuple(value.shape)} != target {tuple(param.shape)}")
        param.copy_(value)


def expert_source(source: dict[str, torch.Tensor], pattern: str, plan: PrunePlan, j: int, local: int) -> torch.Tensor:
    """The source tensor that parameter ``pattern`` (``{e}`` for the expert) of this rank's local target expert
    ``local`` in layer ``j`` is cut from: the same parameter of the kept source expert. With expert parallelism the
    experts of a layer are split over the EP ranks in order (rank r holds experts [r * n, (r + 1) * n)), so the
    kept expert may live on another EP rank, which sends it. Collective over the EP group: every rank walks the
    same parameters, and one tensor is in flight at a time."""
    ep, ep_rank, group = _ep()
    per_source = plan.source_arch.num_experts // ep
    per_target = plan.target_arch.num_experts // ep
    mine = None
    for r in range(ep):  # target expert ``local`` of EP rank r
        owner, at = divmod(plan.kept_experts[j][r * per_target + local], per_source)
        name = pattern.replace("{e}", str(at))
        if owner == r:  # already on the rank that needs it
            if r == ep_rank:
                mine = source[name].detach()
            continue
        buf = (source[name].detach().contiguous() if ep_rank == owner
               else torch.empty_like(source[pattern.replace("{e}", "0")]))
        dist.broadcast(buf, src=dist.get_global_rank(group, owner), group=group)
        if r == ep_rank:
            mine = buf
    return mine


def _starts(split: list[int]) -> list[int]:
    """First global layer of each pipeline stage."""
    return [sum(split[:i]) for i in range(len(split))]


def _stage_of(layer: int, starts: list[int]) -> int:
    return max(i for i, s in enumerate(starts) if s <= layer)


@torch.no_grad()
def source_tensors(model: torch.nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """For every parameter of this stage's pruned model, the source tensor it is cut from.

    Kept layers that stay on their pipeline stage are used in place (no copy); layers that move to another
    stage are broadcast over the pipeline group, this rank's TP shard only, one tensor at a time.
    """
    from megatron.core import parallel_state as ps

    from megatron_prune.runtime.stages import current_split

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    # stages may differ in depth, and source and target split differently (runtime/stages.py)
    src_start = _starts(current_split(plan.source_arch.num_layers))
    tgt_start = _starts(current_split(plan.target_arch.num_layers))
    src = dict(model.named_parameters())
    out = {name: p for name, p in src.items() if not _LAYER_RE.match(name)}  # embedding, final norm, output
    layer_params = sorted({_LAYER_RE.match(n).group(2) for n in src if _LAYER_RE.match(n)})
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else None
    for t, s in enumerate(plan.kept_layers):
        owner, dest = _stage_of(s, src_start), _stage_of(t, tgt_start)
        for rest in layer_params:
            here = src.get(f"decoder.layers.{s - src_start[owner]}.{rest}") if stage == owner else None
            if owner == dest:
                if stage == dest:
                    out[f"decoder.layers.{t - tgt_start[dest]}.{rest}"] = here
                continue
            # every stage takes part in the broadcast, in the same order
            buf = here.detach().contiguous() if stage == owner else torch.empty_like(src[f"decoder.layers.0.{rest}"])
            dist.broadcast(buf, src=pp_ranks[owner], group=ps.get_pipeline_model_parallel_group())
            if stage == dest:
                out[f"decoder.layers.{t - tgt_start[dest]}.{rest}"] = buf
    return out


@torch.no_grad()
def apply_plan(model: torch.nn.Module, plan: PrunePlan) -> torch.nn.Module:
    """The pruned model, built at this TP/PP, from ``model`` (built for ``plan.source_arch`` at this TP/PP).

    Collective over all model-parallel ranks. The source is left untouched.
    """
    from megatron_prune.model import build_model

    source = source_tensors(model, plan)
    target = build_model(plan.target_arch, dtype=next(model.parameters()).dtype, use_te=False,
                         perform_initialization=False)
    fill_pruned(target, source, plan)
    return target
