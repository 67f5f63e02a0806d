"""Qwen3's parameters: the Llama table plus one RMSNorm over head_dim for the queries and one for the keys.

Each norm is a single head_dim-sized vector shared by every head (megatron's ``q_layernorm`` /
``k_layernorm``, Hugging Face's ``q_norm`` / ``k_norm``): no pruning axis touches it. Heads and query groups
keep their width (head_dim), and hidden pruning never reaches inside a head.
"""

from megatron_prune.models.family import Param
from megatron_prune.models.llama.params import PARAMS as LLAMA_PARAMS

QK_NORM_PARAMS = (
    Param("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), (None,)),
    Param("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), (None,)),
)

PARAMS = LLAMA_PARAMS + QK_NORM_PARAMS
