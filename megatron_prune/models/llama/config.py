"""Llama family configs: Hugging Face ``llama`` / ``mistral`` / ``qwen2`` <-> ModelArch, NeMo 2 classes, layer spec."""

from __future__ import annotations

from typing import Optional

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.models.common import (
    build_hf_config,
    check_full_attention,
    check_silu,
    hf_rope,
    hf_shape_fields,
    local_or_te_spec,
)

MODEL_TYPES = ("llama", "mistral", "qwen2")

# NeMo 2 (model class, config class) per kind; "llama31" is a Llama with Llama-3.1 RoPE scaling
NEMO_CLASSES = {
    "llama": ("nemo.collections.llm.gpt.model.llama.LlamaModel", "nemo.collections.llm.gpt.model.llama.LlamaConfig"),
    "llama31": ("nemo.collections.llm.gpt.model.llama.LlamaModel",
                "nemo.collections.llm.gpt.model.llama.Llama31Config"),
    "mistral": ("nemo.collections.llm.gpt.model.mistral.MistralModel",
                "nemo.collections.llm.gpt.model.mistral.MistralConfig7B"),
    "qwen2": ("nemo.collections.llm.gpt.model.qwen2.Qwen2Model", "nemo.collections.llm.gpt.model.qwen2.Qwen2Config"),
}


def arch_from_hf(c: dict) -> ModelArch:
    """ModelArch from a ``llama``, ``mistral`` or ``qwen2`` config.json dict."""
    model_type = c.get("model_type")
    check_silu(c)
    check_full_attention(c, windows_on=model_type != "qwen2" or bool(c.get("use_sliding_window")))
    rope_theta, scaling_factor = hf_rope(c)
    if model_type == "qwen2":
        qkv_bias, linear_bias = True, False
    else:
        attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise ArchError("attention_bias and mlp_bias must be equal (megatron has one switch for both)")
        qkv_bias = linear_bias = attn_bias
    return ModelArch(**hf_shape_fields(c), rope_base=rope_theta, rope_scaling_factor=scaling_factor,
                     qkv_bias=qkv_bias, linear_bias=linear_bias, model_type=model_type)


def hf_export_model_type(arch: ModelArch) -> str:
    """The Hugging Face model_type this shape exports to; ArchError when none of the family can hold it.

    Usually ``model_type`` itself. A Llama whose hidden size is not a multiple of its head count (which
    pruning ``hidden`` or ``heads`` easily produces: hidden 448 with 9 heads, Minitron-8B's 4096 with 48)
    exports as ``mistral`` with ``sliding_window: null``: the same network as Llama with an explicit
    ``head_dim``, but without LlamaConfig's ``hidden_size % num_attention_heads == 0`` check, which
    transformers 5 enforces when the config is built and loaded.
    """
    if arch.normalization != "RMSNorm" or arch.activation != "swiglu":
        raise ArchError(f"{arch.normalization} + {arch.activation} has no Hugging Face Llama-family config: "
                        "only RMSNorm + SwiGLU shapes export")
    if arch.model_type == "qwen2":
        if not arch.qkv_bias or arch.linear_bias:
            raise ArchError("a qwen2 export needs qkv biases and no other linear biases")
        return "qwen2"
    if arch.model_type == "mistral" or arch.hidden_size % arch.num_attention_heads == 0:
        if arch.model_type == "mistral" and (arch.qkv_bias or arch.linear_bias):
            raise ArchError("a mistral export cannot have linear biases")
        if arch.qkv_bias != arch.linear_bias:
            raise ArchError("a llama export has biases on all linear layers or none")
        return arch.model_type
    if arch.qkv_bias or arch.linear_bias:
        raise ArchError(
            f"hidden size {arch.hidden_size} is not a multiple of {arch.num_attention_heads} attention heads, "
            "which transformers' LlamaConfig refuses, and this model's linear biases rule out the Mistral "
            "config used instead: choose hidden/heads so that hidden % heads == 0 "
            f"(e.g. hidden={arch.num_attention_heads * (arch.hidden_size // arch.num_attention_heads)})"
        )
    return "mistral"


def hf_config(arch: ModelArch, extra: Optional[dict] = None):
    """A transformers LlamaConfig, MistralConfig or Qwen2Config, with ``architectures``."""
    import transformers

    model_type = hf_export_model_type(arch)
    if model_type == "qwen2":
        return build_hf_config(transformers.Qwen2Config, "Qwen2ForCausalLM", arch, {}, extra)
    if model_type == "mistral":
        return build_hf_config(transformers.MistralConfig, "MistralForCausalLM", arch, {"sliding_window": None},
                               extra)
    return build_hf_config(transformers.LlamaConfig, "LlamaForCausalLM", arch,
                           {"attention_bias": arch.linear_bias, "mlp_bias": arch.linear_bias}, extra)


def nemo_kind(arch: ModelArch) -> str:
    if arch.model_type == "llama" and arch.rope_scaling_factor:
        return "llama31"
    return arch.model_type if arch.model_type in NEMO_CLASSES else "llama"


def layer_spec(arch: ModelArch, use_te: bool):
    return local_or_te_spec(arch, use_te)
