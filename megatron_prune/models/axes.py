"""The pruning axes: one name per axis, used by ``--target``, search spaces, plans and score files alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Axis:
    """``name``: what users type (``--target ffn=1024``) and what code calls it; ``arch_field``: the ModelArch
    field it sets; ``per_layer``: kept units are chosen per layer (else once for the whole model);
    ``aliases``: other spellings ``--target`` accepts."""

    name: str
    arch_field: str
    per_layer: bool
    help: str
    aliases: tuple[str, ...] = ()


AXES: tuple[Axis, ...] = (
    Axis("hidden", "hidden_size", False, "model width: embedding channels, every norm, every linear layer's input"),
    Axis("ffn", "ffn_hidden_size", True, "MLP neurons per layer"),
    Axis("heads", "num_attention_heads", True, "attention (query) heads, the same number in every query group"),
    Axis("query_groups", "num_query_groups", True, "key/value heads (GQA groups) with their query heads",
         aliases=("groups",)),
    Axis("layers", "num_layers", False, "decoder layers (depth)"),
    # Mixture of Experts (Mixtral, Qwen3-MoE)
    Axis("experts", "num_experts", True, "MoE experts per layer: each layer drops its lowest-scoring experts "
         "(expert_metric=reap|output_l2|tokens|router_prob) and the router's rows for them"),
    Axis("moe_ffn", "moe_ffn_hidden_size", True, "FFN neurons of every expert, one common width"),
    Axis("topk", "moe_router_topk", False, "experts the router picks per token (num_experts_per_tok)",
         aliases=("top_k",)),
)
