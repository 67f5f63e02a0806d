"""Generation: KV cache == full recompute, == transformers' greedy generate, left padding == alone, sampling
reproducible and the same at every layout, top-k/top-p masks == naive code."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from distributed_utils import run_ranks

NEW = 8


def _convert(hf_dir, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ckpt"
    run_ranks(_convert, 1, tiny_llama_dir, out)
    return out


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (6, 11, 2, 8, 5)]


SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, seed=7, max_new_tokens=NEW)


def _generate_layouts(ckpt, prompts):
    """Two ranks, one process group for all layouts (spawning is the slow part): DP2 (TP1 replicas) with every
    variant, then TP2 and PP2 with the KV cache, without it, and sampled."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    greedy = SamplingParams(max_new_tokens=NEW)
    results = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        init_distributed(tp, pp)
        model, meta = load_model(ckpt, use_te=False)
        run = partial(generate, model, meta.arch, prompts, desc=None)  # run(params, **kw)
        plain_before = _plain_forward(model, prompts)
        r = {"megatron_attention": run(greedy, batch_size=4, fast_attention=False),
             "cache": run(greedy, batch_size=4), "no_cache": run(greedy, batch_size=4, use_cache=False),
             "sampled": run(SamplingParams(**SAMPLED), batch_size=4)}
        plain_after = _plain_forward(model, prompts)  # the model now has fast_layers.py's classes
        fast, ref = (_step_logits(model, meta.arch, prompts, f) for f in (True, False))
        flags = torch.tensor([float(plain_before is None or torch.equal(plain_before, plain_after)),
                              float(ref is None or torch.allclose(fast, ref, atol=1e-4, rtol=1e-4))])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)  # the same verdict on every rank
        r["plain_forward_unchanged"], r["step_logits_close"] = bool(flags[0]), bool(flags[1])
        if (tp, pp) == (1, 1):
            stop = r["cache"][0][2]
            r.update({
                "alone": run(greedy, batch_size=1),
                "sampled_again": run(SamplingParams(**SAMPLED), batch_size=1),
                "sampled_no_cache": run(SamplingParams(**SAMPLED), batch_size=4, use_cache=False),
                "other_seed": run(SamplingParams(**{**SAMPLED, "seed": 8}), batch_size=4),
                "top_k_1": run(SamplingParams(temperature=1.0, top_k=1, max_new_tokens=NEW), batch_size=4),
                "stop": stop,
                "stopped": run(greedy, batch_size=4, stop_token_ids=[stop], pad_token_id=5),
            })
        results[(tp, pp)] = r
    return results


def _plain_forward(model, prompts):
    """Logits of a forward without a KV cache, outside inference_mode (training and scoring take this path):
    megatron's own forward in every module, before and after generation swapped their classes."""
    from megatron_prune.generation.engine import pipeline_forward

    tokens = torch.tensor([p[:2] for p in prompts])
    causal = torch.triu(torch.ones(2, 2, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        return pipeline_forward(model, tokens, causal)  # None on stages before the last


def _step_logits(model, arch, prompts, fast: bool):
    """Prefill of a left-padded batch, then 3 decode steps with fixed tokens: the logits of each forward."""
    from megatron_prune.generation import BatchRunner

    b, longest = len(prompts), max(map(len, prompts))
    runner = BatchRunner(model, arch, b, longest + 3, fast_attention=fast)
    tokens, keep = torch.zeros(b, longest, dtype=torch.long), torch.zeros(b, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):], keep[i, longest - len(p):] = torch.tensor(p), True
    out = [runner.feed(tokens, keep)]
    for t in (7, 11, 13):
        out.append(runner.feed(torch.full((b, 1), t)))
    return None if out[0] is None else torch.stack(out)


def _hf_greedy(hf_dir, prompts, new=NEW, eos=None):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = 0
    out = []
    for p in prompts:  # one at a time: no padding in the reference
        ids = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def layouts(tiny_ckpt):
    ranks = run_ranks(_generate_layouts, 2, tiny_ckpt, _prompts())
    assert ranks[0] == ranks[1]  # the same result on every rank
    return ranks[0]


def test_tp1_cache_padding_and_transformers(tiny_llama_dir, layouts):
    r = layouts[(1, 1)]
    ref = _hf_greedy(tiny_llama_dir, _prompts())
    assert r["cache"] == ref
    assert r["no_cache"] == ref
    assert r["alone"] == ref  # the left-padded batch equals each prompt alone
    assert all(len(o) == NEW for o in r["cache"])


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_fast_layers_equal_megatron_attention(layouts, tp, pp):
    """generation/fast_layers.py (own KV cache, SDPA with GQA, lean linears) against megatron's own attention and
    KV cache: the same greedy tokens, the same logits at every step (prefill of a left-padded batch and decode),
    and a forward without a cache is bit for bit what it was before the classes were swapped."""
    r = layouts[(tp, pp)]
    assert r["cache"] == r["megatron_attention"]
    assert r["plain_forward_unchanged"]
    assert r["step_logits_close"]


def test_sampling_reproducible(layouts):
    r = layouts[(1, 1)]
    assert r["sampled"] == r["sampled_again"]  # same seed, other batch size: same tokens
    assert r["sampled"] == r["sampled_no_cache"]
    assert r["sampled"] != r["other_seed"]
    assert r["sampled"] != r["cache"]
    assert r["top_k_1"] == r["cache"]  # top-k=1 sampling is greedy


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_layouts_match_tp1(layouts, tp, pp):
    """TP2 and PP2: greedy (cached and not) and seeded sampling equal TP1."""
    r, ref = layouts[(tp, pp)], layouts[(1, 1)]
    assert r["cache"] == ref["cache"]
    assert r["no_cache"] == ref["cache"]
    assert r["sampled"] == ref["sampled"]


def test_stop_token(layouts):
    r = layouts[(1, 1)]
    for g, f in zip(r["stopped"], r["cache"]):  # each sequence is cut after its first stop token, which is kept
        cut = f.index(r["stop"]) + 1 if r["stop"] in f else len(f)
        assert g == f[:cut]
    assert len(r["stopped"][0]) <= 3


# ---- the real SmolLM2 against transformers --------------------------------------------------------------------
SMOL_NEW = 24
SMOL_QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
                  "Give me three tips for learning Python, briefly."]


