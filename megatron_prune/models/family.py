"""What an architecture family is, as data: its parameter table and the functions that read and write its configs.

A family (``models/<name>/``) describes one kind of decoder to the generic code. The generic code (HF import
and export, pruning of sharded checkpoints, NeMo configs, the layer spec) loops over the family's
:class:`Param` rows and calls its functions; it never names a family itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# What a pruning axis does to one dimension of a parameter (see models/axes.py for the axes themselves):
#   "hidden"  the model width: kept_hidden is selected (never split over TP)
#   "ffn"     MLP neurons of the layer: kept_ffn[layer]
#   "qkv"     rows of megatron's fused QKV, per query group [q heads of g, k of g, v of g]: kept groups and heads
#   "heads"   columns of the attention output projection, head by head: kept groups and heads
#   "vocab"   vocabulary rows (padded in megatron, never pruned)
#   "experts" one row per expert (the MoE router's weight): kept_experts[layer]
#   "moe_ffn" FFN neurons of one expert: kept_moe_ffn[layer][expert]
#   None      not touched by any axis (e.g. Qwen3's per-head q/k norms, one head_dim-sized vector)
DIM_KINDS = ("hidden", "ffn", "qkv", "heads", "vocab", "experts", "moe_ffn", None)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# a MoE layer's expert parameters carry the (local) expert index: the local spec's ``local_experts.<e>.`` and
# Transformer Engine's grouped GEMM's ``.weight<e>``; the table spells both with ``{e}``
_EXPERT_RES = (re.compile(r"(local_experts\.)(\d+)(\.)"), re.compile(r"(\.weight)(\d+)()$"))


def expert_index(name: str) -> tuple[str, Optional[int]]:
    """(``name`` with its expert index replaced by ``{e}``, the index); (name, None) outside the experts."""
    for pattern in _EXPERT_RES:
        m = pattern.search(name)
        if m:
            return name[:m.start()] + m.group(1) + "{e}" + m.group(3) + name[m.end():], int(m.group(2))
    return name, None


@dataclass(frozen=True)
class Param:
    """One megatron parameter and where it comes from in Hugging Face.

    ``megatron``: the name inside a decoder layer (``self_attention.linear_qkv.weight``) or, with
    ``layer=False``, the whole name (``embedding.word_embeddings.weight``). ``hf``: the Hugging Face tensors it
    is made of (inside ``model.layers.<i>.`` for layer parameters), in the order ``fused`` stacks them:
    ``"qkv"`` interleaves q/k/v per query group, ``"gate_up"`` stacks gate over up (a non-gated MLP uses the
    last name only), None is one tensor. Names of expert parameters hold ``{e}``, the expert's index (local in
    megatron, global in Hugging Face). ``tp_dim``: the dimension split over tensor-parallel ranks (None:
    replicated). ``dims``: the pruning kind of each dimension (DIM_KINDS).
    """

    megatron: str
    hf: tuple[str, ...]
    dims: tuple[Optional[str], ...]
    tp_dim: Optional[int] = None
    fused: Optional[str] = None
    layer: bool = True

    def __post_init__(self):
        assert all(d in DIM_KINDS for d in self.dims), self
        assert self.fused in (None, "qkv", "gate_up"), self


@dataclass(frozen=True)
class Family:
    """An architecture family: everything that differs between Llama, Qwen3, ... in one object.

    ``model_types``: the Hugging Face ``model_type`` values it converts. ``params``: the parameter table.
    ``arch_from_hf(config_dict) -> ModelArch`` and ``hf_config(arch, extra) -> transformers config`` are its
    Hugging Face config reader and writer; ``nemo_classes`` maps a NeMo kind to (model class, config class)
    and ``nemo_kind(arch)`` picks one; ``layer_spec(arch, use_te)`` is its megatron layer spec.
    """

    name: str
    model_types: tuple[str, ...]
    params: tuple[Param, ...]
    arch_from_hf: Callable[[dict], Any]
    hf_config: Callable[..., Any]
    hf_export_model_type: Callable[[Any], str]
    nemo_classes: dict
    nemo_kind: Callable[[Any], str]
    layer_spec: Callable[[Any, bool], Any]
    hf_layer_prefix: str = "model.layers.{}."
    _by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        for p in self.params:
            self._by_name[(p.layer, p.megatron)] = p

    def param(self, name: str) -> tuple[Param, Optional[int]]:
        """The table row of megatron parameter ``name`` and its (local) layer index, None outside layers."""
        m = _LAYER_RE.match(name)
        row = self._by_name.get((True, expert_index(m.group(2))[0])) if m else self._by_name.get((False, name))
        if row is None:
            raise KeyError(f"megatron parameter {name} is not in the {self.name} family's parameter table "
                           f"(megatron_prune/models/{self.name}/params.py)")
        return row, (int(m.group(1)) if m else None)

    def hf_names(self, row: Param, layer: Optional[int], expert: Optional[int] = None) -> list[str]:
        """The full Hugging Face names of ``row`` in (global) layer ``layer`` (and global ``expert``)."""
        prefix = self.hf_layer_prefix.format(layer) if row.layer else ""
        return [prefix + (n.format(e=expert) if "{e}" in n else n) for n in row.hf]


def family_from_config(name: str, config, params: tuple[Param, ...]) -> Family:
    """The Family of ``models/<name>/``: its ``config`` module's readers, writers and spec, and its table."""
    return Family(name=name, model_types=config.MODEL_TYPES, params=params, arch_from_hf=config.arch_from_hf,
                  hf_config=config.hf_config, hf_export_model_type=config.hf_export_model_type,
                  nemo_classes=config.NEMO_CLASSES, nemo_kind=config.nemo_kind, layer_spec=config.layer_spec)
