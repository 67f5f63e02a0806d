"""Depth importance: Block Influence per layer and angular distance between layer boundaries.

X_i is the input of decoder layer i (X_L: the output of the last layer, before the final norm).
- Block Influence (ShortGPT): BI_i = 1 - mean over all tokens of cos(X_i[t], X_{i+1}[t]). Each stage owns
  the pairs of its own layers, so it is a sum + token count per local layer.
- Angular distance (Gromov et al.): d(l, n) = arccos(cos(X_l[T], X_{l+n}[T])) / pi on the last token T,
  averaged over samples. Pairs cross pipeline stages, so every stage keeps the last-token states of its
  boundaries for the micro-batches of one schedule call; after the call (outside megatron's schedule, where
  collectives are safe) :meth:`DepthHooks.flush` gathers them over the PP group and adds the angles of all
  (l, m) boundary pairs to an [L+1, L+1] sum. Memory is bounded by one schedule call's samples.
Hidden states are replicated across TP ranks (no sequence parallelism): every TP rank computes the same
sums and nothing is reduced over TP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class DepthHooks:
    def __init__(self, model: torch.nn.Module, arch, pp_group=None):
        self.layers = list(model.decoder.layers)
        self.arch, self.pp_group = arch, pp_group
        device = next(model.parameters()).device
        n, L = len(self.layers), arch.num_layers
        self.cos_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(n, dtype=torch.float64, device=device)
        self.angle_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=device)
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self._current: list[torch.Tensor] = []  # last-token inputs of this micro-batch's layers so far
        self._pending: list[torch.Tensor] = []  # [Lp + 1, b, hidden] per finished micro-batch
        self.handles: list = []

    def attach(self) -> list:
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
        return self.handles

    def _hook(self, i):
        last = len(self.layers) - 1

        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            x, y = x.float(), y.float()  # [s, b, h]
            cos = F.cosine_similarity(x, y, dim=-1)  # [s, b]
            self.cos_sum[i] += cos.double().sum()
            self.tokens[i] += cos.numel()
            if i == 0:
                self._current = []
            self._current.append(x[-1].clone())
            if i == last:
                self._current.append(y[-1].clone())
                self._pending.append(torch.stack(self._current))
                self._current = []

        return hook

    def flush(self) -> None:
        """Collective over the PP group (every stage must call it after each schedule call)."""
        import torch.distributed as dist

        if not self._pending:
            return
        local = torch.cat(self._pending, dim=1)  # [Lp + 1, B, h]
        self._pending = []
        if self.pp_group is not None and dist.get_world_size(self.pp_group) > 1:
            from megatron_prune.importance.scores import all_gather_uneven

            parts = all_gather_uneven(local, self.pp_group)  # stages may differ in depth
            # each stage: its layers' inputs, then its last layer's output (= next stage's first input)
            boundary = torch.cat([p[:-1] for p in parts] + [parts[-1][-1:]])
        else:
            boundary = local
        unit = F.normalize(boundary.double(), dim=-1)  # [L + 1, B, h]
        cos = torch.einsum("lbh,mbh->lmb", unit, unit).clamp(-1.0, 1.0)
        self.angle_sum += (torch.arccos(cos) / math.pi).sum(-1)
        self.samples += boundary.shape[1]

    def all_reduce(self, group) -> None:
        import torch.distributed as dist

        for t in (self.cos_sum, self.tokens, self.angle_sum, self.samples):
            dist.all_reduce(t, group=group)

    def finalize(self) -> dict:
        """Local block_influence [Lp]; global angle matrix [L+1, L+1] (mean over samples)."""
        return {"block_influence": 1.0 - self.cos_sum / self.tokens.clamp(min=1),
                "angle_matrix": self.angle_sum / self.samples.clamp(min=1)}


def angular_distances(angle_matrix: torch.Tensor, sizes) -> dict[int, torch.Tensor]:
    """{n: [L - n + 1]}: d(l, n) for l = 0 .. L-n, read off the boundary-pair matrix."""
    L = angle_matrix.shape[0] - 1
    return {int(n): torch.diagonal(angle_matrix, offset=int(n)).clone() for n in sizes if 1 <= int(n) <= L}


def _pass_through(hidden_states, context=None, **kwargs):
    return hidden_states, context


@torch.no_grad()
def lm_loss_drop(model: torch.nn.Module, arch, windows: torch.Tensor, micro_batch_size: int = 1,
                 block_sizes=(1,), desc=None) -> tuple[float, dict[int, torch.Tensor]]:
    """LM loss with each block of n contiguous layers skipped, minus the loss of the full model.

    ``windows`` [n, s + 1] (inputs + next-token labels, as for :func:`megatron_prune.evaluation.lm_loss.lm_loss`).
    Returns (base loss, {n: [L - n + 1] loss increase when layers l..l+n-1 are removed}). One evaluation per
    block, so it costs (number of blocks + 1) forward passes; the stage that owns a skipped layer replaces
    that layer's forward by the identity on the residual stream, every other stage runs unchanged.
    """
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.model import layer_offset
    from megatron_prune.runtime.progress import progress

    layers = list(model.decoder.layers)
    offset, L = layer_offset(arch), arch.num_layers
    base = lm_loss(model, arch, windows, micro_batch_size, desc=None).lm_loss
    bar = progress(1 + sum(L - int(n) + 1 for n in block_sizes), desc, unit="pass") if desc else None
    if bar:
        bar.update(1)
    drops: dict[int, torch.Tensor] = {}
    for n in block_sizes:
        n = int(n)
        if not 1 <= n <= L - 1:
            raise ValueError(f"block size {n} must be between 1 and num_layers - 1 = {L - 1}")
        out = torch.zeros(L - n + 1, dtype=torch.float64)
        for start in range(L - n + 1):
            skipped = [layers[g - offset] for g in range(start, start + n) if 0 <= g - offset < len(layers)]
            for layer in skipped:
                layer.forward = _pass_through
            try:
                out[start] = lm_loss(model, arch, windows, micro_batch_size, desc=None).lm_loss - base
            finally:
                for layer in skipped:
                    del layer.forward  # back to the class's forward
            if bar:
                bar.update(1)
        drops[n] = out
    if bar:
        bar.close()
    return base, drops
