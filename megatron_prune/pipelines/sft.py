"""`megatron-prune sft`: supervised fine-tuning on SFT JSONL, loss on the answer tokens only."""

from __future__ import annotations

from typing import Optional

from megatron_prune import inputs
from megatron_prune.training.config import TrainConfig


def sft_records(path, name: str = "--data") -> list[dict]:
    """Every record of an SFT JSONL file, checked (errors name FILE:LINE)."""
    from megatron_prune.data.sft import read_sft_jsonl

    inputs.existing_file(path, name, "give SFT JSONL, e.g. from `megatron-prune data --corpus sft --out DIR`")
    try:
        return read_sft_jsonl(path)
    except ValueError as e:
        raise inputs.InputError(f"{name} {e}; each line is {{'instruction', 'input'?, 'output'}} or "
                                f"{{'messages': [...]}} ending with the assistant's answer") from e


def check_sft(cfg: TrainConfig) -> None:
    """The checkpoint, data and output of an `sft` run, before any process group, tokenizer or weight
    (TrainConfig.validate has checked the numbers)."""
    from megatron_prune.checkpoint.outputs import check_output_path

    check_output_path(cfg.out, {"student checkpoint": cfg.student, "validation data": cfg.valid_data and
                                f"{cfg.valid_data}.bin"})
    for d in cfg.data:
        check_output_path(cfg.out, {"SFT data": d})
    student = inputs.checkpoint(cfg.student, "--student")
    inputs.training_models(student.arch, None, cfg.tp, cfg.pp, cfg.vpp, cfg.ep, cfg.seq_len)
    inputs.chat_tokenizer(cfg.student, "--student")
    for d in cfg.data:
        sft_records(d)
    if cfg.valid_data:
        inputs.enough_windows(inputs.indexed_data(cfg.valid_data, "--valid-data"), cfg.seq_len, 1, "--valid-data",
                              "lower --seq-len or use more data")
    inputs.output(cfg.out, "--out", overwrite=None)  # an existing run directory is resumed


def sft(config: Optional[str] = None, **overrides) -> list[dict]:
    """Fine-tune ``student`` on SFT JSONL files (instruction or chat form) through the distillation trainer."""
    from megatron_prune.data.sft import is_sft_data
    from megatron_prune.training.trainer import train as run_trainer

    cfg = TrainConfig.from_yaml(config, **overrides)
    if cfg.teacher:
        raise ValueError("`sft` trains without a teacher; use `distill` for knowledge distillation")
    if not is_sft_data(cfg.data):
        raise ValueError(f"`sft --data` takes SFT JSONL files (*.jsonl), got {cfg.data}; use `train` for Megatron "
                         f"indexed datasets, and `megatron-prune data --corpus sft --out DIR` for the offline SFT set")
    check_sft(cfg)
    return run_trainer(cfg)
