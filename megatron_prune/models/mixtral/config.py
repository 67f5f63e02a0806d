"""Mixtral configs: Hugging Face ``mixtral`` <-> ModelArch, the NeMo 2 classes, the layer spec (MoE)."""

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

MODEL_TYPES = ("mixtral",)
NEMO_CLASSES: dict = {}  # NeMo 2 MoE configs are not written (yet): nemo_kind says so


def moe_fields(c: dict, experts_key: str, ffn: int, norm_topk_prob: bool) -> dict:
    """The ModelArch MoE fields of a config; a shape megatron cannot build fails here with the fix (experts=0,
    top-k > experts). transformers 5 writes every family's expert count as ``num_local_experts``."""
    experts = c.get(experts_key, c.get("num_local_experts"))
    topk = c.get("num_experts_per_tok")
    if not experts or experts < 1:
        raise ArchError(f"{experts_key}={experts}: a Mixture-of-Experts model needs at least 1 expert; "
                        f"set {experts_key} >= 1")
    if not topk or not 1 <= topk <= experts:
        raise ArchError(f"num_experts_per_tok={topk} must be between 1 and {experts_key}={experts}: "
                        f"lower num_experts_per_tok to at most {experts}")
    return dict(num_experts=experts, moe_ffn_hidden_size=ffn, moe_router_topk=topk,
                moe_norm_topk_prob=norm_topk_prob, moe_aux_loss_coeff=float(c.get("router_aux_loss_coef") or 0.0))


def arch_from_hf(c: dict) -> ModelArch:
    """ModelArch from a ``mixtral`` config.json dict (router jitter noise acts in training only: not kept)."""
    check_silu(c)
    check_full_attention(c, windows_on=True)
    rope_theta, scaling_factor = hf_rope(c)
    return ModelArch(**hf_shape_fields(c), rope_base=rope_theta, rope_scaling_factor=scaling_factor,
                     model_type="mixtral", **moe_fields(c, "num_local_experts", c["intermediate_size"], True))


def hf_export_model_type(arch: ModelArch) -> str:
    check_plain_swiglu(arch, "mixtral")
    if arch.num_experts is None or arch.qk_norm or not arch.moe_norm_topk_prob:
        raise ArchError("a mixtral export needs experts, renormalised top-k gate weights and no q/k norms")
    return "mixtral"


def hf_config(arch: ModelArch, extra: Optional[dict] = None):
    """A transformers MixtralConfig (``intermediate_size`` is each expert's width)."""
    import transformers

    hf_export_model_type(arch)
    return build_hf_config(transformers.MixtralConfig, "MixtralForCausalLM", arch,
                           dict(intermediate_size=arch.moe_ffn_hidden_size, num_local_experts=arch.num_experts,
                                num_experts_per_tok=arch.moe_router_topk, router_aux_loss_coef=arch.moe_aux_loss_coeff,
                                sliding_window=None), extra)


def nemo_kind(arch: ModelArch) -> str:
    raise ArchError("--to nemo does not write Mixture-of-Experts models yet; export with --to hf instead")


def layer_spec(arch: ModelArch, use_te: bool):
    return local_or_te_spec(arch, use_te)
