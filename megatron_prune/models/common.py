"""Hugging Face config reading shared by the families (RoPE, activation, sliding windows)."""

from __future__ import annotations

from typing import Optional

from megatron_prune.arch import LLAMA3_ROPE_DEFAULTS, ArchError


def hf_rope(c: dict) -> tuple[float, Optional[float]]:
    """(rope_theta, Llama-3.1 scaling factor or None) from a transformers 4 or 5 style config dict.

    Only the scalings megatron-core computes exactly are accepted: none, or Llama-3.1's ``llama3``.
    """
    params = c.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta, scaling = c.get("rope_theta", 10000.0), c.get("rope_scaling")
    if not scaling:
        return float(theta), None
    rtype = scaling.get("rope_type", scaling.get("type"))
    if rtype != "llama3":
        raise ArchError(f"RoPE scaling type {rtype!r} is not supported (only Llama-3.1 'llama3' scaling)")
    for k, v in LLAMA3_ROPE_DEFAULTS.items():
        if float(scaling.get(k, v)) != float(v):
            raise ArchError(f"llama3 RoPE scaling with {k}={scaling.get(k)} is not supported (needs {v})")
    return float(theta), float(scaling["factor"])


def check_silu(c: dict) -> None:
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ArchError(f"hidden_act={act!r} is not supported; these families use SiLU (SwiGLU)")


def check_full_attention(c: dict, windows_on: bool) -> None:
    """Sliding-window attention is refused when it is on and shorter than the context."""
    window = c.get("sliding_window")
    if window is not None and windows_on and window < c.get("max_position_embeddings", 0):
        raise ArchError(f"sliding-window attention (sliding_window={window}) is not supported; models with "
                        "sliding_window=null (e.g. Mistral v0.2+) or use_sliding_window=false are")


def hf_shape_fields(c: dict) -> dict:
    """The ModelArch fields every Llama-like Hugging Face config spells the same way."""
    heads = c["num_attention_heads"]
    return dict(
        num_layers=c["num_hidden_layers"],
        hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=c.get("num_key_value_heads") or heads,
        kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
        vocab_size=c["vocab_size"],
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        normalization="RMSNorm",
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        activation="swiglu",
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def hf_config_kwargs(arch) -> dict:
    """The transformers config arguments every Llama-like family writes the same way (``head_dim`` always:
    pruning ``hidden`` or ``heads`` leaves it != hidden / heads)."""
    return dict(
        num_hidden_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_eps,
        hidden_act="silu",
        tie_word_embeddings=arch.tie_embeddings,
    )


def build_hf_config(config_cls, architecture: str, arch, fields: dict, extra: Optional[dict] = None):
    """A transformers ``config_cls``: the fields every Llama-like family shares, the family's own ``fields``, RoPE
    as this transformers release spells it, ``architectures``, then ``extra`` (which wins)."""
    from megatron_prune.runtime.compat import rope_config_kwargs

    return config_cls(**{**hf_config_kwargs(arch), **fields,
                         **rope_config_kwargs(config_cls, arch.hf_rope_parameters()),
                         "architectures": [architecture], **(extra or {})})


def check_plain_swiglu(arch, model_type: str) -> None:
    """The exports of families without biases (Qwen3, Mixtral, Qwen3-MoE): RMSNorm, SwiGLU, no linear biases."""
    if arch.normalization != "RMSNorm" or arch.activation != "swiglu" or arch.qkv_bias or arch.linear_bias:
        raise ArchError(f"a {model_type} export needs RMSNorm, SwiGLU and no linear biases")


def local_or_te_spec(arch, use_te: bool, qk_layernorm: bool = False):
    """megatron-core's GPT layer spec: Transformer Engine's, or the local one (CPU, importance hooks). A MoE
    shape (``arch.num_experts``) gets megatron's MoE layer: TE's grouped-GEMM experts on a GPU, the sequential
    local experts (one MLP each) otherwise."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    experts = getattr(arch, "num_experts", None)
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=experts is not None,
                                                          qk_layernorm=qk_layernorm)
    return get_gpt_layer_local_spec(num_experts=experts, normalization=arch.normalization, qk_layernorm=qk_layernorm)
