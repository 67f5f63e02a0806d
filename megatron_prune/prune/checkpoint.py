"""Prune a sharded Megatron checkpoint into a new one, without any rank holding the whole model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.inputs import free_output
from megatron_prune.prune.apply import apply_plan
from megatron_prune.prune.plan import PlanError, PrunePlan

PLAN_FILE = "prune_plan.json"


def prune_checkpoint(src_ckpt: str | Path, plan: PrunePlan, out: str | Path, dtype: Optional[torch.dtype] = None,
                     overwrite: bool = False) -> Path:
    """Write ``plan`` applied to ``src_ckpt`` as a new checkpoint; collective over all ranks.

    Runs at the current TP/PP/EP (megatron's parallel state must be initialized): every rank reads only its own
    TP/PP/EP shard of the source (the source may have been saved at any layout), kept layers that change stage
    are sent over the pipeline group, kept experts that change EP rank over the expert-parallel group, and the
    pruned shards are saved. The output loads at any TP/PP and
    carries the plan and its parent. Peak memory per rank: one source shard plus one pruned shard.
    """
    from megatron.core import parallel_state as ps

    from megatron_prune.checkpoint import load_model, read_meta, save_checkpoint, tokenizer_dir

    meta = read_meta(src_ckpt)
    if meta.arch != plan.source_arch:
        raise PlanError(f"the plan was made for another model than {src_ckpt} "
                        f"(plan vs checkpoint: {plan.source_arch.differences(meta.arch)})")
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    try:
        plan.target_arch.check_parallel(tp, pp, ep)
        plan.source_arch.check_parallel(tp, pp, ep)
    except ValueError as e:
        raise PlanError(str(e)) from e
    free_output(out, overwrite=overwrite)
    source, _ = load_model(src_ckpt, dtype=dtype, use_te=False)
    target = apply_plan(source, plan)
    del source
    provenance = {"parent": str(Path(src_ckpt).absolute()), "plan": PLAN_FILE, "target": plan.target,
                  "scores": plan.scores_file, "source_params": plan.source_arch.param_count(),
                  "params": plan.target_arch.param_count()}
    return save_checkpoint(target, plan.target_arch, out, tokenizer_src=tokenizer_dir(src_ckpt), provenance=provenance,
                           overwrite=overwrite, extra_files={PLAN_FILE: json.dumps(plan.to_json(), indent=1) + "\n"})
