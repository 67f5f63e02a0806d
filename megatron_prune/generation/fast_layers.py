"""The decode path of megatron's layers, for KV-cached generation: self-attention with new keys rotated once, a
cache in the layout attention reads, GQA without repeating keys and torch's fused scaled_dot_product_attention;
and tensor-parallel linear layers without the autograd/TP bookkeeping that a forward under inference_mode
does not need.

Why (profiled on SmolLM2-135M, CPU, docs/generation.md "Speed"): with megatron's static inference context, each
decode step of megatron's ``SelfAttention`` + local ``DotProductAttention`` does, per layer, work proportional to
the whole cache rather than to the new token: RoPE is re-applied to every cached key (the cache holds them
unrotated), keys and values are copied ``heads / groups`` times (``repeat_interleave``) out of a
[s, b, groups, dim] cache, and the boolean mask becomes a float mask before softmax. At 600 cached positions this
reads and writes more memory per step than the model's weights.

:class:`GenerationSelfAttention` subclasses megatron's ``SelfAttention`` (same submodules, same parameters, same
checkpoint keys). Its forward takes over only when it is given a :class:`~megatron_prune.generation.kv_cache`
context marked for it, outside training; every other call (training, scoring, a forward without a context)
is megatron's own. In the taken-over forward:

- q/k/v come from megatron's own ``get_query_key_value_tensors`` (fused QKV linear, Qwen3's q/k norms);
- RoPE rotates the new queries and keys only (megatron's ``apply_rotary_pos_emb``, positions = cache rows);
- rotated keys and values go into a cache of our own, ``[batch, groups, positions, dim]`` per layer, kept in
  the context (allocated on first use), so attention reads it in place;
- ``torch.nn.functional.scaled_dot_product_attention(..., attn_mask=allowed, enable_gqa=True)``: every query
  head of a group reads its group's keys without copies (torch >= 2.5; on CPU its flash kernel), with the
  engine's boolean mask as it is;
- megatron's ``linear_proj`` (TP all-reduce included).

:class:`GenerationColumnParallelLinear` / :class:`GenerationRowParallelLinear` (megatron's Column/RowParallelLinear,
local spec): under ``torch.inference_mode`` and outside training, ``torch.matmul(x, weight.t())`` (+ bias), then
the TP all-gather / all-reduce megatron's forward would do, called directly; the same arithmetic as megatron's
forward, which goes through an autograd Function, process-group lookups and a deprecation warning per call
(~60 us a call, 121 linears per decode step of SmolLM2). Sequence parallelism, expert layers and deferred
embedding gradients keep megatron's forward.

:class:`GenerationTransformerLayer` (megatron's TransformerLayer with a plain MLP, no cross-attention): in a
generation forward, norm -> attention -> (+ bias) + residual -> norm -> MLP -> (+ bias) + residual, the same
arithmetic as megatron's eval forward without its per-call recompute/offload/CUDA-graph dispatch.

:func:`use_fast_generation` turns a built model's megatron modules into these classes in place (``__class__``
swap: nothing is re-built, no parameter moves, state dicts and checkpoints are unchanged); the engine calls it
for every model it runs. Outside a generation forward, every module runs megatron's own forward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_SUBCLASSES: dict[type, type] = {}


class GenerationSelfAttention:
    """Mixin placed before megatron's ``SelfAttention`` in a generated subclass (see :func:`use_fast_attention`)."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        ctx = kwargs.get("inference_context")
        if ctx is None:
            ctx = kwargs.get("inference_params")
        if (ctx is None or self.training or getattr(ctx, "fast_kv", None) is None or args
                or kwargs.get("key_value_states") is not None or kwargs.get("packed_seq_params") is not None
                or kwargs.get("attention_bias") is not None or not fast_path_supported(self.config)):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        return self._generation_forward(hidden_states, attention_mask, ctx, kwargs.get("rotary_pos_emb"))

    def _generation_forward(self, hidden_states, attention_mask, ctx, rotary_pos_emb):
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        query, key, value = self.get_query_key_value_tensors(hidden_states, None)  # [s, b, heads|groups, dim]
        sq, b = query.shape[0], query.shape[1]
        start = ctx.sequence_len_offset
        end = start + sq
        no_rope = self.config.no_rope_freq[self.layer_number - 1] if self.config.no_rope_freq else False
        if rotary_pos_emb is not None and not no_rope:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            query = apply_rotary_pos_emb(query, q_emb[start:end], config=self.config, mscale=_mscale(self.config))
            key = apply_rotary_pos_emb(key, k_emb[start:end], config=self.config, mscale=_mscale(self.config))
        k_cache, v_cache = _layer_cache(ctx, self.layer_number, key)
        if end > k_cache.shape[2] or b > k_cache.shape[0]:
            raise ValueError(f"KV cache of {k_cache.shape[0]} x {k_cache.shape[2]} positions is too small for "
                             f"{b} x {end}")
        k_cache[:b, :, start:end] = key.permute(1, 2, 0, 3)
        v_cache[:b, :, start:end] = value.permute(1, 2, 0, 3)
        keys, values = k_cache[:b, :, :end], v_cache[:b, :, :end]
        if attention_mask is None:  # causal over the new block, everything cached before it
            allowed = (torch.arange(end, device=query.device)[None, :]
                       <= torch.arange(start, end, device=query.device)[:, None])[None, None]
        else:  # megatron's convention: True = masked; [b or 1, 1, sq, end]
            allowed = ~attention_mask[..., -sq:, :end]
        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, dim]
        heads, groups = q.shape[1], keys.shape[1]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=_softmax_scale(self),
                                             enable_gqa=heads != groups)
        core = out.permute(2, 0, 1, 3).reshape(sq, b, heads * out.shape[-1])  # [s, b, hidden/TP]
        return self.linear_proj(core)


