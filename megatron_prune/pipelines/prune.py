"""`megatron-prune prune`: score file + target (or a plan file) -> plan -> pruned sharded checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune.arch import ArchError
from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.prune import PrunePlan, PruneTarget, make_plan
from megatron_prune.prune.checkpoint import prune_checkpoint


def plan_from_scores(ckpt: str | Path, scores_file: str | Path, target: str | PruneTarget) -> PrunePlan:
    from megatron_prune.checkpoint import read_meta
    from megatron_prune.importance import ImportanceScores

    if isinstance(target, str):
        target = PruneTarget.parse(target)
    if not Path(scores_file).is_file():
        raise FileNotFoundError(f"score file {scores_file} not found; compute it with `megatron-prune importance`")
    return make_plan(ImportanceScores.load(scores_file), read_meta(ckpt).arch, target, scores_file=str(scores_file))


def prune(ckpt: str | Path, out: Optional[str | Path], scores: Optional[str | Path] = None,
          target: Optional[str] = None, plan_file: Optional[str | Path] = None, plan_out: Optional[str | Path] = None,
          tp: int = 1, pp: int = 1, overwrite: bool = False) -> PrunePlan:
    """Make (or read) the plan, check it fits ``tp`` x ``pp``, then write the pruned checkpoint (if ``out``)."""
    from megatron_prune.prune import PlanError
    from megatron_prune.runtime import init_distributed, is_rank0, log0

    if (plan_file is None) == (scores is None or target is None):
        raise PlanError("give either --plan PLAN.json, or --scores SCORES with --target SPEC")
    inputs = {"input checkpoint": ckpt, "score file": scores, "plan file": plan_file}
    if out is not None:
        check_output_path(out, inputs, "--out")
    if plan_out is not None:
        check_output_path(plan_out, inputs, "--plan-out")
    plan = PrunePlan.load(plan_file) if plan_file else plan_from_scores(ckpt, scores, target)
    try:  # every shape check happens before any process group or weight is touched
        plan.target_arch.check_parallel(tp, pp)
    except ValueError as e:
        raise PlanError(str(e)) from e
    try:
        hf_type = plan.target_arch.hf_export_model_type()
    except ArchError as e:
        raise PlanError(f"the pruned model could not be exported to Hugging Face format: {e}") from e
    s, t = plan.source_arch, plan.target_arch
    summary = (f"plan: {s.describe()}\n   -> {t.describe()} ({100 * t.param_count() / s.param_count():.1f}% of the "
               f"parameters), keeping layers {plan.kept_layers}")
    if hf_type != t.model_type:
        summary += (f"\n   (hidden {t.hidden_size} is not a multiple of {t.num_attention_heads} heads: `convert` "
                    f"exports it to Hugging Face as model_type {hf_type!r}, the same network with explicit head_dim)")
    if plan_out and is_rank0():
        plan.save(plan_out)
    if out is None:
        print(summary)
        return plan
    init_distributed(tp, pp)
    log0(summary)
    prune_checkpoint(ckpt, plan, out, overwrite=overwrite)
    log0(f"pruned checkpoint written to {out}")
    return plan
