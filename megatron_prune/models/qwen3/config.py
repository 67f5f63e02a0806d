"""Qwen3 (dense) configs: Hugging Face ``qwen3`` <-> ModelArch, the NeMo 2 classes, the layer spec (q/k norm)."""

from __future__ import annotations

from typing import Any, Optional

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.models.common import (
    check_full_attention,
    check_silu,
    hf_config_kwargs,
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
    if arch.normalization != "RMSNorm" or arch.activation != "swiglu" or arch.qkv_bias or arch.linear_bias:
        raise ArchError("a qwen3 export needs RMSNorm, SwiGLU and no linear biases")
    if not arch.qk_norm:
        raise ArchError("a qwen3 export needs the per-head q/k norms (qk_norm)")
    return "qwen3"


def hf_config(arch: ModelArch, extra: Optional[dict] = None):
    """A transformers Qwen3Config (``head_dim`` explicit, so any hidden/heads ratio exports)."""
    import transformers

    from megatron_prune.runtime.compat import rope_config_kwargs

    hf_export_model_type(arch)
    kwargs: dict[str, Any] = hf_config_kwargs(arch)
    kwargs.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                  max_window_layers=arch.num_layers)
    kwargs.update(rope_config_kwargs(transformers.Qwen3Config, arch.hf_rope_parameters()))
    kwargs["architectures"] = ["Qwen3ForCausalLM"]
    if extra:
        kwargs.update(extra)
    return transformers.Qwen3Config(**kwargs)


def nemo_kind(arch: ModelArch) -> str:
    return "qwen3"


def layer_spec(arch: ModelArch, use_te: bool):
    return local_or_te_spec(arch, use_te, qk_layernorm=True)
