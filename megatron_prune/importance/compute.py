"""compute_importance: one forward-only calibration pass with every width and depth hook attached."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from megatron_prune.importance.depth import DepthHooks
from megatron_prune.importance.experts import ExpertHooks, is_moe
from megatron_prune.importance.scores import ImportanceScores, gather_global, make_scores
from megatron_prune.importance.width import HEAD_METRICS, WidthHooks, check_aggregation


def _as_sample_tensor(windows_or_batches) -> torch.Tensor:
    """Token ids [n, s] from a tensor, or from a list of [b, s] tensors / dicts with "tokens"."""
    if isinstance(windows_or_batches, torch.Tensor):
        return windows_or_batches
    parts = [b["tokens"] if isinstance(b, dict) else b for b in windows_or_batches]
    return torch.cat([p if p.dim() == 2 else p.unsqueeze(0) for p in parts])


def _schedule_calls(samples: torch.Tensor, micro_batch_size: int, max_micro_batches: int) -> list[list[torch.Tensor]]:
    """Group this rank's samples into schedule calls of equal-sized micro-batches (the schedule needs equal
    sizes); a short last micro-batch gets a call of its own so no sample is dropped."""
    full = len(samples) // micro_batch_size * micro_batch_size
    mbs = list(samples[:full].split(micro_batch_size))
    calls = [mbs[i: i + max_micro_batches] for i in range(0, len(mbs), max_micro_batches)]
    if full < len(samples):
        calls.append([samples[full:]])
    return calls


def expert_parallel_samples_message(samples: int, dp: int, ep: int) -> str:
    return (f"--samples {samples} does not split evenly over the {dp} data-parallel ranks: with --ep {ep} the "
            f"experts' all-to-all makes them run the same forwards; use a multiple of {dp}")


@torch.no_grad()
def compute_importance(
    model: torch.nn.Module,
    arch,
    windows_or_batches: Union[torch.Tensor, Iterable],
    micro_batch_size: int = 1,
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    angular_sizes: Optional[Sequence[int]] = None,
    desc: Optional[str] = "importance",
    head_metric: str = "residual",
) -> ImportanceScores:
    """Score every prunable unit of ``model`` (this rank's GPTModel shard) on the calibration samples.

    ``windows_or_batches``: token ids [n, s] (or a list of [b, s] tensors / {"tokens": ...} dicts), the same on
    every rank; data-parallel ranks take every dp-th sample. Returns the global scores on every rank.
    ``angular_sizes``: the block sizes n stored in ``scores.angular`` (default 1..L-1; any n can still be read
    from ``scores.angle_matrix``). ``head_metric``: which of HEAD_METRICS fills ``heads``/``query_groups`` (all
    are stored in ``head_variants``).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prune.forward import run_forward
    from megatron_prune.runtime.progress import progress

    check_aggregation(seq_agg, "sequence")
    check_aggregation(batch_agg, "batch")
    if head_metric not in HEAD_METRICS:
        raise ValueError(f"unknown head metric {head_metric!r}; choose one of {', '.join(HEAD_METRICS)}")
    if getattr(model.config, "sequence_parallel", False):
        raise NotImplementedError("importance hooks assume sequence_parallel=False (norm outputs replicated over TP)")
    samples = _as_sample_tensor(windows_or_batches)
    if samples.dim() != 2 or len(samples) == 0:
        raise ValueError(f"expected token ids [n, s] with n > 0, got shape {tuple(samples.shape)}")
    distributed = dist.is_initialized()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    device = next(model.parameters()).device
    seq_len = samples.shape[1]
    ep = ps.get_expert_model_parallel_world_size() if distributed else 1
    if ep > 1 and len(samples) % dp:
        raise ValueError(expert_parallel_samples_message(len(samples), dp, ep))
    mine = samples[dp_rank::dp]

    width = WidthHooks(model, arch, tp, seq_agg)
    depth = DepthHooks(model, arch, ps.get_pipeline_model_parallel_group() if distributed else None)
    experts = ExpertHooks(model, arch) if is_moe(arch) else None
    was_training = model.training
    model.eval()
    handles = width.attach() + depth.attach() + (experts.attach() if experts else [])
    bar = progress(len(samples), desc, unit="seq") if desc else None
    try:
        for call in _schedule_calls(mine, micro_batch_size, 4 * pp):
            batches = [{"tokens": t.to(device)} for t in call]
            run_forward(model, batches, len(batches), seq_len, len(call[0]), lambda logits, batch: None)
            depth.flush()  # PP collective, outside the schedule
            if bar:
                bar.update(sum(len(t) for t in call) * dp)
    finally:
        for h in handles:
            h.remove()
        if bar:
            bar.close()
        model.train(was_training)

    if distributed and dp > 1:  # DP ranks saw different samples: add the raw sums before any nonlinearity
        group = ps.get_data_parallel_group()
        width.all_reduce(group)
        depth.all_reduce(group)
    expert_scores = _expert_scores(experts, distributed, dp) if experts else None
    local = {**width.finalize(batch_agg), **depth.finalize()}
    parts = gather_global(local, ps.get_tensor_model_parallel_group() if distributed else None,
                          ps.get_pipeline_model_parallel_group() if distributed else None)
    return make_scores(parts, arch, seq_agg, batch_agg, len(samples), seq_len, angular_sizes,
                       extra={"computed_at": {"tp": tp, "pp": pp, "dp": dp, "ep": ep},
                              "micro_batch_size": micro_batch_size},
                       head_metric=head_metric, experts=expert_scores)


def _expert_scores(experts: ExpertHooks, distributed: bool, dp: int) -> dict:
    """The experts' sums added over the ranks that saw other tokens, then gathered over EP, expert TP and PP."""
    from megatron.core import parallel_state as ps

    if not distributed:
        return experts.finalize()
    expert_dp = ps.get_expert_data_parallel_group()
    experts.all_reduce(ps.get_data_parallel_group() if dp > 1 else None,
                       expert_dp if ps.get_expert_data_parallel_world_size() > 1 else None)
    return experts.finalize(ps.get_expert_model_parallel_group(), ps.get_expert_tensor_parallel_group(),
                            ps.get_pipeline_model_parallel_group())