def fast_path_supported(config) -> bool:
    """The configurations the generation forward reproduces exactly; others keep megatron's own forward."""
    return (getattr(config, "softmax_type", "vanilla") == "vanilla" and getattr(config, "window_size", None) is None
            and not getattr(config, "attention_output_gate", False) and not getattr(config, "flash_decode", False)
            and not getattr(config, "multi_latent_attention", False)
            and getattr(config, "context_parallel_size", 1) == 1)


def _softmax_scale(module) -> float:
    """megatron's DotProductAttention: config.softmax_scale, else 1/sqrt(head dim) (query-key layer scaling
    divides and multiplies back by the same coefficient, so it cancels)."""
    scale = module.config.softmax_scale
    return scale if scale is not None else 1.0 / math.sqrt(module.hidden_size_per_attention_head)


def _mscale(config) -> float:
    """YaRN's attention concentration factor, as megatron's Attention.forward passes it (1.0 otherwise)."""
    from megatron.core.transformer import attention

    fn = getattr(attention, "_yarn_get_concentration_factor_from_config", None)
    return float(fn(config)) if fn is not None else 1.0


def _layer_cache(ctx, layer_number: int, key: torch.Tensor):
    """(keys, values) buffers [max_batch, groups, max_positions, dim] of this layer, allocated on first use."""
    kv = ctx.fast_kv.get(layer_number)
    if kv is None:
        shape = (ctx.max_batch_size, key.shape[2], ctx.max_sequence_length, key.shape[3])
        kv = (torch.empty(shape, dtype=key.dtype, device=key.device),
              torch.empty(shape, dtype=key.dtype, device=key.device))
        ctx.fast_kv[layer_number] = kv
    return kv


class GenerationColumnParallelLinear:
    """Mixin before megatron's ``ColumnParallelLinear`` (see :func:`use_fast_generation`)."""

    def forward(self, input_, weight=None, runtime_gather_output=None, **kwargs):
        if kwargs or not _lean_linear(self):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs)
        w = self.weight if weight is None else weight
        if w is None or w.shape != (self.output_size_per_partition, self.input_size):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        out = _matmul_wt(input_, w)
        if self.bias is not None and not self.skip_bias_add:
            out = out + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and _tp_size(self) > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, (self.bias if self.skip_bias_add else None)


# Decode GEMMs of a few rows (batch 2-64) against a wide weight run faster in column blocks: on the CPU, MKL's
# sgemm on [16, 576] x [576, 49152] took 30 ms in one call and 23 ms in blocks of 1024 output columns (fc1
# [16, 1024] x [1024, 5632]: 5.2 -> 4.7 ms), with bit-identical results (each output is the same dot product).
# One row (batch 1) gains nothing; a prefill (hundreds of rows) is compute-bound and is left whole.
_BLOCK_COLUMNS, _BLOCK_MAX_ROWS = 1024, 64


def _matmul_wt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(x, w.t())``, in blocks of output columns for a few rows against a wide weight (CPU)."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or not 2 <= rows <= _BLOCK_MAX_ROWS or w.shape[0] <= 2 * _BLOCK_COLUMNS:
        return torch.matmul(x, w.t())
    return torch.cat([torch.matmul(x, part.t()) for part in w.split(_BLOCK_COLUMNS)], dim=-1)


