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

- q/k/v: megatron's ``get_query_key_value_tensors`` arithmetic (fused QKV linear, its bias, the per-group split,
  Qwen3's q/k norms), with the lean linear below;
- RoPE rotates the new queries and keys only (positions = cache rows), with megatron's arithmetic; its cos/sin are
  computed once per forward and shared by every layer (megatron recomputes them for each query and key);
- rotated keys and values go into a cache of our own, ``[batch, groups, positions, dim]`` per layer, kept in
  the context (allocated on first use), so attention reads it in place;
- ``torch.nn.functional.scaled_dot_product_attention(..., attn_mask=allowed, enable_gqa=True)``: every query
  head of a group reads its group's keys without copies (torch >= 2.5; on CPU its flash kernel), with the
  engine's boolean mask, inverted once per forward; without pads (one prompt at a time, or a batch of equal
  lengths) a decode step needs no mask and SDPA runs without one;
- megatron's ``linear_proj`` (TP all-reduce included).

:class:`GenerationColumnParallelLinear` / :class:`GenerationRowParallelLinear` (megatron's Column/RowParallelLinear,
local spec): under ``torch.inference_mode`` and outside training, ``torch.matmul(x, weight.t())`` (+ bias), then
the TP all-gather / all-reduce megatron's forward would do, called directly; the same arithmetic as megatron's
forward, which goes through an autograd Function, process-group lookups and a deprecation warning per call
(~60 us a call, 121 linears per decode step of SmolLM2). Sequence parallelism, expert layers and deferred
embedding gradients keep megatron's forward.

:class:`GenerationTransformerLayer` (megatron's TransformerLayer with a plain MLP, no cross-attention): in a
generation forward, norm -> attention -> (+ bias) + residual -> norm -> MLP -> (+ bias) + residual, the same
arithmetic as megatron's eval forward without its per-call recompute/offload/CUDA-graph dispatch; the MLP
(fc1, bias, GLU, fc2) and the norms are called as functions, not modules. One token at a time, the per-call
Python overhead of modules is what separated us from transformers (docs/generation.md "Speed").

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

        query, key, value = _qkv(self, hidden_states)  # [s, b, heads|groups, dim]
        sq, b = query.shape[0], query.shape[1]
        start = ctx.sequence_len_offset
        end = start + sq
        no_rope = self.config.no_rope_freq[self.layer_number - 1] if self.config.no_rope_freq else False
        if rotary_pos_emb is not None and not no_rope:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            if _plain_rope(self.config):
                query = _rotate(query, *_rope_tables(ctx, q_emb, start, end, self.config, query.dtype))
                key = _rotate(key, *_rope_tables(ctx, k_emb, start, end, self.config, key.dtype))
            else:
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
            allowed = None if sq == 1 else (torch.arange(end, device=query.device)[None, :]
                                            <= torch.arange(start, end, device=query.device)[:, None])[None, None]
        else:  # megatron's convention: True = masked; [b or 1, 1, sq, end]
            allowed = _allowed(ctx, attention_mask, sq, end)
        q = query.permute(1, 2, 0, 3)  # [b, heads, sq, dim]
        heads, groups = q.shape[1], keys.shape[1]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=_softmax_scale(self),
                                             enable_gqa=heads != groups)
        core = out.permute(2, 0, 1, 3).reshape(sq, b, heads * out.shape[-1])  # [s, b, hidden/TP]
        proj = self.linear_proj
        if isinstance(proj, GenerationRowParallelLinear) and _lean_linear(proj) and proj.input_is_parallel:
            return _row_linear(proj, core)
        return proj(core)


def _qkv(attn, x: torch.Tensor):
    """megatron's ``get_query_key_value_tensors`` (no output gate) with the lean QKV linear, when this rank holds
    whole query groups; megatron's own otherwise."""
    qkv = attn.linear_qkv
    if (not isinstance(qkv, GenerationColumnParallelLinear) or not _lean_linear(qkv) or qkv.gather_output
            or attn.config.num_query_groups < attn.world_size or getattr(attn.config, "attention_output_gate", False)):
        return attn.get_query_key_value_tensors(x, None)
    mixed = _matmul_wt(x, qkv.weight)
    if qkv.bias is not None and not qkv.skip_bias_add:  # a skipped bias is dropped by megatron here too
        mixed = mixed + qkv.bias
    groups, dim = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
    per_group = attn.num_attention_heads_per_partition // groups
    mixed = mixed.view(*mixed.shape[:-1], groups, (per_group + 2) * dim)
    query, key, value = torch.split(mixed, [per_group * dim, dim, dim], dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, dim)
    if attn.q_layernorm is not None:
        query = _norm(attn.q_layernorm, query)
    if attn.k_layernorm is not None:
        key = _norm(attn.k_layernorm, key)
    return query, key, value


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


