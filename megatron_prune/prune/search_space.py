"""Architecture search under a budget (Minitron §2.3): every shape within the constraints, counted exactly.

Candidates are enumerated from a search space (values per axis) and kept when every constraint holds within
its tolerance: total parameters, non-embedding parameters, and inference memory (weights + KV cache at a
given sequence length, batch and dtype). Counts are analytic (ModelArch.param_count), so enumerating
thousands of shapes costs nothing; only the survivors are pruned and evaluated.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.models.axes import AXES

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}


@dataclass(frozen=True)
class Budget:
    """Constraints; each None is unconstrained. A candidate passes a constraint when its value is within
    ``tolerance`` (relative) of the target: |value / target - 1| <= tolerance (the paper: +-5%)."""

    params: Optional[float] = None
    non_embedding_params: Optional[float] = None
    memory_bytes: Optional[float] = None
    active_params: Optional[float] = None  # MoE: parameters one token uses (the router's top-k experts only)
    tolerance: float = 0.05
    memory_seq_len: int = 4096
    memory_batch: int = 1
    memory_dtype: str = "bf16"

    def __post_init__(self):
        if all(v is None for v in (self.params, self.non_embedding_params, self.memory_bytes, self.active_params)):
            raise ArchError("give at least one constraint: --params, --non-embedding-params, --memory-gib or "
                            "--active-params")
        if not 0 < self.tolerance < 1:
            raise ArchError(f"tolerance (--tolerance) must be in (0, 1), got {self.tolerance}; 0.05 is +-5%")
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise ArchError(f"memory budget (--memory-gib) must be positive, got {self.memory_bytes / 1024 ** 3:g} GiB")
        if self.memory_seq_len < 1 or self.memory_batch < 1:
            raise ArchError(f"--memory-seq-len and --memory-batch must be >= 1, got {self.memory_seq_len} and "
                            f"{self.memory_batch}")
        if self.memory_dtype not in DTYPE_BYTES:
            raise ArchError(f"memory dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.memory_dtype!r}")

    def measures(self, arch: ModelArch) -> dict:
        return {"params": arch.param_count(), "non_embedding_params": non_embedding_params(arch),
                "active_params": arch.active_param_count(),
                "memory_bytes": inference_memory(arch, self.memory_seq_len, self.memory_batch, self.memory_dtype)}

    def accepts(self, arch: ModelArch) -> bool:
        values = self.measures(arch)
        for key in ("params", "non_embedding_params", "memory_bytes", "active_params"):
            target = getattr(self, key)
            if target is not None and abs(values[key] / target - 1) > self.tolerance:
                return False
        return True


def non_embedding_params(arch: ModelArch) -> int:
    """Parameters outside the embedding and output layers (what the transformer layers and final norm hold)."""
    embed = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    return arch.param_count() - embed


def kv_cache_bytes(arch: ModelArch, seq_len: int, batch: int, dtype: str = "bf16") -> int:
    """Keys and values of every layer: 2 x layers x query groups x kv_channels x tokens x bytes."""
    return 2 * arch.num_layers * arch.num_query_groups * arch.kv_channels * seq_len * batch * DTYPE_BYTES[dtype]


def inference_memory(arch: ModelArch, seq_len: int, batch: int, dtype: str = "bf16") -> int:
    return arch.param_count() * DTYPE_BYTES[dtype] + kv_cache_bytes(arch, seq_len, batch, dtype)


@dataclass(frozen=True)
class SearchSpace:
    """Values per axis (one field per axis of models/axes.py, named after it). Empty: the source's value only."""

    layers: Sequence[int] = field(default_factory=tuple)
    hidden: Sequence[int] = field(default_factory=tuple)
    ffn: Sequence[int] = field(default_factory=tuple)
    heads: Sequence[int] = field(default_factory=tuple)
    query_groups: Sequence[int] = field(default_factory=tuple)
    experts: Sequence[int] = field(default_factory=tuple)  # the MoE axes (empty for a dense source)
    moe_ffn: Sequence[int] = field(default_factory=tuple)
    topk: Sequence[int] = field(default_factory=tuple)


def _multiples(top: int, step: int, lowest: int) -> list[int]:
    vals = list(range(step, top + 1, step))
    return [v for v in vals if v >= lowest] + ([top] if top % step else [])


