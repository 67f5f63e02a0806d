"""Qwen3-MoE's parameters: Qwen3's attention with its q/k norms, and Mixtral's MoE rows under Qwen's names."""

from megatron_prune.models.family import Param
from megatron_prune.models.llama.params import _NORMS, ATTENTION_PARAMS, GLOBAL_PARAMS
from megatron_prune.models.mixtral.params import moe_params
from megatron_prune.models.qwen3.params import QK_NORM_PARAMS

MOE_PARAMS = moe_params("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                        "mlp.experts.{e}.down_proj.weight")

PARAMS: tuple[Param, ...] = GLOBAL_PARAMS + _NORMS + ATTENTION_PARAMS + QK_NORM_PARAMS + MOE_PARAMS
