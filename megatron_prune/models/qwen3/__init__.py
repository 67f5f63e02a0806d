"""Qwen3 (dense): Qwen3-0.6B ... 32B. The Llama layout plus RMSNorm over head_dim on every query and key head
before RoPE, an explicit head_dim (128), no biases, tied embeddings in the small sizes."""

from megatron_prune.models.family import family_from_config
from megatron_prune.models.qwen3 import config
from megatron_prune.models.qwen3.params import PARAMS

FAMILY = family_from_config("qwen3", config, PARAMS)