def _smol_prompts(hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in SMOL_QUESTIONS]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _smol_generate(ckpt, prompts):
    """Greedy, KV-cached: TP1 replicas splitting a left-padded batch (DP2), then PP2 (15 layers per stage)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    out = {}
    for tp, pp in [(1, 1), (1, 2)]:
        init_distributed(tp, pp)
        model, meta = load_model(ckpt, use_te=False)
        out[(tp, pp)] = generate(model, meta.arch, prompts, SamplingParams(max_new_tokens=SMOL_NEW), batch_size=3,
                                 desc=None)
        del model
    return out


def test_smollm2_greedy_equals_transformers_generate(smol_hf_dir, smol_ckpt):
    """The converted SmolLM2-135M-Instruct, greedy through its chat template, equals transformers' generate token
    for token at TP1 (left-padded batch, DP2) and at PP2. No stop token, so every sequence runs SMOL_NEW tokens."""
    prompts = _smol_prompts(smol_hf_dir)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is left-padded
    ranks = run_ranks(_smol_generate, 2, smol_ckpt, prompts)
    assert ranks[0] == ranks[1]
    ref = _hf_greedy(smol_hf_dir, prompts, new=SMOL_NEW)
    assert ranks[0][(1, 1)] == ref
    assert ranks[0][(1, 2)] == ref


# ---- sampling math against naive code -----------------------------------------------------------------------
def _naive_filter(logits, temperature, top_k, top_p):
    out = []
    for row in logits.tolist():
        row = [x / temperature for x in row]
        order = sorted(range(len(row)), key=lambda i: -row[i])
        keep = set(order[:top_k]) if top_k else set(order)
        kept = [i for i in order if i in keep]
        z = [row[i] for i in kept]
        m = max(z)
        e = [pow(2.718281828459045, x - m) for x in z]
        probs = [x / sum(e) for x in e]
        final, mass = set(), 0.0
        for i, p in zip(kept, probs):
            if mass >= top_p:
                break
            final.add(i)
            mass += p
        out.append([row[i] if i in final else float("-inf") for i in range(len(row))])
    return torch.tensor(out)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.5), (3, 0.99)])
def test_filter_logits_matches_naive(top_k, top_p):
    from megatron_prune.generation import SamplingParams, filter_logits

    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(top_k))
    got = filter_logits(logits, SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p))
    ref = _naive_filter(logits.double(), 0.7, top_k, top_p).float()
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(got[finite], ref[finite], atol=1e-5)


def test_draw_follows_distribution():
    from megatron_prune.generation.sampling import draw, prompt_generator

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3]])
    g = prompt_generator(3, 0)
    n = 4000
    counts = torch.bincount(torch.cat([draw(probs, [g]) for _ in range(n)]), minlength=4).double()
    assert counts[1] == 0
    # within 4 standard deviations of the binomial expectation
    sd = (n * probs[0].double() * (1 - probs[0].double())).sqrt()
    assert ((counts - n * probs[0].double()).abs() <= 4 * sd + 1e-9).all()


def _greedy(ckpt, prompts, batch_size):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, meta = load_model(ckpt, use_te=False)
    return generate(model, meta.arch, prompts, SamplingParams(max_new_tokens=NEW), batch_size=batch_size, desc=None)


def test_qkv_biases_generate_as_transformers(tmp_path):
    """Qwen2 (q/k/v biases, which the generation path's QKV linear adds itself) and Qwen3 (q/k norms): the greedy
    tokens of a left-padded batch and of one prompt at a time (no mask: no pads) equal transformers'."""
    from conftest import make_hf_model

    for family in ("qwen2", "qwen3"):
        hf = make_hf_model(tmp_path / family, family, **({"head_dim": 16} if family == "qwen3" else {}))
        run_ranks(_convert, 1, hf, tmp_path / f"{family}_ckpt")
        ref = _hf_greedy(hf, _prompts())
        for batch in (4, 1):
            assert run_ranks(_greedy, 1, tmp_path / f"{family}_ckpt", _prompts(), batch)[0] == ref, (family, batch)
