"""The KV cache: megatron-core's StaticInferenceContext, and the only place that knows its API.

GPTModel.forward(..., inference_context=ctx) keeps every layer's keys and values in ``ctx`` at rows
``[sequence_len_offset, sequence_len_offset + s)`` and attends to rows ``[0, offset + s)``; RoPE rotates by
the row index (generation/fast_layers.py's layers keep their own, rotated, cache in the same context; the offset
works the same for both). We set the offset ourselves before every forward, which also makes rolling back (after
rejected speculative tokens) a matter of moving the offset: rows past it are overwritten before they are
read again. This context (not megatron's engines, which are being deprecated) is what GPTModel itself
consumes in megatron-core 0.16 through 0.19.
"""

from __future__ import annotations

import torch


def new_cache(max_batch_size: int, max_sequence_length: int, last_token_logits_only: bool = True):
    from megatron.core.inference.contexts import StaticInferenceContext

    ctx = StaticInferenceContext(max_batch_size, max_sequence_length)
    ctx.materialize_only_last_token_logits = last_token_logits_only
    # per-layer (keys, values) of generation/fast_layers.py's GenerationSelfAttention, [b, groups, positions, dim],
    # rotated keys; layers left to megatron's own attention use ctx.key_value_memory_dict as before
    ctx.fast_kv = {}
    ctx.fast_rope = {}  # RoPE's cos/sin of the current forward's positions, shared by every layer
    ctx.fast_allowed = None  # (megatron's mask, SDPA's mask) of the current forward, shared by every layer
    return ctx


def set_cache_length(ctx, length: int) -> None:
    """Make the next forward write its keys/values at row ``length`` (and attend to rows before it)."""
    if length > ctx.max_sequence_length:
        raise ValueError(f"KV cache of {ctx.max_sequence_length} positions is full (asked for row {length})")
    ctx.sequence_len_offset = length
    ctx.batch_size_offset = 0


def set_last_token_logits_only(ctx, flag: bool) -> None:
    ctx.materialize_only_last_token_logits = flag


def model_forward(model: torch.nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor, ctx=None):
    """GPTModel forward: full (TP-gathered, vocab-padded) logits [b, s, V_padded] on the last stage, hidden
    states elsewhere. Position ids are passed for completeness; with RoPE megatron takes the cache row.
    """
    from megatron_prune.forward import position_ids_like

    return model(tokens, position_ids_like(tokens), attention_mask, inference_context=ctx, runtime_gather_output=True)
