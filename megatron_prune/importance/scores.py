"""ImportanceScores: the global (layout-independent) result of a calibration pass, and its one-file format.

All tensors are indexed by global layer / neuron / head / group / channel, whatever TP/PP/DP computed them,
so one score file serves pruning at any target layout. The file is a single safetensors file whose header
metadata holds the JSON (arch, aggregation, sample counts); safetensors rather than pickle so loading a
score file can never run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

FORMAT_VERSION = 1

# the score tensor that ranks each pruning axis of models/axes.py (the field names predate the axis names and
# stay, so that score files written before still load)
AXIS_SCORES = {"hidden": "embedding", "ffn": "mlp", "heads": "heads", "query_groups": "query_groups",
               "layers": "block_influence", "experts": "experts", "moe_ffn": "experts", "topk": None}

_TENSOR_FIELDS = ("mlp", "heads", "query_groups", "embedding", "embedding_layers", "block_influence",
                  "angle_matrix")


@dataclass
class ImportanceScores:
    """Higher = more important, except the depth metrics where higher = the layer/block changes the
    hidden state more (so also "more important"): prune the lowest."""

    arch: dict
    seq_agg: str
    batch_agg: str
    num_samples: int
    seq_len: int
    mlp: torch.Tensor  # [layers, ffn]
    heads: torch.Tensor  # [layers, heads]
    query_groups: torch.Tensor  # [layers, groups]
    embedding: torch.Tensor  # [hidden]: summed over both norms of every layer
    embedding_layers: torch.Tensor  # [layers, 2, hidden]: per layer, (input_layernorm, pre_mlp_layernorm)
    block_influence: torch.Tensor  # [layers]
    angle_matrix: torch.Tensor  # [layers+1, layers+1]: mean last-token angle/pi between boundary states
    angular: dict = field(default_factory=dict)  # {n: [layers-n+1]} d(l, n), l = 0..layers-n
    extra: dict = field(default_factory=dict)  # free-form JSON metadata (e.g. the computing layout)
    base_lm_loss: Optional[float] = None  # set with loss_drop by depth.lm_loss_drop (separate, costlier pass)
    loss_drop: dict = field(default_factory=dict)  # {n: [layers-n+1]} LM-loss increase, block l..l+n-1 removed
    head_metric: str = "activation"  # which of width.HEAD_METRICS ``heads`` (and ``query_groups``) hold
    head_variants: dict = field(default_factory=dict)  # {metric: [layers, heads]} every head metric, one pass
    # Mixture of Experts (importance/experts.py): {metric: [layers, experts]} for every EXPERT_METRICS entry, and
    # "moe_ffn": [layers, experts, moe_ffn]; empty for a dense model
    experts: dict = field(default_factory=dict)
    expert_metric: str = "reap"  # which metric ranks the experts axis

    def for_axis(self, axis: str) -> torch.Tensor:
        """The scores of pruning axis ``axis`` (models/axes.py): [hidden] for hidden, [layers, units] for the
        per-layer axes, [layers] (block influence) for layers, [layers, experts, moe_ffn] for moe_ffn."""
        if axis in ("experts", "moe_ffn"):
            if not self.experts:
                raise ValueError(f"these scores have no expert scores (a dense model's): the {axis} axis needs "
                                 "scores computed on a Mixture-of-Experts model")
            return self.experts[self.expert_metric if axis == "experts" else "moe_ffn"]
        if AXIS_SCORES[axis] is None:
            raise ValueError(f"the {axis} axis is set, not ranked: it has no scores")
        return getattr(self, AXIS_SCORES[axis])

    def with_expert_metric(self, metric: str) -> "ImportanceScores":
        """These scores with the experts ranked by another stored expert metric (no recomputation)."""
        from megatron_prune.importance.experts import EXPERT_METRICS

        if metric not in EXPERT_METRICS or metric not in self.experts:
            raise ValueError(f"expert metric {metric!r} is not in these scores (choose from "
                             f"{', '.join(EXPERT_METRICS)})")
        return dataclasses.replace(self, expert_metric=metric)

    def with_head_metric(self, metric: str) -> "ImportanceScores":
        """These scores with ``heads`` and ``query_groups`` taken from another head metric (no recomputation)."""
        from megatron_prune.importance.width import HEAD_METRICS, query_group_scores

        if metric not in self.head_variants:
            have = ", ".join(self.head_variants) or "none (score file written before head metrics existed)"
            raise ValueError(f"head metric {metric!r} is not in these scores (choose from {', '.join(HEAD_METRICS)}; "
                             f"stored: {have}); recompute them with `megatron-prune importance`")
        heads = self.head_variants[metric]
        groups = query_group_scores(heads, self.arch["num_query_groups"])
        return dataclasses.replace(self, heads=heads, query_groups=groups, head_metric=metric)

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (atomically: temporary file, then rename)."""
        from safetensors.torch import save_file

        from megatron_prune.checkpoint.outputs import follow_umask

        path = Path(path)
        tensors = {k: getattr(self, k).detach().float().cpu().contiguous() for k in _TENSOR_FIELDS}
        for n, t in self.angular.items():
            tensors[f"angular.{int(n)}"] = t.detach().float().cpu().contiguous()
        for n, t in self.loss_drop.items():
            tensors[f"loss_drop.{int(n)}"] = t.detach().float().cpu().contiguous()
        for name, t in self.head_variants.items():
            tensors[f"head_metric.{name}"] = t.detach().float().cpu().clone()  # may share memory with heads
        for name, t in self.experts.items():
            tensors[f"expert.{name}"] = t.detach().float().cpu().contiguous()
        meta = {"head_metric": self.head_metric, "expert_metric": self.expert_metric,
                "format_version": FORMAT_VERSION, "arch": self.arch, "seq_agg": self.seq_agg,
                "batch_agg": self.batch_agg, "num_samples": self.num_samples, "seq_len": self.seq_len,
                "base_lm_loss": self.base_lm_loss, "extra": self.extra}
        tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_file(tensors, str(tmp), metadata={"megatron_prune_importance": json.dumps(meta)})
            follow_umask(tmp)  # safetensors creates files 0600
            os.replace(tmp, path)
        except BaseException:  # also a stop signal (StopRequested) in the middle: no temporary file stays behind
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImportanceScores":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("megatron_prune_importance")
            if header is None:
                raise ValueError(f"{path} is not a megatron-prune importance file")
            meta = json.loads(header)
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{path} has format_version {meta['format_version']}; this version reads "
                                 f"<= {FORMAT_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        def by_size(prefix):
            return dict(sorted((int(k.split(".", 1)[1]), v) for k, v in tensors.items() if k.startswith(prefix)))

        return cls(arch=meta["arch"], seq_agg=meta["seq_agg"], batch_agg=meta["batch_agg"],
                   num_samples=meta["num_samples"], seq_len=meta["seq_len"], angular=by_size("angular."),
                   extra=meta.get("extra", {}), base_lm_loss=meta.get("base_lm_loss"),
                   loss_drop=by_size("loss_drop."), head_metric=meta.get("head_metric", "activation"),
                   head_variants={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("head_metric.")},
                   experts={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("expert.")},
                   expert_metric=meta.get("expert_metric", "reap"),
                   **{k: tensors[k] for k in _TENSOR_FIELDS})

    def angular_distance(self, n: int) -> torch.Tensor:
        """d(l, n) for l = 0..layers-n (any n, not only those stored in ``angular``)."""
        return torch.diagonal(self.angle_matrix, offset=n).clone()


