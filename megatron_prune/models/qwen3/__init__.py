"""Qwen3 (dense): Qwen3-0.6B ... 32B. The Llama layout plus RMSNorm over head_dim on every query and key head
before RoPE, an explicit head_dim (128), no biases, tied embeddings in the small sizes."""

from megatron_prune.models.family import Family
from megatron_prune.models.qwen3 import config
from megatron_prune.models.qwen3.params import PARAMS

FAMILY = Family(
    name="qwen3",
    model_types=config.MODEL_TYPES,
    params=PARAMS,
    arch_from_hf=config.arch_from_hf,
    hf_config=config.hf_config,
    hf_export_model_type=config.hf_export_model_type,
    nemo_classes=config.NEMO_CLASSES,
    nemo_kind=config.nemo_kind,
    layer_spec=config.layer_spec,
)
