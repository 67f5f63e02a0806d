"""A prune plan: which units of the source model survive, decided from importance scores and a target.

A plan is plain data (kept indices per axis and layer, all in the source model's global numbering, in
their original order) and is saved as human-readable JSON, so it can be reviewed, edited, and re-applied
to the same source at any TP/PP.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.checkpoint.outputs import write_json_atomic
from megatron_prune.models.axes import AXES

DEPTH_METRICS = ("block_influence", "angular", "lm_loss", "lm_loss_block")
EXPERT_METRICS = ("reap", "output_l2", "tokens", "router_prob")  # importance/experts.py
EXPERT_CHOICES = ("per_layer", "all_layers")  # each layer its own best experts, or the same experts everywhere
TARGET_KEYS = tuple(a.arch_field for a in AXES) + ("drop_layers", "depth_metric", "expert_metric", "expert_choice")
# what users type on the command line (the axis names of models/axes.py and their aliases) -> PruneTarget field
TARGET_ALIASES = {name: a.arch_field for a in AXES for name in (a.name, *a.aliases)}


class PlanError(ValueError):
    """A target that cannot be reached from this source (raised before any work is done)."""


@dataclass(frozen=True)
class PruneTarget:
    """What the pruned model should look like; None keeps the source's value.

    Depth: either ``num_layers`` (layers to keep, chosen by ``depth_metric``) or ``drop_layers`` (explicit).
    ``depth_metric``: ``block_influence`` drops the individually least influential layers (ShortGPT);
    ``angular`` drops the contiguous block with the smallest angular distance (Gromov et al.); ``lm_loss``
    drops the layers whose removal alone raised the LM loss least; ``lm_loss_block`` drops the contiguous
    block whose removal raised it least (both need scores computed with ``--lm-loss-drop``).
    """

    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    drop_layers: Optional[tuple[int, ...]] = None
    depth_metric: str = "block_influence"
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    expert_metric: str = "reap"  # which expert score ranks the experts (EXPERT_METRICS)
    expert_choice: str = "per_layer"  # EXPERT_CHOICES: all_layers keeps the same experts (summed scores) everywhere

    @classmethod
    def parse(cls, spec: str) -> "PruneTarget":
        """From ``"hidden=448,ffn=1024,layers=24,depth_metric=angular"`` (``drop_layers=3:5:7``)."""
        values: dict = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "=" not in item:
                raise PlanError(f"target item {item!r} is not KEY=VALUE (e.g. hidden=448,ffn=1024)")
            name, value = (s.strip() for s in item.split("=", 1))
            key = TARGET_ALIASES.get(name, name)
            if key not in TARGET_KEYS:
                raise PlanError(f"unknown target axis {name!r}; use one of: "
                                f"{', '.join(a.name for a in AXES)}, drop_layers, depth_metric, expert_metric, "
                                "expert_choice")
            if key in values:
                raise PlanError(f"target key {name!r} is given twice in {spec!r}; give each key once")
            try:
                if key in ("depth_metric", "expert_metric", "expert_choice"):
                    if not value:
                        raise ValueError
                    values[key] = value
                elif key == "drop_layers":
                    values[key] = tuple(int(v) for v in value.replace(":", " ").split())
                    if not values[key]:
                        raise ValueError
                else:
                    values[key] = int(value)
                    if values[key] <= 0:
                        raise PlanError(f"target {name}={value} must be a positive number")
            except PlanError:
                raise
            except ValueError:
                example = {"drop_layers": "drop_layers=3:4:5", "depth_metric": "depth_metric=angular",
                           "expert_metric": "expert_metric=reap"}
                takes = ("layer indices separated by colons" if key == "drop_layers"
                         else "a name" if key in ("depth_metric", "expert_metric", "expert_choice")
                         else "a whole number")
                raise PlanError(f"target {name}={value!r} is not valid: {name} takes {takes}, "
                                f"e.g. {example.get(key, name + '=1024')}") from None
        if not values:
            raise PlanError(f"target {spec!r} is empty; give KEY=VALUE items, e.g. hidden=448,ffn=1024")
        return cls(**values)


@dataclass
class PrunePlan:
    source_arch: ModelArch
    target_arch: ModelArch
    kept_layers: list[int]
    kept_hidden: list[int]
    kept_ffn: list[list[int]]  # per kept layer
    kept_groups: list[list[int]]  # per kept layer: source query-group indices
    kept_heads: list[list[list[int]]]  # per kept layer, per kept group: head indices within the group
    target: dict = field(default_factory=dict)
    scores_file: Optional[str] = None
    kept_experts: Optional[list[list[int]]] = None  # MoE: per kept layer, the source experts kept
    kept_moe_ffn: Optional[list[list[list[int]]]] = None  # MoE: per kept layer, per kept expert, its neurons

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["source_arch"] = self.source_arch.to_dict()
        d["target_arch"] = self.target_arch.to_dict()
        return d

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        d = json.loads(Path(path).read_text())
        d["source_arch"] = ModelArch.from_dict(d["source_arch"])
        d["target_arch"] = ModelArch.from_dict(d["target_arch"])
        plan = cls(**d)
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check the kept indices against both shapes (catches hand-edited plans)."""
        s, t = self.source_arch, self.target_arch
        _check_indices("kept_layers", self.kept_layers, s.num_layers, t.num_layers)
        _check_indices("kept_hidden", self.kept_hidden, s.hidden_size, t.hidden_size)
        if not (len(self.kept_ffn) == len(self.kept_groups) == len(self.kept_heads) == t.num_layers):
            raise PlanError("kept_ffn/kept_groups/kept_heads need one entry per kept layer")
        for j in range(t.num_layers):
            _check_indices(f"kept_ffn[{j}]", self.kept_ffn[j], s.ffn_hidden_size, t.ffn_hidden_size)
            _check_indices(f"kept_groups[{j}]", self.kept_groups[j], s.num_query_groups, t.num_query_groups)
            if len(self.kept_heads[j]) != t.num_query_groups:
                raise PlanError(f"kept_heads[{j}] needs one list per kept group")
            for g, heads in enumerate(self.kept_heads[j]):
                _check_indices(f"kept_heads[{j}][{g}]", heads, s.heads_per_group, t.heads_per_group)
        if s.num_experts is None:
            if self.kept_experts is not None or self.kept_moe_ffn is not None:
                raise PlanError("kept_experts/kept_moe_ffn are for Mixture-of-Experts models; this source is dense")
            return
        if self.kept_experts is None or self.kept_moe_ffn is None or len(self.kept_experts) != t.num_layers \
                or len(self.kept_moe_ffn) != t.num_layers:
            raise PlanError("a Mixture-of-Experts plan needs kept_experts and kept_moe_ffn, one entry per kept layer")
        for j in range(t.num_layers):
            _check_indices(f"kept_experts[{j}]", self.kept_experts[j], s.num_experts, t.num_experts)
            if len(self.kept_moe_ffn[j]) != t.num_experts:
                raise PlanError(f"kept_moe_ffn[{j}] needs one list per kept expert")
            for e, neurons in enumerate(self.kept_moe_ffn[j]):
                _check_indices(f"kept_moe_ffn[{j}][{e}]", neurons, s.moe_ffn_hidden_size, t.moe_ffn_hidden_size)