def all_gather_cat(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate ``t`` from every rank of ``group`` (in group-rank order) along ``dim``."""
    import torch.distributed as dist

    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return t
    return torch.cat(all_gather_uneven(t, group, dim), dim=dim)


def all_gather_uneven(t: torch.Tensor, group, dim: int = 0) -> list[torch.Tensor]:
    """``t`` of every rank of ``group`` (in group-rank order), whose sizes along ``dim`` may differ (pipeline
    stages of unequal depth): the sizes are gathered first, every part is padded to the largest for the
    all_gather and cut back."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    size = torch.tensor([t.shape[dim]], dtype=torch.long, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    if longest != t.shape[dim]:
        pad = list(t.shape)
        pad[dim] = longest - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return [p.narrow(dim, 0, s) for p, s in zip(parts, sizes)]


def gather_global(local: dict, tp_group=None, pp_group=None) -> dict:
    """Local per-stage / per-shard scores -> global ones, on every rank.

    TP: mlp and heads are this rank's contiguous shard (TP rank r owns neurons/heads r*n/tp ...), so an
    all_gather over the TP group concatenates them in order; embedding and depth tensors are replicated
    across TP and are taken as they are (never summed). PP: stage s holds the layers after those of stages < s
    (stages may differ in depth), so an all_gather over the PP group concatenates layers in order (global layer =
    offset + local index).
    """
    out = dict(local)
    for k in ("mlp", "heads", "head_channel", "head_residual"):
        out[k] = all_gather_cat(out[k], tp_group, dim=1)
    for k in ("mlp", "heads", "head_channel", "head_residual", "embedding_layers", "block_influence"):
        out[k] = all_gather_cat(out[k], pp_group, dim=0)
    return out


def make_scores(global_parts: dict, arch, seq_agg: str, batch_agg: str, num_samples: int, seq_len: int,
                angular_sizes: Optional[list] = None, extra: Optional[dict] = None,
                head_metric: str = "residual", experts: Optional[dict] = None) -> ImportanceScores:
    from megatron_prune.importance.depth import angular_distances
    from megatron_prune.importance.width import query_group_scores

    g = {k: v.detach().float().cpu() for k, v in global_parts.items()}
    sizes = range(1, arch.num_layers) if angular_sizes is None else angular_sizes
    variants = {"activation": g["heads"], "channel": g["head_channel"], "residual": g["head_residual"]}
    scores = ImportanceScores(
        arch=arch.to_dict() if hasattr(arch, "to_dict") else dict(arch), seq_agg=seq_agg, batch_agg=batch_agg,
        num_samples=int(num_samples), seq_len=int(seq_len), mlp=g["mlp"], heads=g["heads"],
        query_groups=query_group_scores(g["heads"], arch.num_query_groups), embedding=g["embedding_layers"].sum((0, 1)),
        embedding_layers=g["embedding_layers"], block_influence=g["block_influence"], angle_matrix=g["angle_matrix"],
        angular=angular_distances(g["angle_matrix"], sizes), extra=dict(extra or {}), head_variants=variants,
        experts={k: v.detach().float().cpu() for k, v in (experts or {}).items()})
    return scores.with_head_metric(head_metric)
