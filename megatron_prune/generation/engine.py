"""Batched generation on a megatron-core GPTModel at any TP/PP (and DP over prompts).

One batch is a :class:`BatchRunner`: left-padded prompts in a token buffer, a boolean ``keep`` buffer of
which positions are real, and (with ``use_cache``) megatron's KV cache. Every forward (prefill, each
decode step, a speculative verification block) is ``feed(new tokens)``: the new tokens attend to every
earlier real position and causally to each other, through an explicit attention mask, so pads never leak
in. Without the cache the same call recomputes the whole sequence (the reference the cache is tested
against). RoPE positions are the buffer rows; a left pad shifts a row's positions by a constant, which
rotary attention does not see (it depends on position differences only).

Pipeline stages exchange hidden states through megatron's own schedule (one micro-batch per forward).
Logits exist on the last stage; the next tokens are chosen there (on TP rank 0's copy) and broadcast to
every rank of the model-parallel group, so all ranks feed the same tokens.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_prune.arch import ModelArch
from megatron_prune.generation import kv_cache
from megatron_prune.generation.fast_layers import fast_path_supported, use_fast_generation, uses_fast_attention
from megatron_prune.generation.sampling import SamplingParams, next_tokens, prompt_generator


def check_model_for_generation(model: torch.nn.Module) -> None:
    """Generation masks pads with an explicit attention mask, which only megatron's local attention honours."""
    for m in model.modules():
        if type(m).__name__ == "TEDotProductAttention":
            raise ValueError("generation needs megatron's local attention (it takes an explicit padding mask); "
                             "build the model with use_te=False (load_model(ckpt, use_te=False))")


def is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage()


def share_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """Broadcast ``t`` from the last stage's TP rank 0 to every rank of the model-parallel group (in place).

    Every rank passes a tensor of the same shape and dtype; only the sender's content matters.
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return t
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t


def pipeline_forward(model: torch.nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor, ctx=None):
    """One forward of ``tokens`` [b, s] through all pipeline stages; the logits shard on the last stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if ps.get_pipeline_model_parallel_world_size() == 1:  # one stage: the schedule would only add overhead
        return kv_cache.model_forward(model, tokens, attention_mask, ctx)
    out: list = []

    def forward_step(data_iterator, model_chunk):
        next(data_iterator)
        output = kv_cache.model_forward(model_chunk, tokens, attention_mask, ctx)

        def loss_func(output_tensor):
            out.append(output_tensor)
            return output_tensor.new_zeros(()), {}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
    )
    return out[0] if out else None