def _check_indices(name: str, idx: list[int], source_size: int, target_size: int) -> None:
    if len(idx) != target_size:
        raise PlanError(f"{name} has {len(idx)} entries, the target needs {target_size}")
    if len(set(idx)) != len(idx) or any(i < 0 or i >= source_size for i in idx) or list(idx) != sorted(idx):
        raise PlanError(f"{name} must be distinct, sorted indices in [0, {source_size})")


def target_arch(source: ModelArch, target: PruneTarget) -> ModelArch:
    """The pruned shape; raises PlanError for anything impossible, before any work is done."""
    heads = target.num_attention_heads or source.num_attention_heads
    groups = target.num_query_groups or source.num_query_groups
    if target.num_query_groups and not target.num_attention_heads:
        heads = groups * source.heads_per_group  # dropping whole groups drops their heads
    layers = source.num_layers
    if target.drop_layers is not None:
        if target.num_layers is not None:
            raise PlanError("give either layers=N or drop_layers=..., not both")
        bad = [i for i in target.drop_layers if not 0 <= i < source.num_layers]
        if bad or len(set(target.drop_layers)) != len(target.drop_layers):
            raise PlanError(f"drop_layers {list(target.drop_layers)} must be distinct layers "
                            f"in [0, {source.num_layers})")
        layers = source.num_layers - len(target.drop_layers)
    elif target.num_layers is not None:
        layers = target.num_layers
    if target.depth_metric not in DEPTH_METRICS:
        raise PlanError(f"unknown depth metric {target.depth_metric!r}; use one of {', '.join(DEPTH_METRICS)}")
    sizes = {"hidden_size": target.hidden_size or source.hidden_size,
             "ffn_hidden_size": target.ffn_hidden_size or source.ffn_hidden_size,
             "num_attention_heads": heads, "num_query_groups": groups, "num_layers": layers}
    for key, value in sizes.items():
        if value <= 0:
            raise PlanError(f"target {key}={value} must be positive")
        if value > getattr(source, key):
            raise PlanError(f"target {key}={value} is larger than the source's {getattr(source, key)}: "
                            "pruning only removes")
    per_group = source.heads_per_group
    hint = ""
    if target.num_query_groups is None and heads % per_group == 0:
        hint = f"; to keep {heads} heads, prune whole query groups instead: query_groups={heads // per_group}"
    if heads % groups:
        raise PlanError(f"target heads={heads} is not divisible by query groups={groups}: every group keeps "
                        f"the same number of heads{hint}")
    if heads // groups > per_group:
        raise PlanError(f"target has {heads // groups} heads per query group, the source only {per_group}{hint}")
    sizes.update(_moe_sizes(source, target))
    try:
        return source.replace(**sizes)  # kv_channels stays: heads keep their width
    except ArchError as e:
        raise PlanError(str(e)) from e


