"""`megatron-prune train`: plain next-token training (a CE baseline, or teacher correction before KD)."""

from __future__ import annotations

from typing import Optional

from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.distill.config import TrainConfig


def train(config: Optional[str] = None, **overrides) -> None:
    """Train with the LM loss only, from a YAML file of TrainConfig fields plus keyword overrides."""
    from megatron_prune.distill.trainer import train as run_trainer

    cfg = TrainConfig.from_yaml(config, **overrides)
    check_output_path(cfg.out, {"student checkpoint": cfg.student, "teacher checkpoint": cfg.teacher})
    if cfg.teacher:
        raise ValueError("`train` trains without a teacher; use `distill` for knowledge distillation")
    run_trainer(cfg)
