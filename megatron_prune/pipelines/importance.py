"""`megatron-prune importance`: one calibration pass over a checkpoint -> one layout-independent score file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from megatron_prune import inputs
from megatron_prune.runtime.stop import stop_on_signals

if TYPE_CHECKING:
    from megatron_prune.importance import ImportanceScores


def check_importance(ckpt, data_prefix, out, num_samples: int, seq_len: int, micro_batch_size: int,
                     lm_loss_blocks: Sequence[int], lm_loss_samples: int, tp: int, pp: int, ep: int = 1) -> None:
    """Every input of `importance`, before any process group or weight."""
    inputs.layout(tp, pp)
    inputs.positive("--ep", ep)
    for name, value in (("--samples", num_samples), ("--seq-len", seq_len), ("--micro-batch-size", micro_batch_size),
                        ("--lm-loss-samples", lm_loss_samples)):
        inputs.positive(name, value)
    meta = inputs.checkpoint(ckpt)
    inputs.checkpoint_fits(meta, tp, pp)
    if ep != 1:
        try:
            meta.arch.check_parallel(tp, pp, ep)
        except ValueError as e:
            raise inputs.InputError(f"CKPT: {e}") from e
        from megatron_prune.runtime.distributed import detect_launch_env

        dp = detect_launch_env().world_size // (tp * pp)
        if dp > 1 and num_samples % dp:
            from megatron_prune.importance.compute import expert_parallel_samples_message

            raise inputs.InputError(expert_parallel_samples_message(num_samples, dp, ep))
    layers = meta.arch.num_layers
    bad = [n for n in lm_loss_blocks if not 1 <= n < layers]
    if bad:
        raise inputs.InputError(f"--lm-loss-drop {bad}: block sizes must be in [1, {layers - 1}] (the model has "
                                f"{layers} layers)")
    inputs.enough_windows(inputs.indexed_data(data_prefix), seq_len, num_samples, "--data",
                          "lower --samples or --seq-len, or use more data")
    inputs.output(out, "--out", overwrite=None, kind="file")


@stop_on_signals(immediate=True)  # one pass with nothing to resume: a stop signal ends it, nothing is written
def score_checkpoint(ckpt: str | Path, data_prefix: str | Path, out: str | Path, num_samples: int = 1024,
                     seq_len: int = 512, micro_batch_size: int = 4, seq_agg: str = "mean", batch_agg: str = "l2",
                     lm_loss_blocks: Sequence[int] = (), lm_loss_samples: int = 64, tp: int = 1, pp: int = 1,
                     seed: int = 0, head_metric: str = "residual", ep: int = 1) -> "ImportanceScores":
    """Load ``ckpt`` at ``tp`` x ``pp`` (x ``ep`` for a Mixture-of-Experts model), score every prunable unit, and
    save the scores (rank 0) to ``out``."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.checkpoint.outputs import check_output_path
    from megatron_prune.data import calibration_windows
    from megatron_prune.importance import compute_importance, lm_loss_drop
    from megatron_prune.runtime import barrier, init_distributed, is_rank0, log0

    check_output_path(out, {"input checkpoint": ckpt, "data file": f"{data_prefix}.bin",
                            "data index": f"{data_prefix}.idx"})
    check_importance(ckpt, data_prefix, out, num_samples, seq_len, micro_batch_size, lm_loss_blocks, lm_loss_samples,
                     tp, pp, ep)
    init_distributed(tp, pp, seed=seed, ep=ep)
    model, meta = load_model(ckpt, use_te=False)  # the hooks read norm outputs, which TE fuses away
    windows = calibration_windows(data_prefix, num_samples, seq_len, seed)
    log0(f"importance of {ckpt} ({meta.arch.describe()}) on {num_samples} x {seq_len} tokens, "
         f"aggregation seq={seq_agg} batch={batch_agg}, TP={tp} PP={pp}")
    scores = compute_importance(model, meta.arch, windows[:, :-1], micro_batch_size, seq_agg, batch_agg,
                                head_metric=head_metric)
    if lm_loss_blocks:
        n = min(lm_loss_samples, len(windows))
        log0(f"LM-loss drop for blocks of {list(lm_loss_blocks)} layers on {n} samples")
        scores.base_lm_loss, scores.loss_drop = lm_loss_drop(model, meta.arch, windows[:n], micro_batch_size,
                                                             block_sizes=lm_loss_blocks, desc="lm-loss drop")
    scores.extra.update({"checkpoint": str(Path(ckpt).absolute()), "data": str(data_prefix), "seed": seed})
    if is_rank0():
        scores.save(out)
    barrier()
    log0(f"scores written to {out}")
    return scores