def _moe_sizes(source: ModelArch, target: PruneTarget) -> dict:
    """The MoE fields of the target shape (none for a dense source); PlanError for what cannot be reached."""
    asked = {k: getattr(target, k) for k in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk")
             if getattr(target, k) is not None}
    if source.num_experts is None:
        if asked:
            raise PlanError(f"{', '.join(asked)} prune a Mixture-of-Experts model; this model is dense")
        return {}
    if target.ffn_hidden_size is not None:
        raise PlanError("this Mixture-of-Experts model has no dense MLP: prune the experts' width with moe_ffn=N")
    if target.expert_metric not in EXPERT_METRICS:
        raise PlanError(f"unknown expert metric {target.expert_metric!r}; use one of {', '.join(EXPERT_METRICS)}")
    if target.expert_choice not in EXPERT_CHOICES:
        raise PlanError(f"unknown expert_choice {target.expert_choice!r}; use one of {', '.join(EXPERT_CHOICES)}")
    for key, value in asked.items():
        if value > getattr(source, key):
            raise PlanError(f"target {key}={value} is larger than the source's {getattr(source, key)}: pruning only "
                            "removes")
    experts = asked.get("num_experts", source.num_experts)
    topk = asked.get("moe_router_topk", source.moe_router_topk)
    if topk > experts:
        raise PlanError(f"{experts} experts cannot serve the router's top-{topk}: keep experts >= top-k, or lower "
                        f"it as well (topk={experts})")
    return {"num_experts": experts, "moe_ffn_hidden_size": asked.get("moe_ffn_hidden_size", source.moe_ffn_hidden_size),
            "moe_router_topk": topk}


