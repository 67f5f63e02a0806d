"""The Llama family's parameters (Llama 2/3/3.1, Mistral, Qwen2, SmolLM): megatron name, Hugging Face names,
how fused tensors split, the tensor-parallel dimension and the pruning kind of every dimension."""

from megatron_prune.models.family import Param

# embedding, final norm and output layer (whole names)
GLOBAL_PARAMS = (
    Param("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ("vocab", "hidden"), tp_dim=0,
          layer=False),
    Param("output_layer.weight", ("lm_head.weight",), ("vocab", "hidden"), tp_dim=0, layer=False),
    Param("decoder.final_layernorm.weight", ("model.norm.weight",), ("hidden",), layer=False),
    Param("decoder.final_layernorm.bias", ("model.norm.bias",), ("hidden",), layer=False),
)

# inside model.layers.<i>. ; the Transformer Engine spec fuses the norms into the next linear layer and names
# them ``linear_qkv.layer_norm_*`` / ``linear_fc1.layer_norm_*``: both spellings are listed
_NORMS = tuple(
    Param(name, (hf,), ("hidden",))
    for kind in ("weight", "bias")
    for name, hf in (
        (f"input_layernorm.{kind}", f"input_layernorm.{kind}"),
        (f"self_attention.linear_qkv.layer_norm_{kind}", f"input_layernorm.{kind}"),
        (f"pre_mlp_layernorm.{kind}", f"post_attention_layernorm.{kind}"),
        (f"mlp.linear_fc1.layer_norm_{kind}", f"post_attention_layernorm.{kind}"),
    )
)

ATTENTION_PARAMS = (
    Param("self_attention.linear_qkv.weight",
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          ("qkv", "hidden"), tp_dim=0, fused="qkv"),
    Param("self_attention.linear_qkv.bias",
          ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
          ("qkv",), tp_dim=0, fused="qkv"),
    Param("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ("hidden", "heads"), tp_dim=1),
    Param("self_attention.linear_proj.bias", ("self_attn.o_proj.bias",), ("hidden",)),
)

MLP_PARAMS = (
    Param("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ("ffn", "hidden"), tp_dim=0,
          fused="gate_up"),
    Param("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), ("ffn",), tp_dim=0, fused="gate_up"),
    Param("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ("hidden", "ffn"), tp_dim=1),
    Param("mlp.linear_fc2.bias", ("mlp.down_proj.bias",), ("hidden",)),
)

PARAMS = GLOBAL_PARAMS + _NORMS + ATTENTION_PARAMS + MLP_PARAMS
