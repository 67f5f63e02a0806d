"""Width importance: forward hooks that score MLP neurons, attention heads, query groups and embedding channels.

Each hook turns one activation of one micro-batch into per-sample values (sequence-axis aggregation, done
whole because a sample never spans micro-batches) and adds them to running sums from which the batch-axis
aggregation is exact however the samples were split into micro-batches and data-parallel ranks.
Megatron activations are [s, b, ...]; everything is accumulated in float64 (computed from fp32 copies).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "l2", "variance")
# How an attention head is scored (all three come from the same hook, so one pass stores every variant):
#   activation: L2 of the head's output (input of linear_proj) over its kv_channels per token, then the sequence
#               and batch aggregation (Minitron's definition);
#   channel:    each of the head's kv_channels aggregated over sequence and batch first, then L2 over them;
#   residual:   L2 of what the head adds to the residual stream (its slice of linear_proj applied to its output)
#               per token, then the aggregations: unlike the others it sees the output projection's weights.
HEAD_METRICS = ("activation", "channel", "residual")


def check_aggregation(name: str, axis: str) -> str:
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown {axis} aggregation {name!r}; choose one of {', '.join(AGGREGATIONS)}")
    return name


def reduce_seq(x: torch.Tensor, how: str) -> torch.Tensor:
    """Aggregate ``x`` [s, b, ...] over the sequence axis -> [b, ...] (fp32).

    mean = mean(|x|), l2 = sqrt(sum x^2), variance = population variance (so it combines exactly).
    Every result is >= 0, which the batch accumulator relies on.
    """
    x = x.float()
    if how == "mean":
        return x.abs().mean(0)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=0)
    if how == "variance":
        return x.var(0, unbiased=False)
    raise ValueError(f"unknown sequence aggregation {how!r}")


class BatchAccumulator:
    """Running sum(v), sum(v^2) and sample count of per-sample values v >= 0, per row (layer).

    These three sums are enough for every batch aggregation (mean needs the count, L2 the squares,
    variance all three) and they add across micro-batches and DP ranks, so splitting never changes a score.
    """

    def __init__(self, shape: tuple, device: torch.device):
        self.sums = torch.zeros((2, *shape), dtype=torch.float64, device=device)
        self.count = torch.zeros(shape[0], dtype=torch.float64, device=device)

    def add(self, row: int, values: torch.Tensor, slot: int | None = None, count: bool = True) -> None:
        """``values`` [b, ...]: one micro-batch's per-sample values for row ``row`` (and sub-row ``slot``)."""
        idx = (row,) if slot is None else (row, slot)
        v = values.double()
        self.sums[(0, *idx)] += v.sum(0)
        self.sums[(1, *idx)] += v.square().sum(0)
        if count:
            self.count[row] += v.shape[0]

    def all_reduce(self, group) -> None:
        import torch.distributed as dist

        dist.all_reduce(self.sums, group=group)
        dist.all_reduce(self.count, group=group)

    def finalize(self, how: str) -> torch.Tensor:
        s1, s2 = self.sums[0], self.sums[1]
        n = self.count.clamp(min=1).view(-1, *([1] * (s1.dim() - 1)))
        if how == "mean":
            return s1 / n
        if how == "l2":
            return s2.sqrt()
        if how == "variance":
            return (s2 / n - (s1 / n).square()).clamp(min=0)
        raise ValueError(f"unknown batch aggregation {how!r}")


def _first_input(args, kwargs, name: str):
    return args[0] if args else kwargs[name]


def _check_local_spec(layer) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    if isinstance(layer.input_layernorm, IdentityOp) or isinstance(layer.pre_mlp_layernorm, IdentityOp):
        raise NotImplementedError(
            "importance hooks need separate norm modules (megatron's local layer spec); the Transformer Engine "
            "spec fuses the norms into the linear layers. Build the model with use_te=False for scoring."
        )


