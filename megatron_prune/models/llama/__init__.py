"""The Llama family: Hugging Face ``llama`` (Llama 2/3/3.1, SmolLM), ``mistral`` (full attention) and ``qwen2``
(qkv biases). RoPE, RMSNorm, SwiGLU, grouped-query attention."""

from megatron_prune.models.family import Family
from megatron_prune.models.llama import config
from megatron_prune.models.llama.params import PARAMS

FAMILY = Family(
    name="llama",
    model_types=config.MODEL_TYPES,
    params=PARAMS,
    arch_from_hf=config.arch_from_hf,
    hf_config=config.hf_config,
    hf_export_model_type=config.hf_export_model_type,
    nemo_classes=config.NEMO_CLASSES,
    nemo_kind=config.nemo_kind,
    layer_spec=config.layer_spec,
)
