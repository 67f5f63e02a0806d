"""Qwen3-MoE configs: Hugging Face ``qwen3_moe`` <-> ModelArch, the NeMo 2 classes, the layer spec (q/k norm, MoE)."""

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
from megatron_prune.models.mixtral.config import moe_fields

MODEL_TYPES = ("qwen3_moe",)
NEMO_CLASSES: dict = {}  # NeMo 2 MoE configs are not written (yet): nemo_kind says so


def arch_from_hf(c: dict) -> ModelArch:
    """ModelArch from a ``qwen3_moe`` config.json dict: every layer a MoE layer (``decoder_sparse_step`` 1, no
    ``mlp_only_layers``); ``intermediate_size`` (the width of dense layers, which there are none of) is kept."""
    check_silu(c)
    check_full_attention(c, windows_on=bool(c.get("use_sliding_window")))
    if c.get("attention_bias"):
        raise ArchError("Qwen3-MoE with attention_bias=true is not supported (megatron has one switch for the "
                        "output projection and MLP biases)")
    if c.get("mlp_only_layers") or c.get("decoder_sparse_step", 1) != 1:
        raise ArchError("Qwen3-MoE with dense layers among the MoE ones (mlp_only_layers, decoder_sparse_step != 1) "
                        "is not supported: every layer must be a MoE layer")
    rope_theta, scaling_factor = hf_rope(c)
    return ModelArch(**hf_shape_fields(c), rope_base=rope_theta, rope_scaling_factor=scaling_factor, qk_norm=True,
                     model_type="qwen3_moe",
                     **moe_fields(c, "num_experts", c["moe_intermediate_size"], bool(c.get("norm_topk_prob"))))


def hf_export_model_type(arch: ModelArch) -> str:
    check_plain_swiglu(arch, "qwen3_moe")
    if arch.num_experts is None or not arch.qk_norm:
        raise ArchError("a qwen3_moe export needs experts and the per-head q/k norms (qk_norm)")
    return "qwen3_moe"


def hf_config(arch: ModelArch, extra: Optional[dict] = None):
    """A transformers Qwen3MoeConfig: every layer sparse, ``head_dim`` explicit."""
    import transformers

    hf_export_model_type(arch)
    return build_hf_config(transformers.Qwen3MoeConfig, "Qwen3MoeForCausalLM", arch,
                           dict(moe_intermediate_size=arch.moe_ffn_hidden_size, num_experts=arch.num_experts,
                                num_experts_per_tok=arch.moe_router_topk, norm_topk_prob=arch.moe_norm_topk_prob,
                                router_aux_loss_coef=arch.moe_aux_loss_coeff, decoder_sparse_step=1,
                                mlp_only_layers=[], attention_bias=False, use_sliding_window=False,
                                sliding_window=None, max_window_layers=arch.num_layers), extra)


def nemo_kind(arch: ModelArch) -> str:
    raise ArchError("--to nemo does not write Mixture-of-Experts models yet; export with --to hf instead")


def layer_spec(arch: ModelArch, use_te: bool):
    return local_or_te_spec(arch, use_te, qk_layernorm=True)
