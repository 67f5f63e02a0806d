"""Knowledge-distillation losses on vocab-parallel logits (Minitron §3) and on intermediate hidden states.

Logits here are this tensor-parallel rank's vocab shard ``[..., V_padded / tp]`` (the layout megatron's output
layer produces, ``[b, s, V_padded / tp]`` in :mod:`megatron_prune.forward`). Nothing gathers the full vocabulary
on one rank: like megatron's ``vocab_parallel_cross_entropy``, every loss reduces per-token statistics (max,
sum of exponentials, partial sums) with ``all_reduce`` over the TP group. The top-K loss all-gathers only K
candidates per token and rank.

Definitions (``z_s = student / tau``, ``z_t = teacher / tau``, softmax over the real vocabulary only: padding
rows with index ``>= vocab_size`` are excluded, they get zero probability and zero gradient):

* forward KL  ``KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))``, ``p = softmax(z)``;
* reverse KL  ``KL(p_s || p_t)``;
* top-K KL    ``KL(q_t || q_s)`` where ``T`` = the teacher's global top-K token ids (by teacher logit, over the
  whole vocabulary, across TP ranks) and ``q = softmax(z[T])``: *both* distributions are renormalised over
  the K tokens (the teacher's tail mass is dropped, the student is only asked to match the teacher's
  relative preferences among its top-K tokens).

Each is returned per token (shape ``[...]``, e.g. ``[b, s]``) and multiplied by ``tau**2`` when
``tau_sq_scale=True`` (the default, as in Hinton et al. 2015): the gradient of a KL on softened logits shrinks
like ``1/tau**2``, so the factor keeps gradient magnitudes comparable across temperatures and against the CE /
intermediate-state terms. With the recommended ``tau = 1`` (Minitron) the factor is 1 and the choice is moot.

Memory: the forward and reverse KL are :class:`torch.autograd.Function` s that save a single float32 tensor of
the shard's shape (the per-element gradient direction, e.g. ``p_s - p_t``) and need at most one more such
buffer transiently (row-chunked reductions keep the other temporaries small); the backward allocates only the
gradient itself. The naive gathered version holds several full-vocabulary copies per rank.

Hidden-state losses take megatron's ``[s, b, h]`` layout (replicated across TP ranks, no sequence parallel),
map the student to the teacher's width with one shared learned ``nn.Linear(h_s, h_t, bias=False)`` and return
per-token losses ``[b, s]``, so one token mask ``[b, s]`` serves every term.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

# A finite "minus infinity" for padding columns: exp(x - max) underflows to exactly 0 and differences of two
# filled entries are exactly 0 (so no inf - inf = nan).
_NEG = -1e30
# Row chunk size for the reductions, in elements of the shard: bounds the temporaries to ~16 MiB each
# (the memory planner, runtime/memory.py, counts the temporaries with it).
KL_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------------
# tensor-parallel plumbing
# --------------------------------------------------------------------------------------------------------
def tp_group_rank_world(group):
    """(group, rank, world) of the tensor-parallel group; ``group=None`` means megatron's TP group when
    megatron's model-parallel state is initialised, otherwise a single rank (no communication)."""
    if group is None:
        from megatron.core import parallel_state as ps

        if not (dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()):
            return None, 0, 1
        group = ps.get_tensor_model_parallel_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


