"""Importance estimation: width (neurons, heads, query groups, embedding channels) and depth (Block
Influence, angular block distance) scores from one forward-only calibration pass at any TP/PP/DP."""

from megatron_prune.importance.compute import compute_importance
from megatron_prune.importance.depth import DepthHooks, angular_distances, lm_loss_drop
from megatron_prune.importance.scores import ImportanceScores
from megatron_prune.importance.width import AGGREGATIONS, BatchAccumulator, WidthHooks, query_group_scores, reduce_seq

__all__ = ["AGGREGATIONS", "BatchAccumulator", "DepthHooks", "ImportanceScores", "WidthHooks", "angular_distances",
           "compute_importance", "lm_loss_drop", "query_group_scores", "reduce_seq"]
