"""The Llama family: Hugging Face ``llama`` (Llama 2/3/3.1, SmolLM), ``mistral`` (full attention) and ``qwen2``
(qkv biases). RoPE, RMSNorm, SwiGLU, grouped-query attention."""

from megatron_prune.models.family import family_from_config
from megatron_prune.models.llama import config
from megatron_prune.models.llama.params import PARAMS

FAMILY = family_from_config("llama", config, PARAMS)
