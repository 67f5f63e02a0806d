"""Speculative decoding: greedy output == the target's greedy output for several k (TP1 and PP2); the
rejection sampler's output distribution == p on toy distributions (naive frequencies in the test)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_model
from distributed_utils import run_ranks

NEW = 10


def _convert(pairs):
    from megatron_prune.pipelines.convert import hf_to_megatron

    for hf_dir, out in pairs:
        hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def target_and_draft(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("specdec")
    draft_hf = make_hf_model(d / "draft_hf", num_hidden_layers=2)  # same vocab, another (smaller) model
    run_ranks(_convert, 1, [(tiny_llama_dir, d / "target"), (draft_hf, d / "draft")])
    return d / "target", d / "draft"


def _prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (1, 7)]


def _run(target_ckpt, draft_ckpt, tp, pp):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.generation.speculative import speculative_generate
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp)
    target, tmeta = load_model(target_ckpt, use_te=False)
    draft, dmeta = load_model(draft_ckpt, use_te=False)
    params = SamplingParams(max_new_tokens=NEW)
    out = {"target": generate(target, tmeta.arch, _prompts(), params, batch_size=4, desc=None)}
    stop = out["target"][1][4]
    out["target_stop"] = generate(target, tmeta.arch, _prompts(), params, stop_token_ids=[stop], desc=None)
    for k in (1, 3):
        out[k] = [speculative_generate(target, tmeta.arch, draft, dmeta.arch, p, k, params, index=i)[0]
                  for i, p in enumerate(_prompts())]
    out["self_draft"] = [speculative_generate(target, tmeta.arch, target, tmeta.arch, p, 3, params)[1].acceptance_rate
                         for p in _prompts()]
    out["stop"] = [speculative_generate(target, tmeta.arch, draft, dmeta.arch, p, 3, params, [stop])[0]
                   for p in _prompts()]
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=3, max_new_tokens=NEW)
    out["sampled"] = [speculative_generate(target, tmeta.arch, draft, dmeta.arch, p, 2, sampled, index=i)[0]
                      for i, p in enumerate(_prompts())]
    return out


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 1), (1, 2, 2)])
def test_greedy_specdec_equals_target(target_and_draft, tp, pp, world):
    ranks = run_ranks(_run, world, *target_and_draft, tp, pp)
    r = ranks[0]
    assert all(x == r for x in ranks[1:])
    assert all(len(o) == NEW for o in r["target"])
    for k in (1, 3):
        assert r[k] == r["target"], f"k={k}"
    assert r["stop"] == r["target_stop"]
    assert r["self_draft"] == [1.0, 1.0]  # the target as its own draft: every draft token is accepted
    assert all(len(o) == NEW for o in r["sampled"]) and r["sampled"] != r["target"]


# ---- the rejection sampler against naive frequencies ----------------------------------------------------------
def _first_token_frequencies(p, q, k, n, seed=0):
    """Run draft-then-verify n times on context-free toy distributions; frequencies of the first emitted token."""
    from megatron_prune.generation.sampling import draw
    from megatron_prune.generation.speculative import verify

    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[-1], dtype=torch.float64)
    for _ in range(n):
        drafts = torch.cat([draw(q[j: j + 1], [g]) for j in range(k)])
        m, t = verify(p, q, drafts, g, greedy=False)
        first = int(drafts[0]) if m > 0 else t
        counts[first] += 1
    return counts / n


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_output_is_p(k):
    p = torch.tensor([[0.1, 0.4, 0.0, 0.3, 0.2]] * (k + 1), dtype=torch.float64)
    q = torch.tensor([[0.3, 0.1, 0.3, 0.1, 0.2]] * k, dtype=torch.float64)
    n = 6000
    freq = _first_token_frequencies(p, q, k, n)
    sd = (p[0] * (1 - p[0]) / n).sqrt()
    assert freq[2] == 0  # a token the target never samples is never emitted
    assert ((freq - p[0]).abs() <= 4 * sd + 1e-12).all(), (freq, p[0])
    # without the correction (emit the draft token always) the frequencies would be q: clearly different
    assert (q[0] - p[0]).abs().max() > 8 * sd.max()


def test_bonus_token_drawn_from_p():
    """When q == p every draft is accepted and the extra token comes from p's last row."""
    from megatron_prune.generation.speculative import verify

    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]] * 2, dtype=torch.float64)
    last = torch.tensor([0.7, 0.0, 0.1, 0.2], dtype=torch.float64)
    p = torch.cat([q, last[None]])
    g = torch.Generator().manual_seed(1)
    n, counts = 4000, torch.zeros(4, dtype=torch.float64)
    for _ in range(n):
        m, t = verify(p, q, torch.tensor([0, 3]), g, greedy=False)
        assert m == 2
        counts[t] += 1
    sd = (last * (1 - last) / n).sqrt()
    assert ((counts / n - last).abs() <= 4 * sd + 1e-12).all()


def test_greedy_verify_matches_naive():
    from megatron_prune.generation.speculative import verify

    p = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).softmax(-1)
    arg = p.argmax(-1)
    for drafts in ([int(arg[0]), int(arg[1]), int(arg[2])], [int(arg[0]), (int(arg[1]) + 1) % 6, 0],
                   [(int(arg[0]) + 1) % 6, 0, 0]):
        m = 0  # naive: count matching argmaxes, then the target's token
        while m < 3 and drafts[m] == int(arg[m]):
            m += 1
        assert verify(p, None, torch.tensor(drafts), None, greedy=True) == (m, int(arg[m]))