def _top_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in ascending index order (ties: lower index wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def choose_layers(scores, source: ModelArch, target: PruneTarget, keep: int) -> list[int]:
    """Source layers to keep, by the target's depth metric."""
    n_drop = source.num_layers - keep
    if target.drop_layers is not None:
        return [i for i in range(source.num_layers) if i not in set(target.drop_layers)]
    if n_drop == 0:
        return list(range(source.num_layers))
    if target.depth_metric == "block_influence":
        return _top_sorted(scores.for_axis("layers"), keep)
    if target.depth_metric == "angular":
        dist = scores.angular.get(n_drop)
        if dist is None:
            raise PlanError(f"the score file has no angular distances for blocks of {n_drop} layers; "
                            f"available: {sorted(scores.angular)}")
        start = min(range(len(dist)), key=lambda i: (float(dist[i]), i))
        return [i for i in range(source.num_layers) if not start <= i < start + n_drop]
    size = 1 if target.depth_metric == "lm_loss" else n_drop
    drop = (scores.loss_drop or {}).get(size)
    if drop is None:
        raise PlanError(f"the score file has no LM-loss drop for blocks of {size} layer(s); recompute importance "
                        f"with --lm-loss-drop {size}")
    if target.depth_metric == "lm_loss":
        return _top_sorted(torch.as_tensor(drop), keep)  # keep the layers whose removal hurts most
    start = min(range(len(drop)), key=lambda i: (float(drop[i]), i))
    return [i for i in range(source.num_layers) if not start <= i < start + n_drop]


def make_plan(scores, source: ModelArch, target: PruneTarget, scores_file: Optional[str] = None) -> PrunePlan:
    """Kept indices for every axis from importance scores (Minitron: rank, keep the top-k)."""
    scored = ModelArch.from_dict(scores.arch)
    if scored != source:
        raise PlanError("the importance scores were computed for a different model than this checkpoint "
                        f"(scores vs checkpoint: {scored.differences(source)})")
    arch = target_arch(source, target)
    layers = choose_layers(scores, source, target, arch.num_layers)
    hidden = _top_sorted(scores.for_axis("hidden"), arch.hidden_size)
    hpg_t = arch.heads_per_group
    ffn, groups, heads = [], [], []
    for layer in layers:
        ffn.append(_top_sorted(scores.for_axis("ffn")[layer], arch.ffn_hidden_size))
        kept_groups = _top_sorted(scores.for_axis("query_groups")[layer], arch.num_query_groups)
        groups.append(kept_groups)
        per_group = scores.for_axis("heads")[layer].reshape(source.num_query_groups, source.heads_per_group)
        heads.append([_top_sorted(per_group[g], hpg_t) for g in kept_groups])
    experts, moe_ffn = _kept_experts(scores, source, arch, target, layers)
    spec = {k: v for k, v in dataclasses.asdict(target).items() if v is not None}
    plan = PrunePlan(source_arch=source, target_arch=arch, kept_layers=layers, kept_hidden=hidden, kept_ffn=ffn,
                     kept_groups=groups, kept_heads=heads, target=spec, scores_file=scores_file,
                     kept_experts=experts, kept_moe_ffn=moe_ffn)
    plan.validate()
    return plan


def _kept_experts(scores, source: ModelArch, arch: ModelArch, target: PruneTarget, layers: list[int]):
    """(kept experts, their kept neurons) per kept layer: each layer keeps its highest-scoring experts (by
    ``target.expert_metric``), each kept expert its highest-scoring neurons; (None, None) for a dense model."""
    if source.num_experts is None:
        return None, None
    if arch.num_experts == source.num_experts and arch.moe_ffn_hidden_size == source.moe_ffn_hidden_size:
        all_neurons = list(range(source.moe_ffn_hidden_size))
        return ([list(range(source.num_experts)) for _ in layers],
                [[all_neurons for _ in range(source.num_experts)] for _ in layers])
    scores = scores.with_expert_metric(target.expert_metric)
    everywhere = _top_sorted(scores.for_axis("experts").sum(0), arch.num_experts)  # expert_choice=all_layers
    experts, neurons = [], []
    for layer in layers:
        kept = (everywhere if target.expert_choice == "all_layers"
                else _top_sorted(scores.for_axis("experts")[layer], arch.num_experts))
        experts.append(kept)
        neurons.append([_top_sorted(scores.for_axis("moe_ffn")[layer][e], arch.moe_ffn_hidden_size) for e in kept])
    return experts, neurons


def identity_plan(arch: ModelArch) -> PrunePlan:
    """Keeps everything; pruning with it must reproduce the source model exactly."""
    moe = arch.num_experts is not None
    return PrunePlan(
        source_arch=arch, target_arch=arch, kept_layers=list(range(arch.num_layers)),
        kept_hidden=list(range(arch.hidden_size)),
        kept_ffn=[list(range(arch.ffn_hidden_size))] * arch.num_layers,
        kept_groups=[list(range(arch.num_query_groups))] * arch.num_layers,
        kept_heads=[[list(range(arch.heads_per_group))] * arch.num_query_groups] * arch.num_layers,
        kept_experts=[list(range(arch.num_experts))] * arch.num_layers if moe else None,
        kept_moe_ffn=[[list(range(arch.moe_ffn_hidden_size))] * arch.num_experts] * arch.num_layers if moe else None,
    )