class WidthHooks:
    """Accumulators and hooks for the width axes of this rank's layers (its TP shard, its PP stage).

    mlp [Lp, ffn/tp] (input of linear_fc2), heads [Lp, heads/tp] (input of linear_proj, L2 per head over
    kv_channels), head_channels [Lp, heads/tp * kv_channels] and head_residual [Lp, heads/tp] (the other
    HEAD_METRICS), embedding [Lp, 2, hidden] (outputs of input_layernorm and pre_mlp_layernorm; full hidden,
    identical on every TP rank, so it is never summed over TP).
    """

    def __init__(self, model: torch.nn.Module, arch, tp: int, seq_agg: str):
        self.layers = list(model.decoder.layers)
        for layer in self.layers:
            _check_local_spec(layer)
        self.arch, self.seq_agg = arch, check_aggregation(seq_agg, "sequence")
        self.heads_local = arch.num_attention_heads // tp
        device = next(model.parameters()).device
        n = len(self.layers)
        self.mlp = BatchAccumulator((n, arch.ffn_hidden_size // tp), device)
        self.heads = BatchAccumulator((n, self.heads_local), device)
        self.head_channels = BatchAccumulator((n, self.heads_local * arch.kv_channels), device)
        self.head_residual = BatchAccumulator((n, self.heads_local), device)
        self.embedding = BatchAccumulator((n, 2, arch.hidden_size), device)
        self.handles: list = []

    def attach(self) -> list:
        for i, layer in enumerate(self.layers):
            if getattr(self.arch, "num_experts", None) is None:  # a MoE layer's experts: importance/experts.py
                self.handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(self._mlp_hook(i), with_kwargs=True))
            self.handles += [
                layer.self_attention.linear_proj.register_forward_pre_hook(self._head_hook(i), with_kwargs=True),
                layer.input_layernorm.register_forward_hook(self._norm_hook(i, 0)),
                layer.pre_mlp_layernorm.register_forward_hook(self._norm_hook(i, 1)),
            ]
        return self.handles

    def _mlp_hook(self, i):
        def hook(module, args, kwargs):
            self.mlp.add(i, reduce_seq(_first_input(args, kwargs, "input_"), self.seq_agg))

        return hook

    def _head_hook(self, i):
        def hook(module, args, kwargs):
            x = _first_input(args, kwargs, "input_").float()
            per_channel = x.reshape(*x.shape[:2], self.heads_local, self.arch.kv_channels)
            self.heads.add(i, reduce_seq(torch.linalg.vector_norm(per_channel, dim=-1), self.seq_agg))
            self.head_channels.add(i, reduce_seq(x, self.seq_agg))
            self.head_residual.add(i, reduce_seq(head_residual_norms(per_channel, module.weight), self.seq_agg))

        return hook

    def _norm_hook(self, i, which):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            # both norms of layer i see the same samples: count them once
            self.embedding.add(i, reduce_seq(out, self.seq_agg), slot=which, count=which == 0)

        return hook

    def all_reduce(self, group) -> None:
        for acc in (self.mlp, self.heads, self.head_channels, self.head_residual, self.embedding):
            acc.all_reduce(group)

    def finalize(self, batch_agg: str) -> dict:
        """Local scores: mlp [Lp, ffn/tp], heads / head_channel / head_residual [Lp, heads/tp],
        embedding_layers [Lp, 2, hidden]."""
        check_aggregation(batch_agg, "batch")
        channels = self.head_channels.finalize(batch_agg)
        return {"mlp": self.mlp.finalize(batch_agg), "heads": self.heads.finalize(batch_agg),
                "head_channel": torch.linalg.vector_norm(
                    channels.reshape(len(self.layers), self.heads_local, self.arch.kv_channels), dim=-1),
                "head_residual": self.head_residual.finalize(batch_agg),
                "embedding_layers": self.embedding.finalize(batch_agg)}


def head_residual_norms(per_channel: torch.Tensor, proj_weight: torch.Tensor) -> torch.Tensor:
    """[s, b, heads, kv] head outputs and linear_proj's weight [hidden, heads * kv] (this rank's input shard)
    -> [s, b, heads]: the L2 norm of each head's contribution W_h x_h to the residual stream.

    One head at a time, so the memory is one [s, b, hidden] product rather than one per head.
    """
    heads, kv = per_channel.shape[-2:]
    w = proj_weight.float().reshape(proj_weight.shape[0], heads, kv)
    return torch.stack([torch.linalg.vector_norm(per_channel[..., h, :] @ w[:, h, :].T, dim=-1)
                        for h in range(heads)], dim=-1)


def query_group_scores(heads: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """[..., heads] -> [..., groups]: L2 over the (final) scores of each group's query heads.

    Derived from the head scores rather than hooked separately: that is the paper's definition (rank KV
    heads by the L2 over their heads), it follows whatever aggregation the heads used, costs nothing, and
    is layout independent because a group's heads always sit on one TP rank.
    """
    return torch.linalg.vector_norm(heads.reshape(*heads.shape[:-1], num_query_groups, -1), dim=-1)
