"""Mixture-of-Experts importance: per expert and per expert-FFN neuron, from the same calibration pass.

Megatron's sequential experts (``SequentialMLP``) are called once per layer with this rank's routed tokens sorted by
local expert, their count per expert and their gate weights g; each expert MLP returns ``fc2(act(fc1(x)) * g) =
g * E(x)`` for its own tokens, and the outputs come back concatenated in the same order. Per
expert e over its routed tokens T_e (ALGORITHMS.md):

- ``tokens``: |T_e|, the routed-token count;
- ``output_l2``: Model Optimizer's mean over T_e of ||E_e(x)||_2;
- ``reap``: REAP's (arXiv 2510.13999) mean over T_e of g_e(x) * ||E_e(x)||_2;
- ``router_prob``: the router's own statistic, the mean softmax probability of e over all tokens;
- ``moe_ffn`` [experts, moe_ffn]: the dense MLP metric inside each expert, L2 over T_e of each neuron of
  ``act(fc1(x))`` (the input of Hugging Face's ``down_proj``, before the gate weight).

Accumulated as float64 sums, which add across micro-batches, data-parallel ranks and the experts' data-parallel
copies, so every layout gives the same numbers. With TP > 1 an expert's fc2 output is a partial sum on each TP rank
(megatron reduces it in the dispatcher): the hook sums the layer's outputs over the expert-TP group (one all-reduce
per layer) before taking norms.
"""

from __future__ import annotations

import torch

EXPERT_METRICS = ("reap", "output_l2", "tokens", "router_prob")


def is_moe(arch) -> bool:
    return getattr(arch, "num_experts", None) is not None


class ExpertHooks:
    """Accumulators and hooks for the experts of this rank's layers (its local experts, its TP shard of them)."""

    def __init__(self, model: torch.nn.Module, arch):
        from megatron.core import parallel_state as ps

        self.layers = list(model.decoder.layers)
        self.arch = arch
        device = next(model.parameters()).device
        n, experts = len(self.layers), arch.num_experts
        self.local = len(self.layers[0].mlp.experts.local_experts) if self.layers else 0
        self.etp = ps.get_expert_tensor_parallel_world_size()
        self.etp_group = ps.get_expert_tensor_parallel_group() if self.etp > 1 else None
        # without sequence parallelism every TP rank holds the same tokens, and the dispatcher gathers them over
        # the expert-TP group before the experts: each routed token reaches the experts once per TP rank
        self.copies = 1 if model.config.sequence_parallel else self.etp
        f = arch.moe_ffn_hidden_size // self.etp
        # per local expert: count, sum ||E(x)||, sum g ||E(x)||; per neuron: sum act^2
        self.sums = torch.zeros((n, self.local, 3), dtype=torch.float64, device=device)
        self.act_sq = torch.zeros((n, self.local, f), dtype=torch.float64, device=device)
        # router: sum of softmax probabilities over every token, and the token count (replicated over TP)
        self.router = torch.zeros((n, experts + 1), dtype=torch.float64, device=device)
        self.handles: list = []
        self._act: dict = {}

    def attach(self) -> list:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.mlp.router.register_forward_hook(self._router_hook(i)))
            for e, expert in enumerate(layer.mlp.experts.local_experts):
                self.handles.append(expert.linear_fc1.register_forward_hook(self._fc1_hook(i, e)))
            self.handles.append(layer.mlp.experts.register_forward_hook(self._experts_hook(i), with_kwargs=True))
        return self.handles

    def _router_hook(self, i):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            probs = torch.softmax(x @ module.weight.float().t(), dim=-1)
            self.router[i, :-1] += probs.double().sum(0)
            self.router[i, -1] += probs.shape[0]

        return hook

    def _fc1_hook(self, i, e):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).float()
            if self.arch.gated:
                gate, up = h.chunk(2, dim=-1)
                h = torch.nn.functional.silu(gate) * up
            else:
                h = torch.nn.functional.gelu(h)
            self._act[(i, e)] = h

        return hook

    def _experts_hook(self, i):
        def hook(module, args, kwargs, output):
            names = ("permuted_local_hidden_states", "tokens_per_expert", "permuted_probs")
            _, counts, probs = (args[k] if len(args) > k else kwargs[n] for k, n in enumerate(names))
            out = (output[0] if isinstance(output, tuple) else output).float()
            if self.etp_group is not None:
                import torch.distributed as dist

                out = out.clone()
                dist.all_reduce(out, group=self.etp_group)
            g = probs.float().reshape(-1)
            norm = torch.linalg.vector_norm(out, dim=-1) / g  # ||E(x)||: megatron's output is g * E(x)
            counts = [int(c) for c in counts.tolist()] if torch.is_tensor(counts) else [int(c) for c in counts]
            for e, (n, gs, ns) in enumerate(zip(counts, g.split(counts), norm.split(counts), strict=True)):
                act = self._act.pop((i, e), None)
                if n == 0:
                    continue
                self.sums[i, e, 0] += n
                self.sums[i, e, 1] += ns.double().sum()
                self.sums[i, e, 2] += (gs * ns).double().sum()
                self.act_sq[i, e] += act.double().square().sum(0)

        return hook

    def all_reduce(self, dp_group, expert_dp_group) -> None:
        """Add the sums of ranks that saw other samples: the router's over data parallelism, the experts' over
        the experts' own data-parallel copies (the expert-parallel group already sent them every token)."""
        import torch.distributed as dist

        if dp_group is not None:
            dist.all_reduce(self.router, group=dp_group)
        if expert_dp_group is not None:
            dist.all_reduce(self.sums, group=expert_dp_group)
            dist.all_reduce(self.act_sq, group=expert_dp_group)

    def finalize(self, ep_group=None, etp_group=None, pp_group=None) -> dict:
        """Global [layers, experts] scores (and [layers, experts, moe_ffn] neurons), on every rank."""
        from megatron_prune.importance.scores import all_gather_cat

        sums = all_gather_cat(self.sums / self.copies, ep_group, dim=1)  # EP rank r holds experts r * local ...
        act_sq = all_gather_cat(all_gather_cat(self.act_sq / self.copies, ep_group, dim=1), etp_group, dim=2)
        sums, act_sq = all_gather_cat(sums, pp_group, 0), all_gather_cat(act_sq, pp_group, 0)
        router = all_gather_cat(self.router, pp_group, 0)
        count = sums[..., 0]
        n = count.clamp(min=1)
        return {"tokens": count, "output_l2": sums[..., 1] / n, "reap": sums[..., 2] / n,
                "router_prob": router[:, :-1] / router[:, -1:].clamp(min=1), "moe_ffn": act_sq.sqrt()}
