"""LM loss and perplexity of a checkpoint on a tokenized data set, at any TP/PP (and DP)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.arch import ModelArch
from megatron_prune.forward import run_forward, token_losses


@dataclass
class EvalResult:
    lm_loss: float
    perplexity: float
    tokens: int
    sequences: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def lm_loss(model: torch.nn.Module, arch: ModelArch, windows: torch.Tensor, micro_batch_size: int = 4,
            desc: Optional[str] = "eval") -> EvalResult:
    """Mean next-token loss of ``model`` over ``windows`` [n, seq_len + 1] (every rank passes the same windows).

    Data-parallel ranks split the windows; the result is the same on every rank. ``model`` may be a list of
    model chunks (virtual pipeline stages).
    """
    from megatron.core import parallel_state as ps

    from megatron_prune.forward import broadcast_from_last_stage
    from megatron_prune.runtime.progress import progress

    start = time.time()
    chunks = model if isinstance(model, list) else [model]
    was_training = chunks[0].training
    for c in chunks:
        c.eval()
    # the interleaved schedule runs micro-batches in groups of PP: calls are padded with repeats (not counted)
    group = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = windows[dp_rank::dp]
    # every data-parallel rank runs the same forwards (with expert parallelism the experts' all-to-all spans them):
    # a rank short of a window repeats one, which is not counted
    real = len(mine)
    short = -(-len(windows) // dp) - real
    if short:
        mine = torch.cat([mine, (mine[-1:] if real else windows[:1]).expand(short, -1)])
    batches = [{"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
                "rows": torch.tensor(min(len(w), max(0, real - i * micro_batch_size)))}
               for i, w in enumerate(mine.split(micro_batch_size))]
    seq_len = windows.shape[1] - 1
    device = next(chunks[0].parameters()).device
    total = torch.zeros(2, dtype=torch.float64)
    chunk = 4 * ps.get_pipeline_model_parallel_world_size()  # micro-batches per schedule call
    # megatron's schedule wants equal micro-batches: a short last one gets a call of its own
    full = [b for b in batches if len(b["tokens"]) == micro_batch_size]
    calls = [full[i: i + chunk] for i in range(0, len(full), chunk)] + [[b] for b in batches[len(full):]]
    bar = progress(len(windows), desc, unit="seq") if desc else None

    def on_output(logits, batch):
        if batch.get("repeat"):
            return 0.0, 0
        losses = token_losses(logits, batch["labels"].to(device), arch)[: int(batch["rows"])]
        return losses.sum().item(), losses.numel()

    for part in calls:
        part = [{k: v.to(device) for k, v in b.items()} for b in part]
        part += [dict(part[-1], repeat=True)] * (-len(part) % group)
        mbs = len(part[0]["tokens"])
        results = broadcast_from_last_stage(run_forward(model, part, len(part), seq_len, mbs, on_output))
        for s, n in results:
            total += torch.tensor([s, n], dtype=torch.float64)
        if bar:
            bar.update(sum(len(b["tokens"]) for b in part) * dp)
    if bar:
        bar.close()
    if dist.is_initialized() and dp > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    for c in chunks:
        c.train(was_training)
    if total[1] == 0:
        raise ValueError(f"no evaluation data: {len(windows)} windows < micro batch {micro_batch_size} x DP {dp}")
    loss = (total[0] / total[1]).item()
    return EvalResult(lm_loss=loss, perplexity=math.exp(loss), tokens=int(total[1]),
                      sequences=int(total[1]) // seq_len, seconds=time.time() - start)