def tp_all_reduce(t: torch.Tensor, group, world: int, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def valid_columns(shard: int, rank: int, vocab_size: Optional[int]) -> int:
    """How many leading columns of this rank's shard are real vocabulary (the rest are padding)."""
    if vocab_size is None:
        return shard
    return max(0, min(shard, vocab_size - rank * shard))


def _shifted(logits: torch.Tensor, tau: float, n_valid: int, group, world: int):
    """float32 copy of ``logits / tau`` [rows, shard], padding filled, minus the global row max (in place)."""
    x = logits.detach().reshape(-1, logits.shape[-1]).to(torch.float32, copy=True)
    if tau != 1.0:
        x.div_(tau)
    if n_valid < x.shape[1]:
        x[:, n_valid:] = _NEG
    m = x.amax(dim=-1)
    tp_all_reduce(m, group, world, dist.ReduceOp.MAX)
    x.sub_(m.unsqueeze(-1))
    return x


def _chunks(rows: int, cols: int, chunk_rows: Optional[int]):
    step = chunk_rows or max(1, KL_CHUNK_ELEMENTS // max(1, cols))
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) of [r, n] float32 tensors, accumulated in float64: the loss is a difference of sums over
    the whole vocabulary, where a float32 reduction (torch.bmm's on CPU) is off by ~1e-4 nats at vocab 49152."""
    return (a * b).sum(-1, dtype=torch.float64)


def _check(student: torch.Tensor, teacher: torch.Tensor, tau: float):
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")


# --------------------------------------------------------------------------------------------------------
# forward / reverse KL: autograd functions that save one fp32 buffer (the gradient direction)
# --------------------------------------------------------------------------------------------------------
class _VocabParallelKL(torch.autograd.Function):
    """Per-token KL on vocab-parallel logits; ``reverse`` selects KL(p_s || p_t) instead of KL(p_t || p_s).

    d KL / d z_s is ``p_s - p_t`` (forward) or ``p_s * (log p_s - log p_t - KL)`` (reverse); it is computed in
    the forward pass (it does not depend on the upstream gradient, which is one scalar per token) and saved;
    the backward multiplies it by ``grad_out * scale / tau``.
    """

    @staticmethod
    def forward(ctx, student, teacher, tau, scale, vocab_size, group, reverse, chunk_rows):
        group, rank, world = tp_group_rank_world(group)
        lead, shard = student.shape[:-1], student.shape[-1]
        n_valid = valid_columns(shard, rank, vocab_size)
        s = _shifted(student, tau, n_valid, group, world)  # buffer 1
        t = _shifted(teacher, tau, n_valid, group, world)  # buffer 2
        rows = s.shape[0]
        # stats[0] = sum exp(s), stats[1] = sum exp(t), stats[2] = sum exp(a) (a - b) with (a, b) = (t, s)
        # for the forward KL and (s, t) for the reverse one.
        stats = s.new_empty(3, rows, dtype=torch.float64)  # the reported loss: exact sums (cheap, per row)
        for c in _chunks(rows, shard, chunk_rows):
            es, et = s[c].exp(), t[c].exp()
            stats[0, c] = es.sum(-1, dtype=torch.float64)
            stats[1, c] = et.sum(-1, dtype=torch.float64)
            stats[2, c] = _rowdot(es, s[c] - t[c]) if reverse else _rowdot(et, t[c] - s[c])
            del es, et
        tp_all_reduce(stats, group, world)
        log_zs, log_zt = stats[0].log(), stats[1].log()
        if reverse:  # KL = E_ps[s - t] - log Zs + log Zt
            kl = stats[2] / stats[0] - log_zs + log_zt
            kl, log_zs, log_zt = kl.float(), log_zs.float(), log_zt.float()
            # t <- log p_s - log p_t - KL ; s <- p_s ; grad direction = s * t
            t.sub_(s).neg_().sub_((log_zs - log_zt + kl).unsqueeze(-1))
            s.sub_(log_zs.unsqueeze(-1)).exp_().mul_(t)
        else:  # KL = E_pt[t - s] - log Zt + log Zs
            kl = stats[2] / stats[1] - log_zt + log_zs
            kl, log_zs, log_zt = kl.float(), log_zs.float(), log_zt.float()
            s.sub_(log_zs.unsqueeze(-1)).exp_()
            t.sub_(log_zt.unsqueeze(-1)).exp_()
            s.sub_(t)  # p_s - p_t
        del t
        ctx.save_for_backward(s)
        ctx.factor = scale / tau
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return (kl * scale).view(lead)

    @staticmethod
    def backward(ctx, grad_out):
        (direction,) = ctx.saved_tensors
        g = direction * (grad_out.reshape(-1, 1).to(torch.float32) * ctx.factor)
        return g.view(ctx.shape).to(ctx.dtype), None, None, None, None, None, None, None


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    *,
    vocab_size: Optional[int] = None,
    tau_sq_scale: bool = True,
    group=None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Per-token ``KL(softmax(teacher / tau) || softmax(student / tau))`` on vocab-parallel logits.

    ``student_logits``, ``teacher_logits``: this rank's shard ``[..., V_padded / tp]`` (same shape); columns
    with global index ``>= vocab_size`` are padding and ignored (``None``: no padding). Returns ``[...]``
    (e.g. ``[b, s]``) float32, times ``tau**2`` if ``tau_sq_scale``. Gradients flow to ``student_logits``
    only. ``group``: the TP process group (default: megatron's). ``chunk_rows``: rows per reduction chunk
    (default: about 4M elements per chunk).
    """
    _check(student_logits, teacher_logits, tau)
    scale = tau * tau if tau_sq_scale else 1.0
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(tau), float(scale), vocab_size,
                                  group, False, chunk_rows)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    *,
    vocab_size: Optional[int] = None,
    tau_sq_scale: bool = True,
    group=None,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Per-token ``KL(softmax(student / tau) || softmax(teacher / tau))``; arguments as :func:`forward_kl`."""
    _check(student_logits, teacher_logits, tau)
    scale = tau * tau if tau_sq_scale else 1.0
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), float(tau), float(scale), vocab_size,
                                  group, True, chunk_rows)


# --------------------------------------------------------------------------------------------------------
# top-K
# --------------------------------------------------------------------------------------------------------
class _ReduceSum(torch.autograd.Function):
    """all_reduce(SUM) over the TP group; backward is the identity (the loss is replicated on every rank)."""

    @staticmethod
    def forward(ctx, x, group, world):
        x = x.clone()
        tp_all_reduce(x, group, world)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None, None


def teacher_topk(
    teacher_logits: torch.Tensor, k: int, *, vocab_size: Optional[int] = None, group=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global top-``k`` of vocab-parallel teacher logits without gathering the vocabulary.

    Each rank takes its local top-k (real vocabulary only), the k candidates (values and global ids) of every
    rank are all-gathered, and the top-k of those ``tp * k`` is the global top-k. Returns ``(values, ids)``,
    each ``[..., k]``, identical on every TP rank, sorted by decreasing value.
    """
    group, rank, world = tp_group_rank_world(group)
    shard = teacher_logits.shape[-1]
    n_valid = valid_columns(shard, rank, vocab_size)
    total = vocab_size if vocab_size is not None else shard * world
    if not 0 < k <= total:
        raise ValueError(f"top-k needs 0 < k <= vocab size ({total}), got k={k}")
    t = teacher_logits.detach().reshape(-1, shard)
    kl = min(k, n_valid)
    vals = t.new_full((t.shape[0], k), float("-inf"), dtype=torch.float32)
    ids = torch.zeros((t.shape[0], k), dtype=torch.long, device=t.device)
    if kl > 0:
        v, i = t[:, :n_valid].topk(kl, dim=-1)
        vals[:, :kl] = v.float()
        ids[:, :kl] = i + rank * shard
    if world > 1:
        all_vals = [torch.empty_like(vals) for _ in range(world)]
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_vals, vals, group=group)
        dist.all_gather(all_ids, ids, group=group)
        vals, ids = torch.cat(all_vals, -1), torch.cat(all_ids, -1)
        vals, pick = vals.topk(k, dim=-1)
        ids = ids.gather(-1, pick)
    lead = teacher_logits.shape[:-1]
    return vals.view(*lead, k), ids.view(*lead, k)


def gather_vocab_columns(logits: torch.Tensor, ids: torch.Tensor, *, group=None) -> torch.Tensor:
    """``logits[..., ids]`` for global vocab ids ``ids [..., k]`` from vocab-parallel logits (differentiable).

    Each id lives on exactly one rank: every rank picks the ones it owns (zeros elsewhere) and an all-reduce
    sums them; the gradient goes back to the owning rank's shard only.
    """
    group, rank, world = tp_group_rank_world(group)
    shard = logits.shape[-1]
    local = ids - rank * shard
    owned = (local >= 0) & (local < shard)
    picked = logits.gather(-1, local.clamp(0, shard - 1)) * owned
    return _ReduceSum.apply(picked, group, world)


def topk_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    tau: float = 1.0,
    *,
    vocab_size: Optional[int] = None,
    tau_sq_scale: bool = True,
    group=None,
) -> torch.Tensor:
    """Per-token forward KL restricted to the teacher's global top-``k`` tokens, both sides renormalised.

    ``T`` = :func:`teacher_topk` ids; ``q_t = softmax(teacher[T] / tau)``, ``q_s = softmax(student[T] / tau)``
    (softmax over the k entries only); returns ``sum_T q_t (log q_t - log q_s)`` per token, times ``tau**2``
    if ``tau_sq_scale``. Only ``[..., k]`` tensors are communicated.
    """
    _check(student_logits, teacher_logits, tau)
    t_vals, ids = teacher_topk(teacher_logits, k, vocab_size=vocab_size, group=group)
    return topk_kl_at(student_logits, t_vals, ids, tau, tau_sq_scale=tau_sq_scale, group=group)


def topk_kl_at(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    ids: torch.Tensor,
    tau: float = 1.0,
    *,
    tau_sq_scale: bool = True,
    group=None,
) -> torch.Tensor:
    """The top-K KL of :func:`topk_kl` given the teacher's side: its values ``[..., k]`` at global vocab ids
    ``ids [..., k]``. The values may be logits or log-probabilities (any per-token shift cancels in the softmax
    over the k entries), so a file of top-K log-probabilities gives the online loss exactly (distill/offline.py).
    """
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    s_vals = gather_vocab_columns(student_logits, ids, group=group).float()
    log_qt = torch.log_softmax(teacher_values.float() / tau, dim=-1)
    log_qs = torch.log_softmax(s_vals / tau, dim=-1)
    kl = (log_qt.exp() * (log_qt - log_qs)).sum(-1)
    return kl * (tau * tau) if tau_sq_scale else kl


def kd_logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward",
    tau: float = 1.0,
    *,
    top_k: Optional[int] = None,
    vocab_size: Optional[int] = None,
    tau_sq_scale: bool = True,
    group=None,
) -> torch.Tensor:
    """Per-token logit distillation loss by name: ``kind`` in {"forward", "reverse", "topk"} (topk needs
    ``top_k``)."""
    kw = dict(vocab_size=vocab_size, tau_sq_scale=tau_sq_scale, group=group)
    if kind == "forward":
        return forward_kl(student_logits, teacher_logits, tau, **kw)
    if kind == "reverse":
        return reverse_kl(student_logits, teacher_logits, tau, **kw)
    if kind == "topk":
        if not top_k:
            raise ValueError("kind='topk' needs top_k")
        return topk_kl(student_logits, teacher_logits, top_k, tau, **kw)
    raise ValueError(f"unknown KD loss {kind!r} (forward, reverse, topk)")


# --------------------------------------------------------------------------------------------------------
# token masks
# --------------------------------------------------------------------------------------------------------
def masked_token_mean(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of ``per_token`` over tokens where ``loss_mask == 1`` (all tokens when ``None``).

    ``loss_mask`` has the same shape (e.g. ``[b, s]``); 0 marks padding. With no valid token the result is 0
    (and the gradient zero), not nan. The mean is local: with data parallelism, average over ranks as usual.
    """
    if loss_mask is None:
        return per_token.mean()
    m = loss_mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------------------
# intermediate states
# --------------------------------------------------------------------------------------------------------
def hidden_projection(student_hidden: int, teacher_hidden: int, device=None, dtype=None) -> nn.Linear:
    """The one shared learned map from student to teacher width: ``nn.Linear(h_s, h_t, bias=False)``.

    Initialised to the (truncated) identity, so at step 0 the student's first ``min(h_s, h_t)`` channels
    are compared with the teacher's (pruned students keep the teacher's most important channels, in the
    teacher's order). Replicated on every TP rank (its gradient is identical across TP ranks).
    """
    proj = nn.Linear(student_hidden, teacher_hidden, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        proj.weight.zero_()
        n = min(student_hidden, teacher_hidden)
        proj.weight[:n, :n] = torch.eye(n, device=proj.weight.device, dtype=proj.weight.dtype)
    return proj


def _project(student: torch.Tensor, teacher: torch.Tensor, proj: Optional[nn.Module]) -> torch.Tensor:
    if proj is not None:
        student = proj(student)
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden {tuple(student.shape)} (after projection) != teacher {tuple(teacher.shape)}")
    return student


def cosine_hidden_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, proj: Optional[nn.Module] = None, eps: float = 1e-8
) -> torch.Tensor:
    """Per-token ``1 - cos(proj(h_s), h_t)`` for hidden states ``[s, b, h]``; returns ``[b, s]`` float32."""
    hs = _project(student_hidden, teacher_hidden.detach(), proj).float()
    cos = torch.nn.functional.cosine_similarity(hs, teacher_hidden.detach().float(), dim=-1, eps=eps)
    return (1.0 - cos).transpose(0, 1)


def mse_hidden_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, proj: Optional[nn.Module] = None
) -> torch.Tensor:
    """Per-token ``mean_h (proj(h_s) - h_t)^2`` for hidden states ``[s, b, h]``; returns ``[b, s]`` float32."""
    hs = _project(student_hidden, teacher_hidden.detach(), proj).float()
    return (hs - teacher_hidden.detach().float()).pow(2).mean(-1).transpose(0, 1)


def intermediate_state_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    proj: Optional[nn.Module] = None,
    kind: str = "cosine",
    loss_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum over layer pairs of the masked token mean of the cosine or MSE hidden-state loss.

    ``student_states[i]`` ``[s, b, h_s]`` is matched with ``teacher_states[i]`` ``[s, b, h_t]`` (e.g. the
    embedding outputs and a few post-norm layer outputs), all through the same ``proj``.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError("need the same, non-zero number of student and teacher states")
    fn = {"cosine": cosine_hidden_loss, "mse": mse_hidden_loss}.get(kind)
    if fn is None:
        raise ValueError(f"unknown intermediate-state loss {kind!r} (cosine, mse)")
    return sum(masked_token_mean(fn(s, t, proj), loss_mask) for s, t in zip(student_states, teacher_states))


def dynamic_alpha(logits_loss: torch.Tensor, is_loss: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``alpha = L_logits / L_is``, detached (a weight, not a path for gradients); 0 when ``L_is`` is ~0."""
    l_is = is_loss.detach().float()
    ok = l_is.abs() > eps  # no host sync (a tensor condition, not a Python branch)
    return torch.where(ok, logits_loss.detach().float() / torch.where(ok, l_is, torch.ones_like(l_is)),
                       torch.zeros_like(l_is))


def combine_losses(
    logits_loss: torch.Tensor,
    clm_loss: Optional[torch.Tensor] = None,
    is_loss: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``L = L_CLM + L_logits + alpha * L_is`` with the dynamic ``alpha = L_logits / L_is`` (Minitron).

    Missing terms are left out. Returns ``(L, alpha)`` (``alpha`` is ``None`` without ``is_loss``).
    """
    total = logits_loss
    if clm_loss is not None:
        total = total + clm_loss
    alpha = None
    if is_loss is not None:
        alpha = dynamic_alpha(logits_loss, is_loss)
        total = total + alpha * is_loss
    return total, alpha


__all__ = [
    "combine_losses",
    "cosine_hidden_loss",
    "dynamic_alpha",
    "forward_kl",
    "gather_vocab_columns",
    "hidden_projection",
    "intermediate_state_loss",
    "kd_logits_loss",
    "masked_token_mean",
    "mse_hidden_loss",
    "reverse_kl",
    "teacher_topk",
    "topk_kl",
    "topk_kl_at",
]
