"""`megatron-prune train`: plain next-token training (a CE baseline, or teacher correction before KD)."""

from __future__ import annotations

from typing import Optional

from megatron_prune import inputs
from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.training.config import TrainConfig


def check_training(cfg: TrainConfig) -> None:
    """The checkpoints and data of a `train`/`distill` run, before any process group or weight
    (TrainConfig.validate has checked the numbers)."""
    from megatron_prune.data.blend import parse_blend

    student = inputs.checkpoint(cfg.student, "--student")
    teacher = inputs.checkpoint(cfg.teacher, "--teacher") if cfg.teacher else None
    inputs.training_models(student.arch, teacher and teacher.arch, cfg.tp, cfg.pp, cfg.vpp, cfg.ep,
                           cfg.seq_len)
    items = cfg.data.split() if isinstance(cfg.data, str) else [str(d) for d in cfg.data]
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if weighted:
        weights = items[0::2]
        bad = [w for w in weights if not _is_positive_number(w)]
        if len(items) % 2 or bad:
            raise inputs.InputError(f"--data {' '.join(items)}: a weighted blend is WEIGHT PREFIX pairs with positive "
                                    f"weights, e.g. --data 0.7 data/a_train 0.3 data/b_train")
    for prefix in (items[1::2] if weighted else items):
        inputs.indexed_data(prefix, "--data")
    parse_blend(items)
    if cfg.valid_data:
        inputs.enough_windows(inputs.indexed_data(cfg.valid_data, "--valid-data"), cfg.seq_len, 1, "--valid-data",
                              "lower --seq-len or use more data")
    if cfg.teacher_logits:  # offline KD: the file matches the run (vocab, data, seq_len, seed, samples, K)
        from megatron_prune.distill.offline import open_for_run

        open_for_run(cfg, student.arch.vocab_size)
    inputs.output(cfg.out, "--out", overwrite=None)  # an existing run directory is resumed


def _is_positive_number(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def train(config: Optional[str] = None, **overrides) -> None:
    """Train with the LM loss only, from a YAML file of TrainConfig fields plus keyword overrides."""
    from megatron_prune.training.trainer import train as run_trainer

    cfg = TrainConfig.from_yaml(config, **overrides)
    check_output_path(cfg.out, {"student checkpoint": cfg.student, "teacher checkpoint": cfg.teacher})
    if cfg.teacher or cfg.teacher_logits:
        raise ValueError("`train` trains without a teacher; use `distill` for knowledge distillation")
    check_training(cfg)
    run_trainer(cfg)
