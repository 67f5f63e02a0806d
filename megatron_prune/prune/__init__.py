"""Pruning: plans from importance scores, applied in memory or directly to sharded checkpoints."""

from megatron_prune.prune.apply import apply_plan, fill_pruned, source_tensors
from megatron_prune.prune.plan import (
    PlanError,
    PrunePlan,
    PruneTarget,
    identity_plan,
    make_plan,
    target_arch,
)

__all__ = ["PlanError", "PrunePlan", "PruneTarget", "apply_plan", "fill_pruned", "identity_plan", "source_tensors",
           "make_plan", "target_arch"]
