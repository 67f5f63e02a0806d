"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward pass.

Greedy acceptance keeps the longest prefix of the draft that equals the target's argmax and then adds the
target's own token, so the output is exactly the target's greedy output. Sampling uses the standard
rejection rule (Leviathan et al.; Chen et al.): accept draft token x with probability min(1, p(x)/q(x)); on
the first rejection draw from normalize(max(0, p - q)); when all k are accepted draw one more from p. The
output is then distributed exactly as sampling from the target alone (p, q: the filtered sampling
distributions of target and draft). One sequence at a time; both models are on the same TP/PP ranks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from megatron_prune.arch import ModelArch
from megatron_prune.generation.engine import (
    BatchRunner,
    check_model_for_generation,
    is_last_stage,
    share_from_last_stage,
)
from megatron_prune.generation.sampling import SamplingParams, draw, prompt_generator, sampling_probs


def verify(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: Optional[torch.Generator],
           greedy: bool) -> tuple[int, int]:
    """Accepted draft count m and the token that follows them.

    ``p`` [k+1, V]: the target's distributions after the context and after each draft token; ``q`` [k, V]:
    the draft's distributions the ``drafts`` [k] were drawn from.
    """
    k = len(drafts)
    if greedy:
        target = p.argmax(-1)
        m = 0
        while m < k and int(drafts[m]) == int(target[m]):
            m += 1
        return m, int(target[m])
    for j in range(k):
        x = int(drafts[j])
        u = torch.rand((), generator=generator, dtype=torch.float64)
        if u * q[j, x] < p[j, x]:  # u < p/q without dividing by zero
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        if residual.sum() <= 0:  # p == q up to rounding: the rejection had probability ~0
            residual = p[j]
        return j, int(draw((residual / residual.sum()).unsqueeze(0), [generator])[0])
    return k, int(draw(p[k].unsqueeze(0), [generator])[0])


@dataclass
class SpecStats:
    k: int
    target_steps: int = 0  # target forward passes after the prompt
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    per_step_accepted: list = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per target forward (accepted drafts + the target's own token)."""
        return self.new_tokens / max(self.target_steps, 1)

    def add(self, other: "SpecStats") -> None:
        for f in ("target_steps", "drafted", "accepted", "new_tokens", "seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.per_step_accepted += other.per_step_accepted

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "per_step_accepted"}
        d.update(acceptance_rate=self.acceptance_rate, mean_accepted_length=self.mean_accepted_length,
                 tokens_per_s=self.new_tokens / max(self.seconds, 1e-9))
        return d


@torch.no_grad()
def speculative_generate(target: torch.nn.Module, target_arch: ModelArch, draft: torch.nn.Module,
                         draft_arch: ModelArch, prompt: Sequence[int], k: int, params: SamplingParams,
                         stop_token_ids: Sequence[int] = (), index: int = 0) -> tuple[list[int], SpecStats]:
    """New tokens for one prompt (stop token included, as in :func:`generate`) and the statistics."""
    if k < 1:
        raise ValueError(f"k (draft tokens per step) must be >= 1, got {k}")
    if draft_arch.vocab_size != target_arch.vocab_size:
        raise ValueError(f"draft vocab ({draft_arch.vocab_size}) differs from the target's ({target_arch.vocab_size}); "
                         "the draft must share the target's tokenizer")
    check_model_for_generation(target)
    check_model_for_generation(draft)
    target.eval()
    draft.eval()
    start = time.time()
    stats = SpecStats(k=k)
    size = len(prompt) + params.max_new_tokens + k + 1
    tgt = BatchRunner(target, target_arch, 1, size)
    dft = BatchRunner(draft, draft_arch, 1, size)
    generator = prompt_generator(params.seed, index)
    last = is_last_stage()
    seq, new, stops = list(prompt), [], set(int(s) for s in stop_token_ids)
    if len(seq) > 1:  # invariant: both caches hold a prefix of seq, and at least its last token is pending
        tgt.feed(torch.tensor([seq[:-1]]))
        dft.feed(torch.tensor([seq[:-1]]))
    while len(new) < params.max_new_tokens:
        kk = min(k, params.max_new_tokens - len(new) - 1)  # drafts beyond the budget would be wasted
        drafts, qs = [], []
        logits = dft.feed(torch.tensor([seq[dft.length:]]))
        for j in range(kk):
            tok = torch.zeros(1, dtype=torch.long)
            if last:
                q = sampling_probs(logits, params)
                qs.append(q[0])
                tok = q.argmax(-1) if params.greedy else draw(q, [generator])
            tok = int(share_from_last_stage(tok.to(dft.device))[0])
            drafts.append(tok)
            if j < kk - 1:
                logits = dft.feed(torch.tensor([[tok]]))
        p_logits = tgt.feed(torch.tensor([seq[tgt.length:] + drafts]), last_only=False)
        decision = torch.zeros(2, dtype=torch.long)
        if last:
            p = sampling_probs(p_logits[0, -(kk + 1):], params)
            q = torch.stack(qs) if qs else p.new_zeros(0, p.shape[-1])
            decision = torch.tensor(verify(p, q, torch.tensor(drafts, dtype=torch.long), generator, params.greedy))
        m, t = share_from_last_stage(decision.to(tgt.device)).tolist()
        stats.target_steps += 1
        stats.drafted += kk
        stats.accepted += m
        stats.per_step_accepted.append(m)
        for tok in drafts[:m] + [t]:
            seq.append(tok)
            new.append(tok)
            if tok in stops or len(new) == params.max_new_tokens:
                break
        if new[-1] in stops:
            break
        tgt.truncate(len(seq) - 1)
        dft.truncate(min(dft.length, len(seq) - 1))
    stats.new_tokens = len(new)
    stats.seconds = time.time() - start
    return new, stats


@torch.no_grad()
def target_alone(target: torch.nn.Module, arch: ModelArch, prompt: Sequence[int], params: SamplingParams,
                 stop_token_ids: Sequence[int] = (), index: int = 0) -> tuple[list[int], float]:
    """The target's own generation of one prompt (the baseline of the speed-up) and its seconds."""
    from megatron_prune.generation.engine import generate_batch

    start = time.time()
    out = generate_batch(target, arch, [list(prompt)], [index], params, stop_token_ids)[0]
    return out, time.time() - start
