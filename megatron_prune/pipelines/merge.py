"""`megatron-prune merge`: SLERP / linear / task-arithmetic merge of checkpoints, written at any TP/PP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence


def merge(ckpts: Sequence[str], out: str, method: str = "slerp", t: float | Sequence[float] = 0.5,
          weights: Optional[Sequence[float]] = None, base: Optional[str] = None, tp: int = 1, pp: int = 1,
          overwrite: bool = False) -> Path:
    from megatron_prune.checkpoint import CheckpointError, save_checkpoint, tokenizer_dir
    from megatron_prune.merge import check_same_shape, merge_into
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed, log0
    from megatron_prune.runtime.progress import progress
    import torch

    if Path(out).exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; choose another path or pass --overwrite")
    meta = check_same_shape(list(ckpts) + ([base] if base else []))
    init_distributed(tp, pp)
    meta.arch.check_parallel(tp, pp)
    model = build_model(meta.arch, dtype=getattr(torch, meta.dtype), use_te=False, perform_initialization=False)
    log0(f"merging {len(ckpts)} checkpoints ({meta.arch.describe()}) by {method}")
    bar = progress(sum(1 for _ in model.state_dict()), "merge", unit="tensor")
    merge_into(model, meta.arch, list(ckpts), method, t=t, weights=weights, base=base, bar=bar)
    bar.close()
    provenance = {"source": "merge", "method": method, "inputs": [str(c) for c in ckpts], "t": t,
                  "weights": list(weights) if weights else None, "base": str(base) if base else None}
    return save_checkpoint(model, meta.arch, out, tokenizer_src=tokenizer_dir(ckpts[0]), provenance=provenance,
                           overwrite=overwrite)