def _allowed(ctx, attention_mask: torch.Tensor, sq: int, end: int) -> torch.Tensor:
    """SDPA's mask (True = attend) from megatron's (True = masked), made once per forward for every layer."""
    cached = ctx.fast_allowed
    if cached is None or cached[0] is not attention_mask:
        cached = (attention_mask, ~attention_mask[..., -sq:, :end])
        ctx.fast_allowed = cached
    return cached[1]


def _plain_rope(config) -> bool:
    """RoPE as _rotate computes it: megatron's unfused, non-interleaved rotation of [s, b, heads, dim]."""
    return (not config.apply_rope_fusion and not config.rotary_interleaved
            and not getattr(config, "multi_latent_attention", False))


def _rope_tables(ctx, freqs: torch.Tensor, start: int, end: int, config, dtype):
    """cos and sin of positions [start, end), as megatron's ``_apply_rotary_pos_emb_bshd`` computes them
    (``(cos(freqs) * mscale).to(dtype)``), once per forward: every layer rotates the same positions."""
    key = (freqs.data_ptr(), start, end, dtype)
    tables = ctx.fast_rope.get(key)
    if tables is None:
        if any(k[1:3] != (start, end) for k in ctx.fast_rope):  # a new forward: the last one's positions go
            ctx.fast_rope.clear()
        f, mscale = freqs[start:end], _mscale(config)
        tables = ctx.fast_rope[key] = ((torch.cos(f) * mscale).to(dtype), (torch.sin(f) * mscale).to(dtype))
    return tables


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's rotation ``t * cos + rotate_half(t) * sin`` of the first ``cos.shape[-1]`` channels."""
    rot = cos.shape[-1]
    if rot == t.shape[-1]:
        x1, x2 = torch.chunk(t, 2, dim=-1)
        return t * cos + torch.cat((-x2, x1), dim=-1) * sin
    head, rest = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(head, 2, dim=-1)
    return torch.cat((head * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


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
        return _row_linear(self, input_)


def _row_linear(m, x: torch.Tensor):
    """megatron's RowParallelLinear forward (input already split over TP), as (output, bias)."""
    out = torch.matmul(x, m.weight.t())
    if _tp_size(m) > 1:
        torch.distributed.all_reduce(out, group=m.tp_group)
    if m.skip_bias_add:
        return out, m.bias
    return (out + m.bias if m.bias is not None else out), None


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
        out, bias = self.self_attention(_norm(self.input_layernorm, hidden),
                                        attention_mask=kwargs.get("attention_mask"), inference_context=ctx,
                                        rotary_pos_emb=kwargs.get("rotary_pos_emb"))
        hidden = _bias_add(out, bias, hidden)
        x = _norm(self.pre_mlp_layernorm, hidden)
        out, bias = _mlp(self.mlp, x) if _lean_mlp(self.mlp) else self.mlp(x)
        return _bias_add(out, bias, hidden), None


def _lean_mlp(mlp) -> bool:
    """Whether :func:`_mlp` computes this MLP: unfused activation, lean linears whose bias megatron adds itself."""
    c, fc1, fc2 = mlp.config, mlp.linear_fc1, mlp.linear_fc2
    return (isinstance(fc1, GenerationColumnParallelLinear) and isinstance(fc2, GenerationRowParallelLinear)
            and _lean_linear(fc1) and _lean_linear(fc2) and fc2.input_is_parallel and not fc1.gather_output
            and not c.bias_activation_fusion and not getattr(c, "use_te_activation_func", False)
            and getattr(c, "activation_func_clamp_value", None) is None)


def _mlp(mlp, x: torch.Tensor):
    """megatron's MLP forward without fusions (fc1, + bias, GLU or activation, fc2), its linears called lean."""
    c, fc1 = mlp.config, mlp.linear_fc1
    h = _matmul_wt(x, fc1.weight)
    if fc1.bias is not None:  # added here whether fc1 skips it (megatron's MLP adds it) or not (the linear does)
        h = h + fc1.bias
    if c.gated_linear_unit:
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        h = c.activation_func(x_glu) * (x_linear + getattr(c, "glu_linear_offset", 0.0))
    else:
        h = mlp.activation_func(h)
    return _row_linear(mlp.linear_fc2, h)


def _norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``; torch's RMSNorm called as its forward does, without the module call around it."""
    if type(norm) is torch.nn.RMSNorm:
        return torch.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    return norm(x)


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
    if not torch.is_inference_mode_enabled() or m.training:
        return False
    static = m.__dict__.get("_lean_static")  # what does not change after the model is built, looked up once
    if static is None:
        static = (not m.sequence_parallel and not getattr(m, "explicit_expert_comm", False)
                  and not m.config.defer_embedding_wgrad_compute and getattr(m, "tp_group", None) is not None)
        m.__dict__["_lean_static"] = static
    return static and getattr(m.config, "_cpu_offloading_context", None) is None


def _tp_size(m) -> int:
    size = m.__dict__.get("_tp_size")
    if size is None:
        size = m.__dict__["_tp_size"] = m.tp_group.size() if torch.distributed.is_initialized() else 1
    return size


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
