"""`eval`: LM loss equals a naive cross entropy on transformers' logits, at every layout."""

from __future__ import annotations

import math

import pytest
import torch
from distributed_utils import run_ranks


def _eval(ckpt, windows, tp, pp):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp)
    model, meta = load_model(ckpt)
    return lm_loss(model, meta.arch, windows, micro_batch_size=2, desc=None).to_dict()


def _convert(hf_dir, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ckpt"
    run_ranks(_convert, 1, tiny_llama_dir, out)
    return out


@pytest.mark.parametrize("tp,pp,world,n", [(1, 1, 1, 8), (2, 1, 2, 8), (1, 2, 2, 8), (1, 1, 2, 8), (1, 2, 2, 7)])
def test_lm_loss_matches_naive_cross_entropy(tiny_llama_dir, tiny_ckpt, tp, pp, world, n):
    """n=7 with micro-batches of 2: the last, shorter micro-batch counts too."""
    import transformers

    windows = torch.randint(0, 1000, (n, 17), generator=torch.Generator().manual_seed(3))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    # naive reference: log-softmax over the true vocab, mean negative log-likelihood of the next token
    logp = logits.log_softmax(-1).gather(-1, windows[:, 1:, None]).squeeze(-1)
    ref = -logp.mean().item()
    results = run_ranks(_eval, world, tiny_ckpt, windows, tp, pp)
    for r in results:  # every rank reports the same figure (DP ranks split the windows)
        assert r["lm_loss"] == pytest.approx(ref, abs=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
        assert r["tokens"] == n * 16
