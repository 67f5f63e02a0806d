"""Checkpoints in and out: Megatron distributed checkpoints, Hugging Face directories, GGUF."""

from megatron_prune.checkpoint.megatron import (
    CheckpointError,
    CheckpointMeta,
    load_into,
    load_model,
    read_meta,
    save_checkpoint,
    tokenizer_dir,
)

__all__ = ["CheckpointError", "CheckpointMeta", "load_into", "load_model", "read_meta", "save_checkpoint",
           "tokenizer_dir"]
