"""`megatron-prune eval`: held-out LM loss and perplexity of a checkpoint at any TP/PP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.evaluate import EvalResult, lm_loss


def check_eval(ckpt, data_prefix, seq_len: int, micro_batch_size: int, max_sequences: Optional[int], tp: int,
               pp: int, out=None) -> None:
    """Every input of `eval`, before any process group or weight."""
    inputs.layout(tp, pp)
    for name, value in (("--seq-len", seq_len), ("--micro-batch-size", micro_batch_size),
                        ("--max-sequences", max_sequences)):
        inputs.positive(name, value)
    inputs.checkpoint_fits(inputs.checkpoint(ckpt), tp, pp)
    inputs.enough_windows(inputs.indexed_data(data_prefix), seq_len, 1, "--data", "lower --seq-len or use more data")
    if out is not None:
        inputs.output(out, "--out", overwrite=None, kind="file")


def evaluate_checkpoint(ckpt: str | Path, data_prefix: str | Path, seq_len: int = 512, micro_batch_size: int = 4,
                        max_sequences: Optional[int] = None, tp: int = 1, pp: int = 1,
                        out: Optional[str | Path] = None) -> EvalResult:
    """Load ``ckpt`` at ``tp`` x ``pp`` and report its LM loss on the indexed data set ``data_prefix``
    (also written as JSON to ``out`` when given)."""
    import json

    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.runtime import init_distributed, is_rank0, log0

    check_eval(ckpt, data_prefix, seq_len, micro_batch_size, max_sequences, tp, pp, out)
    init_distributed(tp, pp)
    model, meta = load_model(ckpt)
    windows = fixed_length_windows(data_prefix, seq_len, max_windows=max_sequences)
    log0(f"evaluating {ckpt} ({meta.arch.describe()}) on {len(windows)} x {seq_len} tokens of {data_prefix}")
    result = lm_loss(model, meta.arch, windows, micro_batch_size, desc="eval")
    if out is not None and is_rank0():
        Path(out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
