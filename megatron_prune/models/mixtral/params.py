"""Mixtral's parameters: the Llama attention and norms, and a MoE layer per decoder layer.

megatron's MoE layer holds the router (``mlp.router.weight``, one row per expert, replicated over TP) and the
experts; each expert is a SwiGLU MLP whose fc1 stacks gate over up, split over TP like a dense MLP
(expert-tensor-parallel size = TP). The local spec names an expert ``mlp.experts.local_experts.<e>.``, Transformer
Engine's grouped GEMM ``mlp.experts.linear_fc1.weight<e>``; both are listed. ``{e}`` is the expert's index.
"""

from megatron_prune.models.family import Param
from megatron_prune.models.llama.params import _NORMS, ATTENTION_PARAMS, GLOBAL_PARAMS


def moe_params(router: str, gate: str, up: str, down: str) -> tuple[Param, ...]:
    """The router and expert rows of a MoE layer, given the Hugging Face names inside ``model.layers.<i>.``."""
    rows = [Param("mlp.router.weight", (router,), ("experts", "hidden"))]
    local = "mlp.experts.local_experts.{e}."
    for fc1, fc2 in ((local + "linear_fc1.weight", local + "linear_fc2.weight"),
                     ("mlp.experts.linear_fc1.weight{e}", "mlp.experts.linear_fc2.weight{e}")):
        rows.append(Param(fc1, (gate, up), ("moe_ffn", "hidden"), tp_dim=0, fused="gate_up"))
        rows.append(Param(fc2, (down,), ("hidden", "moe_ffn"), tp_dim=1))
    return tuple(rows)


MOE_PARAMS = moe_params("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                        "block_sparse_moe.experts.{e}.w3.weight", "block_sparse_moe.experts.{e}.w2.weight")

PARAMS = GLOBAL_PARAMS + _NORMS + ATTENTION_PARAMS + MOE_PARAMS
