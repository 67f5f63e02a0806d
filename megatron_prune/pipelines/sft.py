"""`megatron-prune sft`: supervised fine-tuning on SFT JSONL, loss on the answer tokens only."""

from __future__ import annotations

from typing import Optional

from megatron_prune.distill.config import TrainConfig


def sft(config: Optional[str] = None, **overrides) -> list[dict]:
    """Fine-tune ``student`` on SFT JSONL files (instruction or chat form) through the distillation trainer."""
    from megatron_prune.data.sft import is_sft_data
    from megatron_prune.distill.trainer import train as run_trainer

    cfg = TrainConfig.from_yaml(config, **overrides)
    if cfg.teacher:
        raise ValueError("`sft` trains without a teacher; use `distill` for knowledge distillation")
    if not is_sft_data(cfg.data):
        raise ValueError(f"`sft --data` takes SFT JSONL files (*.jsonl), got {cfg.data}; use `train` for Megatron "
                         f"indexed datasets, and `megatron-prune data --corpus sft --out DIR` for the offline SFT set")
    return run_trainer(cfg)
