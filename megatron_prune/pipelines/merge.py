"""`megatron-prune merge`: SLERP / linear / task-arithmetic merge of checkpoints, written at any TP/PP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megatron_prune import inputs
from megatron_prune.runtime.stop import stop_on_signals


def check_merge(ckpts: Sequence[str], out: str, method: str, t: float | Sequence[float],
                weights: Optional[Sequence[float]], base: Optional[str], tp: int, pp: int, overwrite: bool):
    """Every input of `merge`, before any process group or weight; returns the common checkpoint metadata."""
    from megatron_prune.checkpoint.outputs import check_output_path

    for i, c in enumerate(ckpts):  # first: --overwrite must never replace an input
        check_output_path(out, {f"input checkpoint{'' if len(ckpts) == 1 else f' {i + 1}'}": c})
    check_output_path(out, {"base checkpoint": base})
    inputs.layout(tp, pp)
    if method == "slerp":
        if len(ckpts) != 2 or base is not None or weights is not None:
            raise inputs.InputError(f"--method slerp interpolates exactly two checkpoints (got {len(ckpts)}"
                                    f"{', --base' if base else ''}{', --weights' if weights else ''}); for more, "
                                    f"weights or a base use --method linear")
    elif len(ckpts) < 2 and base is None:
        raise inputs.InputError(f"merge needs at least two checkpoints (got {len(ckpts)}), or one with --base for "
                                f"task arithmetic")
    ts = [t] if isinstance(t, (int, float)) else list(t)
    if any(not 0.0 <= x <= 1.0 for x in ts):
        raise inputs.InputError(f"--t {','.join(map(str, ts))}: SLERP factors lie in [0, 1] (0 = the first "
                                f"checkpoint, 1 = the second)")
    if weights is not None and len(weights) != len(ckpts):
        raise inputs.InputError(f"--weights has {len(weights)} values for {len(ckpts)} checkpoints; give one weight "
                                f"per checkpoint, in their order")
    named = [(c, f"CKPT {i + 1}") for i, c in enumerate(ckpts)] + ([(base, "--base")] if base else [])
    metas = [inputs.checkpoint(c, name) for c, name in named]
    for (c, name), m in zip(named[1:], metas[1:], strict=True):
        if m.arch != metas[0].arch:
            raise inputs.InputError(f"{name} {c} has another shape than {ckpts[0]} "
                                    f"({metas[0].arch.differences(m.arch)})"
                                    f"; merging needs checkpoints of one architecture (prune them with one plan first)")
    inputs.checkpoint_fits(metas[0], tp, pp)
    inputs.output(out, "--out", overwrite=overwrite)
    return metas[0]


@stop_on_signals(immediate=True)  # nothing to resume: a stop signal ends it, nothing is written
def merge(ckpts: Sequence[str], out: str, method: str = "slerp", t: float | Sequence[float] = 0.5,
          weights: Optional[Sequence[float]] = None, base: Optional[str] = None, tp: int = 1, pp: int = 1,
          overwrite: bool = False) -> Path:
    import torch

    from megatron_prune.checkpoint import save_checkpoint, tokenizer_dir
    from megatron_prune.checkpoint.merging import merge_into
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed, log0
    from megatron_prune.runtime.progress import progress

    meta = check_merge(ckpts, out, method, t, weights, base, tp, pp, overwrite)
    init_distributed(tp, pp)
    model = build_model(meta.arch, dtype=getattr(torch, meta.dtype), use_te=False, perform_initialization=False)
    log0(f"merging {len(ckpts)} checkpoints ({meta.arch.describe()}) by {method}")
    bar = progress(sum(1 for _ in model.state_dict()), "merge", unit="tensor")
    merge_into(model, meta.arch, list(ckpts), method, t=t, weights=weights, base=base, bar=bar)
    bar.close()
    provenance = {"source": "merge", "method": method, "inputs": [str(c) for c in ckpts], "t": t,
                  "weights": list(weights) if weights else None, "base": str(base) if base else None}
    return save_checkpoint(model, meta.arch, out, tokenizer_src=tokenizer_dir(ckpts[0]), provenance=provenance,
                           overwrite=overwrite)