class BatchRunner:
    """A batch of sequences growing together, with or without megatron's KV cache."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, batch_size: int, max_length: int,
                 use_cache: bool = True, fast_attention: bool = True):
        self.model, self.arch, self.use_cache = model, arch, use_cache
        model.eval()  # megatron uses the inference context only outside training mode
        self.device = next(model.parameters()).device
        self.tokens = torch.zeros(batch_size, max_length, dtype=torch.long, device=self.device)
        self.keep = torch.zeros(batch_size, max_length, dtype=torch.bool, device=self.device)
        self.length = 0  # positions written (the same for every row)
        self.ctx = kv_cache.new_cache(batch_size, max_length) if use_cache else None
        self.mask_optional = False  # whether a forward without pads may go without a mask (causal by position)
        if self.ctx is not None:
            if fast_attention:  # fast_layers.py: our cache layout, SDPA, lean linears (megatron's forward elsewhere)
                use_fast_generation(model)
                self.mask_optional = bool(uses_fast_attention(model)) and fast_path_supported(model.config)
            else:  # megatron's own attention and KV cache (the reference the fast path is tested against)
                self.ctx.fast_kv = None

    @property
    def max_length(self) -> int:
        return self.tokens.shape[1]

    def feed(self, tokens: torch.Tensor, keep: Optional[torch.Tensor] = None, last_only: bool = True):
        """Append ``tokens`` [b, s] (``keep`` [b, s]: False for pads) and run the model over them.

        Returns full-vocab float32 logits on the last stage, [b, V] for the last new position when
        ``last_only`` else [b, s, V] for every new position; None on other stages.
        """
        b, s = tokens.shape
        start, end = self.length, self.length + s
        if end > self.max_length:
            raise ValueError(f"sequence of {end} tokens exceeds the batch's buffer of {self.max_length}")
        self.tokens[:, start:end] = tokens.to(self.device)
        self.keep[:, start:end] = True if keep is None else keep.to(self.device)
        q0 = start if self.use_cache else 0
        q_pos = torch.arange(q0, end, device=self.device)
        k_pos = torch.arange(end, device=self.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & self.keep[:, None, :end]
        # a pad query attends to itself only (no row is all masked: softmax kernels would give NaN or zeros);
        # real queries never see a pad, as before
        allowed |= (k_pos[None, :] == q_pos[:, None])[None]
        mask = ~allowed[:, None]  # [b, 1, sq, sk]; True = masked
        if self.mask_optional and bool(self.keep[:, :end].all()):
            mask = None  # no pads: the fast attention's causal rule is this mask (and SDPA runs without one)
        if self.use_cache:
            kv_cache.set_cache_length(self.ctx, start)
            kv_cache.set_last_token_logits_only(self.ctx, last_only)
        with torch.inference_mode():
            logits = pipeline_forward(self.model, self.tokens[:, q0:end], mask, self.ctx)
        self.length = end
        if logits is None:
            return None
        logits = logits[:, -1] if last_only else logits[:, -s:]
        return logits[..., : self.arch.vocab_size].float()

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (rejected speculative tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a sequence of {self.length} to {length}")
        self.keep[:, length:] = False
        self.length = length


def generate_batch(model, arch, prompts: list[list[int]], indices: list[int], params: SamplingParams,
                   stop_token_ids: Sequence[int] = (), pad_token_id: int = 0, use_cache: bool = True,
                   bar=None, stop_when: Optional[Callable[[list[int]], bool]] = None,
                   fast_attention: bool = True) -> list[list[int]]:
    """One batch on this model-parallel group (no DP split); ``indices`` seed each prompt's sampler.

    ``stop_when(new_tokens)``: an extra stop rule checked after every step (e.g. a stop string in the decoded
    text); every rank sees the same tokens, so every rank takes the same decision without communicating.
    """
    stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long)
    bar = bar if bar is not None else _NoBar()
    b, longest = len(prompts), max(len(p) for p in prompts)
    runner = BatchRunner(model, arch, b, longest + params.max_new_tokens, use_cache, fast_attention)
    tokens = torch.full((b, longest), pad_token_id, dtype=torch.long)
    keep = torch.zeros(b, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the same position
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        keep[i, longest - len(p):] = True
    generators = [prompt_generator(params.seed, i) for i in indices]
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    logits = runner.feed(tokens, keep)
    for step in range(params.max_new_tokens):
        chosen = (next_tokens(logits, params, generators).cpu() if logits is not None
                  else torch.zeros(b, dtype=torch.long))
        chosen = share_from_last_stage(chosen.to(runner.device)).cpu()
        for i in (~done).nonzero().flatten().tolist():
            out[i].append(int(chosen[i]))
        bar.update(int((~done).sum()))
        done |= torch.isin(chosen, stop_ids)
        if stop_when is not None:
            for i in (~done).nonzero().flatten().tolist():
                done[i] = stop_when(out[i])
        if bool(done.all()) or step == params.max_new_tokens - 1:
            break
        logits = runner.feed(torch.where(done, pad_token_id, chosen)[:, None], (~done)[:, None])
    return out


def check_prompts(prompts: Sequence[Sequence[int]], arch: ModelArch, max_new_tokens: int) -> None:
    if not prompts:
        raise ValueError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if not 0 <= int(t) < arch.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocab [0, {arch.vocab_size}): {bad[:5]}; "
                             "was it tokenized with another model's tokenizer?")
        if len(p) + max_new_tokens > arch.max_position_embeddings:
            raise ValueError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"{arch.max_position_embeddings} positions; shorten the prompt or lower max_new_tokens")


@torch.no_grad()
def generate(model: torch.nn.Module, arch: ModelArch, prompts: list[list[int]], params: SamplingParams,
             stop_token_ids: Sequence[int] = (), pad_token_id: int = 0, batch_size: int = 8, use_cache: bool = True,
             desc: Optional[str] = "generate", fast_attention: bool = True) -> list[list[int]]:
    """New tokens for each prompt (token id lists), the same list on every rank.

    Every rank of the job calls this with the same prompts; data-parallel replicas split them (not with expert
    parallelism, whose all-to-all makes every replica run the same steps). A sequence
    stops after a token of ``stop_token_ids`` (which is included as its last token) or after
    ``params.max_new_tokens`` tokens (a sequence that does not end in a stop token was truncated).
    Prompts are grouped by length into batches of ``batch_size`` and left-padded with ``pad_token_id``
    (which never influences the result). ``use_cache=False`` recomputes the whole sequence every step.
    ``fast_attention=False`` keeps megatron's own attention and KV cache (slower; the reference of the default,
    generation/fast_layers.py).
    The model must use megatron's local attention spec (see :func:`check_model_for_generation`).
    """
    from megatron.core import parallel_state as ps

    from megatron_prune.runtime.progress import progress

    check_model_for_generation(model)
    check_prompts(prompts, arch, params.max_new_tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if ps.get_expert_model_parallel_world_size() > 1:
        # the experts' all-to-all spans the data-parallel ranks, which must then run the same forwards and steps:
        # each runs every prompt (the same tokens everywhere, sampling included: seeded per prompt)
        dp, dp_rank = 1, 0
    mine = sorted(range(dp_rank, len(prompts), dp), key=lambda i: -len(prompts[i]))  # little padding per batch
    bar = progress(len(prompts) * params.max_new_tokens, desc, unit="tok") if desc else None
    bar_for_batches = bar if bar is not None else _NoBar()
    results: dict[int, list[int]] = {}
    start, produced = time.time(), 0
    for k in range(0, len(mine), batch_size):
        idx = mine[k: k + batch_size]
        outs = generate_batch(model, arch, [list(prompts[i]) for i in idx], idx, params, stop_token_ids, pad_token_id,
                              use_cache, _ScaledBar(bar_for_batches, dp), fast_attention=fast_attention)
        results.update(zip(idx, outs))
        produced += sum(len(o) for o in outs)
    if bar is not None:
        bar.set_postfix(tok_per_s=f"{produced * dp / max(time.time() - start, 1e-9):.1f}")
        bar.close()
    model.train(was_training)
    if dist.is_initialized() and dp > 1:
        parts: list = [None] * dp
        dist.all_gather_object(parts, results, group=ps.get_data_parallel_group())
        for part in parts:
            results.update(part)
    return [results[i] for i in range(len(prompts))]


class _NoBar:
    def update(self, n=1):
        pass


class _ScaledBar:
    """Counts tokens of all DP replicas (they progress at about the same pace) on rank 0's bar."""

    def __init__(self, bar, factor: int):
        self.bar, self.factor = bar, factor

    def update(self, n: int) -> None:
        self.bar.update(n * self.factor)
