"""Architecture search: exact analytic counts (against built models and published sizes), the budget filter
(against a naive enumeration), and a whole resumable search on a tiny model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from distributed_utils import run_ranks


def naive_params(L, h, f, a, g, kv, V, tied, gated=True):
    """Parameter count written out by hand: embeddings, per layer (2 norms, q/k/v, o, MLP), final norm."""
    layer = 2 * h + h * (a + 2 * g) * kv + a * kv * h + (3 if gated else 2) * h * f
    return V * h * (1 if tied else 2) + L * layer + h


@pytest.mark.parametrize("name,shape,published", [
    # Minitron (Nemotron-4 family: LayerNorm, non-gated MLP, 256k vocab, untied)
    ("Minitron-8B", dict(L=32, h=4096, f=16384, a=48, g=8, kv=128, V=256000, tied=False, gated=False), 8.27e9),
    ("Minitron-4B", dict(L=32, h=3072, f=9216, a=24, g=8, kv=128, V=256000, tied=False, gated=False), 4.19e9),
    ("Llama-3.1-Minitron-4B-Width", dict(L=32, h=3072, f=9216, a=32, g=8, kv=128, V=128256, tied=False), 4.51e9),
    ("MN-Minitron-8B", dict(L=40, h=4096, f=11520, a=32, g=8, kv=128, V=131072, tied=False), 8.41e9),
])
def test_published_sizes(name, shape, published):
    from megatron_prune.arch import ModelArch

    arch = ModelArch(num_layers=shape["L"], hidden_size=shape["h"], ffn_hidden_size=shape["f"],
                     num_attention_heads=shape["a"], num_query_groups=shape["g"], kv_channels=shape["kv"],
                     vocab_size=shape["V"], tie_embeddings=shape["tied"],
                     activation="swiglu" if shape.get("gated", True) else "gelu",
                     normalization="RMSNorm" if shape.get("gated", True) else "LayerNorm")
    # LayerNorm has a bias per norm: 2 per layer + the final one, h each
    extra = 0 if shape.get("gated", True) else (2 * shape["L"] + 1) * shape["h"]
    assert arch.param_count() == naive_params(**shape) + extra
    assert abs(arch.param_count() / published - 1) < 0.005, (name, arch.param_count())


def built_counts_worker(archs):
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    return [sum(p.numel() for p in build_model(a, use_te=False).parameters()) for a in archs]


def tiny_source(**kw):
    from megatron_prune.arch import ModelArch

    cfg = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
               vocab_size=1000)
    cfg.update(kw)
    return ModelArch(**cfg)


def test_candidates_match_naive_enumeration_and_built_models():
    from megatron_prune.prune.search_space import Budget, SearchSpace, candidates, inference_memory, kv_cache_bytes

    source = tiny_source()
    space = SearchSpace(layers=[2, 3, 4], hidden=[32, 48, 64], ffn=[32, 64, 96], heads=[4, 8], query_groups=[2, 4])
    budget = Budget(params=120_000, tolerance=0.15)
    found = candidates(source, space, budget, tp=2, pp=1)
    want = set()
    for L, h, f, a, g in itertools.product([2, 3, 4], [32, 48, 64], [32, 64, 96], [4, 8], [2, 4]):
        if a % g or a // g > 2 or g % 2 or a % 2:  # heads per group <= the source's 2; TP2 divides both
            continue
        n = naive_params(L, h, f, a, g, 8, 1000, False)
        if abs(n / 120_000 - 1) <= 0.15:
            want.add((L, h, f, a, g))
    got = {(c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups) for c in found}
    assert got == want and len(got) >= 4
    # exact against the real GPTModel (whose embedding has the vocab padded to 1024)
    built = run_ranks(built_counts_worker, 1, found)[0]
    for arch, n in zip(found, built):
        assert n == arch.param_count() + 24 * arch.hidden_size * 2, arch.describe()
    # memory: weights + K and V of every layer and token, in the given dtype
    a = found[0]
    assert kv_cache_bytes(a, 128, 2, "bf16") == 2 * a.num_layers * a.num_query_groups * 8 * 128 * 2 * 2
    mem = Budget(memory_bytes=inference_memory(a, 128, 2), memory_seq_len=128, memory_batch=2, tolerance=0.01)
    assert a in candidates(source, space, mem, tp=2)


def test_budget_errors():
    from megatron_prune.arch import ArchError
    from megatron_prune.prune.search_space import Budget, parse_count

    with pytest.raises(ArchError, match="at least one constraint"):
        Budget()
    with pytest.raises(ArchError, match="cannot read 'lots'"):
        parse_count("lots")
    assert parse_count("4.5B") == 4.5e9 and parse_count("90m") == 9e7


@pytest.fixture(scope="module")
def search_setup(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama as a checkpoint, its importance scores and random-token train/valid data."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("search")
    run_ranks(_convert_and_score, 1, tiny_llama_dir, root)
    rng = np.random.default_rng(0)
    for split, docs in (("train", 40), ("valid", 12)):
        builder = IndexedDatasetBuilder(str(root / f"{split}.bin"), dtype=np.int32)
        for _ in range(docs):
            builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=40, dtype=np.int32)), [40])
        builder.finalize(str(root / f"{split}.idx"))
    return root


def _convert_and_score(hf_dir, root):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.importance import compute_importance
    from megatron_prune.pipelines.convert import hf_to_megatron
    from megatron_prune.runtime import init_distributed

    hf_to_megatron(hf_dir, root / "teacher")
    init_distributed(1, 1)
    model, meta = load_model(root / "teacher", use_te=False)
    tokens = torch.randint(0, 1000, (8, 16), generator=torch.Generator().manual_seed(0))
    compute_importance(model, meta.arch, tokens, 4, desc=None).save(root / "teacher.scores")


def _search(root, out, **kw):
    from megatron_prune.pipelines.search import DistillSettings, search
    from megatron_prune.prune.search_space import Budget, SearchSpace

    args = dict(space=SearchSpace(hidden=[48, 64], ffn=[64, 96], heads=[4, 8]), top_k=2, eval_seq_len=16,
                eval_windows=8, micro_batch_size=4)
    args.update(kw)
    return search(str(root / "teacher"), str(root / "teacher.scores"), str(out), Budget(params=200_000, tolerance=0.2),
                  str(root / "valid"), DistillSettings(data=[str(root / "train")], steps=2, seq_len=16,
                                                        micro_batch_size=2, global_batch_size=4, lr=1e-3), **args)


def _search_one_candidate(root, out, candidate):
    return _search(root, out, stage="distill", candidate=candidate, top_k=3)


def _eval_pruned(root, target, out):
    from megatron_prune.pipelines.eval import evaluate_checkpoint
    from megatron_prune.pipelines.prune import prune

    prune(str(root / "teacher"), out, scores=str(root / "teacher.scores"), target=target)
    return evaluate_checkpoint(out, root / "valid", seq_len=16, micro_batch_size=4, max_sequences=8).lm_loss


def test_search_ranks_distills_resumes_and_runs_one_candidate(search_setup, tmp_path):
    root, out = search_setup, tmp_path / "search"
    (res,) = run_ranks(_search, 1, root, out)
    rows = {r["name"]: r for r in res["rows"]}
    assert len(rows) >= 3 and all(r["zero_shot_loss"] is not None for r in rows.values())
    distilled = [r for r in rows.values() if r["distilled_loss"] is not None]
    assert sorted(r["zero_shot_rank"] for r in distilled) == [1, 2]  # the zero-shot top 2 were distilled
    assert res["winner"] == min(distilled, key=lambda r: r["distilled_loss"])["name"]
    for f in ("report.md", "report.csv", "report.png", "search.json"):
        assert (out / f).is_file(), f
    # the in-memory zero-shot loss equals pruning to a checkpoint and evaluating it (the user's path)
    best = min(rows.values(), key=lambda r: r["zero_shot_loss"])
    (loss,) = run_ranks(_eval_pruned, 1, root, best["target"], tmp_path / "check")
    assert abs(loss - best["zero_shot_loss"]) <= 1e-5 * loss

    # resumable: a second run redoes nothing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name not in ("search.json",)}
    (again,) = run_ranks(_search, 1, root, out)
    assert again["rows"] == res["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # a job-array task: only the candidate of zero-shot rank 3 (index 2) is distilled
    (one,) = run_ranks(_search_one_candidate, 1, root, out, 2)
    third = next(r for r in one["rows"] if r["zero_shot_rank"] == 3)
    assert third["distilled_loss"] is not None and (out / "candidates" / third["name"] / "result.json").is_file()
    assert json.loads((out / "search.json").read_text())["top_k"] == 3
