"""Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B, Coder-480B): Qwen3's attention (q/k RMSNorm, explicit head_dim) and in
every layer a softmax top-k router over SwiGLU experts of width ``moe_intermediate_size``, the k gate weights
renormalised when ``norm_topk_prob``; no shared expert."""

from megatron_prune.models.family import family_from_config
from megatron_prune.models.qwen3_moe import config
from megatron_prune.models.qwen3_moe.params import PARAMS

FAMILY = family_from_config("qwen3_moe", config, PARAMS)
