"""`megatron-prune distill`: a student learns from a frozen teacher on the same TP/PP groups (KD)."""

from __future__ import annotations

from typing import Optional

from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.training.config import TrainConfig


def distill(config: Optional[str] = None, **overrides) -> None:
    """Run knowledge distillation from a YAML file of TrainConfig fields plus keyword overrides."""
    from megatron_prune.pipelines.train import check_training
    from megatron_prune.training.trainer import train

    cfg = TrainConfig.from_yaml(config, **overrides)
    check_output_path(cfg.out, {"student checkpoint": cfg.student, "teacher checkpoint": cfg.teacher,
                                "teacher logits": cfg.teacher_logits})
    if not cfg.teacher and not cfg.teacher_logits:
        raise ValueError("`distill` needs --teacher (or teacher: in the YAML), or --teacher-logits DIR written by "
                         "`megatron-prune teacher-logits`; use `train` for LM-loss training")
    check_training(cfg)
    train(cfg)
