"""Forward passes through a (possibly pipeline-parallel) GPTModel with megatron's own schedules.

Every stage runs the same call; results computed on the last stage are returned there (and can be
broadcast to all ranks with :func:`broadcast_from_last_stage`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron_prune.arch import ModelArch


def position_ids_like(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def mask_padded_vocab(logits: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Push logits of padding vocab rows (index >= vocab_size) to a huge negative so softmax ignores them.

    ``logits`` is this TP rank's vocab shard ``[..., V_padded / tp]``.
    """
    from megatron.core import parallel_state as ps

    if arch.padded_vocab_size == arch.vocab_size:
        return logits
    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    col = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(col >= arch.vocab_size, torch.finfo(logits.dtype).min / 2)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Per-token cross entropy [b, s] from vocab-parallel logits [b, s, V/tp], without gathering the vocab."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = mask_padded_vocab(logits, arch)
    return vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(), labels.t().contiguous()).t()


def vocab_parallel_argmax(logits: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Index of the largest logit over the whole vocab [b, s], from vocab-parallel logits [b, s, V/tp], without
    gathering the vocab: each TP rank's (max, index) pair is all-gathered and the largest wins (lowest index on
    ties, as torch.argmax)."""
    from megatron.core import parallel_state as ps

    value, index = mask_padded_vocab(logits, arch).float().max(-1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return index
    index = index + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = ps.get_tensor_model_parallel_group()
    values, indices = [torch.empty_like(value) for _ in range(tp)], [torch.empty_like(index) for _ in range(tp)]
    dist.all_gather(values, value.contiguous(), group=group)
    dist.all_gather(indices, index.contiguous(), group=group)
    best = torch.stack(values).argmax(0, keepdim=True)  # the first shard holding the maximum
    return torch.stack(indices).gather(0, best)[0]


def gather_vocab(logits: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """Full-vocab logits [..., vocab_size] from this rank's vocab shard (for tests and small outputs)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size]


def run_forward(
    model: torch.nn.Module,
    batches: Iterable[dict],
    num_batches: int,
    seq_len: int,
    micro_batch_size: int,
    on_output: Callable[[torch.Tensor, dict], Any],
) -> list:
    """Run ``model`` forward over ``num_batches`` micro-batches (dicts with ``tokens`` [b, s]).

    ``model`` may be a list of model chunks (virtual pipeline stages: the interleaved schedule, which wants
    ``num_batches`` to be a multiple of the pipeline size).

    ``on_output(logits_shard, batch)`` runs on the last pipeline stage for every micro-batch and its return
    values are collected in order; other stages return an empty list.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    results: list = []

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        out = model_chunk(tokens, position_ids_like(tokens), None)

        def loss_func(output_tensor):
            results.append(on_output(output_tensor, batch))
            return output_tensor.new_zeros(()), {}

        return out, loss_func

    forward_backward = get_forward_backward_func()
    chunks = model if isinstance(model, list) else [model]
    # eval mode: forward only (a MoE router adds no load-balancing loss, and megatron's MoE layer refuses TP > 1
    # without sequence parallelism only in training)
    was_training = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        forward_backward(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks,
            num_microbatches=num_batches,
            seq_length=seq_len,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    for chunk, training in zip(chunks, was_training, strict=True):
        chunk.train(training)
    return results


def broadcast_from_last_stage(obj: Any) -> Any:
    """Send a picklable object from the last pipeline stage (tp rank 0) to every rank of this pipeline."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    group = ps.get_pipeline_model_parallel_group()
    src = ps.get_pipeline_model_parallel_last_rank()
    box = [obj if ps.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
