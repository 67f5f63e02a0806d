"""Qwen3 (dense) configs: Hugging Face ``qwen3`` <-> ModelArch, the NeMo 2 classes, the layer spec (q/k norm)."""

from __future__ import annotations

from typing import Optional

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.models.common import (
    build_hf_config,
    check_full_attention,
    check_plain_swiglu,
    check_silu,
    hf_rope,
    hf_shape_fields,
    local_or_te_spec,
)

MODEL_TYPES = ("qwen3",)
NEMO_CLASSES = {
    "qwen3": ("nemo.collections.llm.gpt.model.qwen3.Qwen3Model", "nemo.collections.llm.gpt.model.qwen3.Qwen3Config"),
}


def arch_from_hf(c: dict) -> ModelArch:
    """ModelArch from a ``qwen3`` config.json dict: explicit head_dim, q/k RMSNorm, no biases."""
    check_silu(c)
    check_full_attention(c, windows_on=bool(c.get("use_sliding_window")))
    if c.get("attention_bias"):
        raise ArchError("Qwen3 with attention_bias=true (biases on q/k/v and o_proj but not the MLP) is not "
                        "supported: megatron has one switch for the output projection and MLP biases")
    rope_theta, scaling_factor = hf_rope(c)
    return ModelArch(**hf_shape_fields(c), rope_base=rope_theta, rope_scaling_factor=scaling_factor,
                     qk_norm=True, model_type="qwen3")


def hf_export_model_type(arch: ModelArch) -> str:
    check_plain_swiglu(arch, "qwen3")
    if not arch.qk_norm:
        raise ArchError("a qwen3 export needs the per-head q/k norms (qk_norm)")
    return "qwen3"


def hf_config(arch: ModelArch, extra: Optional[dict] = None):
    """A transformers Qwen3Config (``head_dim`` explicit, so any hidden/heads ratio exports)."""
    import transformers

    hf_export_model_type(arch)
    return build_hf_config(transformers.Qwen3Config, "Qwen3ForCausalLM", arch,
                           dict(attention_bias=False, use_sliding_window=False, sliding_window=None,
                                max_window_layers=arch.num_layers), extra)


def nemo_kind(arch: ModelArch) -> str:
    return "qwen3"


def layer_spec(arch: ModelArch, use_te: bool):
    return local_or_te_spec(arch, use_te, qk_layernorm=True)
