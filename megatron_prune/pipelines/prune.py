"""`megatron-prune prune`: score file + target (or a plan file) -> plan -> pruned sharded checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.arch import ArchError
from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.prune import PrunePlan, PruneTarget, make_plan
from megatron_prune.prune.checkpoint import prune_checkpoint
from megatron_prune.runtime.stop import stop_on_signals


def plan_from_scores(ckpt: str | Path, scores_file: str | Path, target: str | PruneTarget) -> PrunePlan:
    from megatron_prune.checkpoint import read_meta

    if isinstance(target, str):
        target = PruneTarget.parse(target)
    scores = inputs.score_file(scores_file)
    return make_plan(scores, read_meta(ckpt).arch, target, scores_file=str(scores_file))


def load_plan(plan_file) -> PrunePlan:
    from megatron_prune.prune import PlanError

    inputs.existing_file(plan_file, "--plan", "write one with `megatron-prune prune ... --plan-out FILE`")
    try:
        return PrunePlan.load(plan_file)
    except PlanError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise inputs.InputError(f"--plan {plan_file} is not a valid plan file ({type(e).__name__}: {e}); write one "
                                f"with `megatron-prune prune ... --plan-out FILE`") from e


@stop_on_signals(immediate=True)  # nothing to resume: a stop signal ends it, nothing is written
def prune(ckpt: str | Path, out: Optional[str | Path], scores: Optional[str | Path] = None,
          target: Optional[str] = None, plan_file: Optional[str | Path] = None, plan_out: Optional[str | Path] = None,
          tp: int = 1, pp: int = 1, overwrite: bool = False, ep: int = 1) -> PrunePlan:
    """Make (or read) the plan, check it fits ``tp`` x ``pp`` (x ``ep``), then write the pruned checkpoint (if
    ``out``)."""
    from megatron_prune.prune import PlanError
    from megatron_prune.runtime import init_distributed, is_rank0, log0

    if (plan_file is None) == (scores is None or target is None):
        raise PlanError("give either --plan PLAN.json, or --scores SCORES with --target SPEC")
    sources = {"input checkpoint": ckpt, "score file": scores, "plan file": plan_file}
    if out is not None:
        check_output_path(out, sources, "--out")
    if plan_out is not None:
        check_output_path(plan_out, sources, "--plan-out")
    inputs.layout(tp, pp)
    inputs.positive("--ep", ep)
    meta = inputs.checkpoint(ckpt)
    if out is not None:
        inputs.output(out, "--out", overwrite)
    if plan_out is not None:
        inputs.output(plan_out, "--plan-out", overwrite=None, kind="file")
    plan = load_plan(plan_file) if plan_file else plan_from_scores(ckpt, scores, target)
    if plan_file and plan.source_arch != meta.arch:
        raise PlanError(f"--plan {plan_file} was made for another model than {ckpt} (plan vs checkpoint: "
                        f"{plan.source_arch.differences(meta.arch)}); make a plan for this checkpoint")
    try:  # every shape check happens before any process group or weight is touched
        plan.target_arch.check_parallel(tp, pp, ep)
        plan.source_arch.check_parallel(tp, pp, ep)
    except ValueError as e:
        raise PlanError(str(e)) from e
    inputs.pipeline_split(plan.target_arch, pp, "the pruned model")  # the stage-size flags size the written model
    inputs.pipeline_split(plan.source_arch, pp, "CKPT", main=False)
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
    init_distributed(tp, pp, ep=ep)
    log0(summary)
    prune_checkpoint(ckpt, plan, out, overwrite=overwrite)
    log0(f"pruned checkpoint written to {out}")
    return plan