class GenerationRowParallelLinear:
    """Mixin before megatron's ``RowParallelLinear`` (see :func:`use_fast_generation`)."""

    def forward(self, input_, *args, **kwargs):
        if args or kwargs or not _lean_linear(self) or not self.input_is_parallel:
            return super().forward(input_, *args, **kwargs)
        out = torch.matmul(input_, self.weight.t())
        if _tp_size(self) > 1:
            torch.distributed.all_reduce(out, group=self.tp_group)
        if self.skip_bias_add:
            return out, self.bias
        return (out + self.bias if self.bias is not None else out), None


class GenerationTransformerLayer:
    """Mixin before megatron's ``TransformerLayer``: in a generation forward, the layer's own arithmetic
    (norm, self-attention, bias + residual, norm, MLP, bias + residual; dropout is off in eval) without
    megatron's per-call recompute/offload/CUDA-graph/fused-kernel dispatch."""

    def forward(self, *args, **kwargs):
        ctx = kwargs.get("inference_context")
        if (args or ctx is None or getattr(ctx, "fast_kv", None) is None or self.training
                or not _plain_layer(self)
                or any(kwargs.get(k) is not None for k in ("context", "attention_bias", "packed_seq_params",
                                                           "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
                                                           "padding_mask"))):
            return super().forward(*args, **kwargs)
        hidden = kwargs["hidden_states"]
        out, bias = self.self_attention(self.input_layernorm(hidden), attention_mask=kwargs.get("attention_mask"),
                                        inference_context=ctx, rotary_pos_emb=kwargs.get("rotary_pos_emb"))
        hidden = _bias_add(out, bias, hidden)
        out, bias = self.mlp(self.pre_mlp_layernorm(hidden))
        return _bias_add(out, bias, hidden), None


def _bias_add(x, bias, residual):
    """megatron's bias-dropout-add in eval: (x + bias) + residual, in that order (dropout is the identity)."""
    if bias is not None:
        x = x + bias
    return residual + x


def _plain_layer(layer) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    c = layer.config
    return (type(layer.mlp) is MLP and isinstance(layer.cross_attention, IdentityOp)
            and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)
            and not getattr(layer, "recompute_input_layernorm", False)
            and not getattr(layer, "recompute_pre_mlp_layernorm", False) and not getattr(layer, "recompute_mlp", False)
            and not getattr(c, "inference_fuse_tp_communication", False)
            and getattr(c, "mlp_chunks_for_prefill", 1) <= 1
            and not getattr(c, "apply_residual_connection_post_layernorm", False)
            and not getattr(c, "fp32_residual_connection", False))


def _lean_linear(m) -> bool:
    return (torch.is_inference_mode_enabled() and not m.training and not m.sequence_parallel
            and not getattr(m, "explicit_expert_comm", False) and not m.config.defer_embedding_wgrad_compute
            and getattr(m.config, "_cpu_offloading_context", None) is None and getattr(m, "tp_group", None) is not None)


def _tp_size(m) -> int:
    return m.tp_group.size() if torch.distributed.is_initialized() else 1


def use_fast_generation(model: torch.nn.Module) -> int:
    """Make megatron's ``TransformerLayer``, ``SelfAttention``, ``ColumnParallelLinear`` and ``RowParallelLinear``
    modules of ``model`` their generation subclasses (in place, idempotent); returns how many modules were changed
    now. Outside a generation forward they behave exactly as before."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    mixins = {SelfAttention: GenerationSelfAttention, ColumnParallelLinear: GenerationColumnParallelLinear,
              RowParallelLinear: GenerationRowParallelLinear, TransformerLayer: GenerationTransformerLayer}
    n = 0
    for m in model.modules():
        mixin = mixins.get(type(m))  # the exact classes only: subclasses (TE, experts) keep their own forward
        if mixin is not None:
            m.__class__ = _subclass(type(m), mixin)
            n += 1
    return n


def _subclass(cls: type, mixin: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Generation{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[cls]


def uses_fast_attention(model: torch.nn.Module) -> Optional[bool]:
    """True when every self-attention of ``model`` is a :class:`GenerationSelfAttention` (None: it has none)."""
    from megatron.core.transformer.attention import SelfAttention

    mods = [m for m in model.modules() if isinstance(m, SelfAttention)]
    return all(isinstance(m, GenerationSelfAttention) for m in mods) if mods else None
