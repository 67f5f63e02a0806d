"""`megatron-prune eval`: held-out LM loss and perplexity of a checkpoint at any TP/PP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune.evaluate import EvalResult, lm_loss


def evaluate_checkpoint(ckpt: str | Path, data_prefix: str | Path, seq_len: int = 512, micro_batch_size: int = 4,
                        max_sequences: Optional[int] = None, tp: int = 1, pp: int = 1) -> EvalResult:
    """Load ``ckpt`` at ``tp`` x ``pp`` and report its LM loss on the indexed data set ``data_prefix``."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.runtime import init_distributed, log0

    init_distributed(tp, pp)
    model, meta = load_model(ckpt)
    windows = fixed_length_windows(data_prefix, seq_len, max_windows=max_sequences)
    log0(f"evaluating {ckpt} ({meta.arch.describe()}) on {len(windows)} x {seq_len} tokens of {data_prefix}")
    return lm_loss(model, meta.arch, windows, micro_batch_size, desc="eval")