def default_space(source: ModelArch, tp: int = 1, pp: int = 1, min_fraction: float = 0.5) -> SearchSpace:
    """Width axes in hardware-friendly steps (hidden: multiples of 64, FFN: of 256 (64 below 2048), heads: of
    the group count) down to ``min_fraction`` of the source, query groups kept, layers kept (depth is a
    separate decision in Minitron: pass layers explicitly to search it too)."""
    h, f = source.hidden_size, source.ffn_hidden_size
    ffn_step = 256 if f >= 2048 else 64
    groups = source.num_query_groups
    heads = [k * groups for k in range(1, source.heads_per_group + 1)
             if k * groups >= min_fraction * source.num_attention_heads]
    if source.num_experts is not None:  # MoE: no dense MLP; the experts' count and width instead
        e, m = source.num_experts, source.moe_ffn_hidden_size
        experts = [k for k in range(max(source.moe_router_topk, 1), e + 1) if k >= min_fraction * e]
        return SearchSpace(layers=[source.num_layers], hidden=_multiples(h, 64, int(min_fraction * h)),
                           ffn=[f], heads=heads or [source.num_attention_heads], query_groups=[groups],
                           experts=experts, moe_ffn=_multiples(m, 256 if m >= 2048 else 64, int(min_fraction * m)),
                           topk=[source.moe_router_topk])
    return SearchSpace(layers=[source.num_layers], hidden=_multiples(h, 64, int(min_fraction * h)),
                       ffn=_multiples(f, ffn_step, int(min_fraction * f)), heads=heads or [source.num_attention_heads],
                       query_groups=[groups])


def candidates(source: ModelArch, space: SearchSpace, budget: Budget, tp: int = 1, pp: int = 1) -> list[ModelArch]:
    """Every shape of ``space`` reachable by pruning ``source`` that fits ``budget`` and shards at tp x pp,
    sorted by parameter count (largest first)."""
    found = [a for a in reachable(source, space, tp, pp) if budget.accepts(a)]
    return sorted(found, key=lambda a: (-a.param_count(), a.num_layers, a.hidden_size, a.ffn_hidden_size))


def reachable(source: ModelArch, space: SearchSpace, tp: int = 1, pp: int = 1) -> list[ModelArch]:
    """Every shape of ``space`` that pruning ``source`` can reach and that shards at tp x pp."""
    values = [sorted(set(getattr(space, a.name) or [getattr(source, a.arch_field)])) for a in AXES]
    out = []
    for combo in itertools.product(*values):
        sizes = {a.arch_field: v for a, v in zip(AXES, combo)}
        if any(v is not None and v > getattr(source, field) for field, v in sizes.items()):
            continue
        heads, groups = sizes["num_attention_heads"], sizes["num_query_groups"]
        if heads % groups or heads // groups > source.heads_per_group:
            continue
        try:
            arch = source.replace(**sizes)
            arch.check_parallel(tp, pp)
        except ArchError:
            continue
        out.append(arch)
    return out


def target_spec(source: ModelArch, arch: ModelArch, depth_metric: str = "angular") -> str:
    """The `prune --target` string that turns ``source`` into ``arch``."""
    order = sorted(AXES, key=lambda a: a.name != "layers")  # layers first, as the search tables print them
    parts = [f"{a.name}={getattr(arch, a.arch_field)}" for a in order
             if getattr(arch, a.arch_field) != getattr(source, a.arch_field)]
    if arch.num_layers != source.num_layers:
        parts.append(f"depth_metric={depth_metric}")
    return ",".join(parts)


def candidate_name(arch: ModelArch) -> str:
    if arch.num_experts is not None:
        return (f"L{arch.num_layers}-h{arch.hidden_size}-e{arch.num_experts}k{arch.moe_router_topk}"
                f"-f{arch.moe_ffn_hidden_size}-a{arch.num_attention_heads}-g{arch.num_query_groups}")
    return (f"L{arch.num_layers}-h{arch.hidden_size}-f{arch.ffn_hidden_size}-a{arch.num_attention_heads}"
            f"-g{arch.num_query_groups}")


def parse_count(text: str, what: str = "a count") -> float:
    """``90M``, ``4.5B``, ``8.27e9`` or ``1200000`` -> a positive number (``what``: the flag, for errors)."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = str(text).strip().upper()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ArchError(f"cannot read {text!r} as {what}; write e.g. 90M, 4.5B or 8270000000") from None
    if not value > 0:
        raise ArchError(f"{what} must be positive, got {text!r}")
    return value


def parse_values(text: str, what: str) -> list[int]:
    """``"448,512,576"`` -> [448, 512, 576] (a search-space axis)."""
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise ArchError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ArchError(f"--{what} needs positive integers, got {text!r}")
    return values
