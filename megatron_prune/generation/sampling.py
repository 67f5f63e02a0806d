"""Choosing the next token from full-vocab logits: greedy, temperature, top-k, top-p, per-prompt seeds.

Every prompt draws from its own generator, seeded from (seed, prompt index): a sample depends only on the
prompt and the model's logits, not on batch size, batch composition, data parallelism or TP/PP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    seed: int = 0
    max_new_tokens: int = 128

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature (--temperature) must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p (--top-p) must be in (0, 1], got {self.top_p}; 1 keeps every token")
        if self.top_k < 0:
            raise ValueError(f"top_k (--top-k) must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled float32 logits [b, V] with the tokens outside top-k / top-p set to -inf.

    Order as in Hugging Face: temperature, then top-k, then top-p. The most likely token is always kept.
    """
    logits = logits.float() / max(params.temperature, 1e-6) if not params.greedy else logits.float()
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [b, V] a token is drawn from (one-hot on the argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filter_logits(logits, params).softmax(-1)


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of prompt ``index`` (the same on every rank and layout)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` [b, V] by inverse CDF with one uniform from each row's generator."""
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    cdf = probs.double().cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # u * total can round up to the total: take the last token of non-zero probability then
    last_nonzero = (probs > 0).long().cumsum(-1).argmax(-1)
    return torch.where(idx >= probs.shape[-1], last_nonzero, idx)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token ids [b] from full-vocab logits [b, V]."""
    if params.greedy:
        return logits.argmax(-1)
    return draw(sampling_probs(logits, params), generators)
