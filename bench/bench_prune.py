"""Pruning a sharded checkpoint vs plainly loading and saving it, and peak memory per rank vs its shard (issue 3).

    python bench/bench_prune.py            # ~490M-parameter fp32 Llama-shaped model (~1.8 GiB), TP1 and TP2
    python bench/bench_prune.py --quick    # small model, quick run

1. A random model is saved as a Megatron distributed checkpoint at TP2 (2 ranks).
2. A plan from random importance scores (make_plan): FFN halved, hidden size -25%, a quarter of the layers
   dropped (block influence).
3. For each layout (TP1: 1 rank, TP2: 2 ranks), interleaved repetitions of
   (a) prune:     megatron_prune.prune.checkpoint.prune_checkpoint(src, plan, out)
   (b) load+save: megatron_prune.checkpoint.load_model(src) then save_checkpoint(model, ...)
   each in freshly spawned ranks, so every measurement starts from the same clean process.

Memory: per rank, the peak resident set (VmHWM from /proc/self/status) during the step, minus the RSS
measured just before it (after imports and distributed init, before any model exists). The peak is reset
right before the step with ``echo 5 > /proc/self/clear_refs``, so it is an exact kernel high-water mark
(no sampling thread that could miss a short spike). It counts the rank process itself: megatron's
checkpoint writer forks helper processes that share the rank's pages copy-on-write and write them to disk;
their own extra memory is not included. "shard" is the bytes of that rank's parameters of the source model
(its TP shard), counted on the loaded model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import gb, median, peak_rss_bytes, reset_peak_rss, rss_bytes, run_ranks, synced_time  # noqa: E402

FULL = dict(arch=dict(num_layers=8, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=16, num_query_groups=4,
                      vocab_size=32000), reps=2)
QUICK = dict(arch=dict(num_layers=4, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8, num_query_groups=4,
                       vocab_size=8000), reps=1)


def _make_source(arch_dict: dict, out: str) -> None:
    import torch

    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint import save_checkpoint
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(tp=2, pp=1, seed=0)
    arch = ModelArch(**arch_dict)
    model = build_model(arch, dtype=torch.float32, use_te=False)
    save_checkpoint(model, arch, out)


def _random_plan(arch):
    import torch

    from megatron_prune.importance import ImportanceScores
    from megatron_prune.prune import PruneTarget, make_plan

    g = torch.Generator().manual_seed(0)
    L = arch.num_layers
    scores = ImportanceScores(
        arch=arch.to_dict(), seq_agg="mean", batch_agg="l2", num_samples=1, seq_len=1,
        mlp=torch.rand(L, arch.ffn_hidden_size, generator=g),
        heads=torch.rand(L, arch.num_attention_heads, generator=g),
        query_groups=torch.rand(L, arch.num_query_groups, generator=g),
        embedding=torch.rand(arch.hidden_size, generator=g),
        embedding_layers=torch.rand(L, 2, arch.hidden_size, generator=g), block_influence=torch.rand(L, generator=g),
        angle_matrix=torch.zeros(L + 1, L + 1), angular={})
    target = PruneTarget(hidden_size=arch.hidden_size * 3 // 4, ffn_hidden_size=arch.ffn_hidden_size // 2,
                         num_layers=L - L // 4, depth_metric="block_influence")
    return make_plan(scores, arch, target)


def _step(kind: str, tp: int, src: str, plan, out: str) -> dict:
    from megatron_prune.runtime import init_distributed

    init_distributed(tp=tp, pp=1, seed=0)
    from megatron_prune.checkpoint import load_model, save_checkpoint
    from megatron_prune.prune.checkpoint import prune_checkpoint

    info: dict = {}

    def prune():
        prune_checkpoint(src, plan, out)

    def load_save():
        model, meta = load_model(src, use_te=False)
        info["shard_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        info["after_load"] = rss_bytes()
        save_checkpoint(model, meta.arch, out)

    import gc

    gc.collect()
    base = rss_bytes()
    info["reset_ok"] = reset_peak_rss()
    dt, _ = synced_time(prune if kind == "prune" else load_save)
    info.update(seconds=dt, base=base, peak=peak_rss_bytes() - base)
    if "after_load" in info:
        info["after_load"] -= base
    return info


def _breakdown(tp: int, src: str, plan) -> dict:
    """prune_checkpoint's steps one by one (same calls), with the RSS above baseline after each."""
    import gc
    import time

    from megatron_prune.runtime import init_distributed

    init_distributed(tp=tp, pp=1, seed=0)
    from megatron_prune.checkpoint import load_into, read_meta
    from megatron_prune.model import build_model
    from megatron_prune.prune import fill_pruned, source_tensors

    gc.collect()
    base = rss_bytes()
    reset_peak_rss()
    rows = []

    def mark(name, t0):
        rows.append((name, time.perf_counter() - t0, rss_bytes() - base, peak_rss_bytes() - base))

    t0 = time.perf_counter()
    meta = read_meta(src)
    model = build_model(meta.arch, use_te=False, perform_initialization=False)
    mark("build source model (no init: weights come next)", t0)
    t0 = time.perf_counter()
    load_into(model, src, meta.arch)
    mark("load_into (dist_checkpointing.load)", t0)
    t0 = time.perf_counter()
    source = source_tensors(model, plan)
    mark("source_tensors (in place at PP=1)", t0)
    t0 = time.perf_counter()
    target = build_model(plan.target_arch, use_te=False, perform_initialization=False)
    fill_pruned(target, source, plan)
    mark("build target + fill_pruned", t0)
    del source, model
    gc.collect()
    t0 = time.perf_counter()
    mark("free source", t0)
    return {"rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, quick run")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="layouts to measure (default: 1 2)")
    ap.add_argument("--reps", type=int, help="repetitions of each step per layout")
    ap.add_argument("--workdir", help="where to write checkpoints (default: a temporary directory)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-step memory breakdown at TP2")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    reps = args.reps or cfg["reps"]

    from megatron_prune.arch import ModelArch

    arch = ModelArch(**cfg["arch"])
    plan = _random_plan(arch)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_prune_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src_tp2"
    try:
        print(f"source: {arch.describe()}; {arch.param_count() / 1e6:.0f}M params fp32 "
              f"({gb(arch.param_count() * 4)} GiB), saved at TP2")
        print(f"target: {plan.target_arch.describe()}; {plan.target_arch.param_count() / 1e6:.0f}M params "
              f"(kept layers {plan.kept_layers})")
        print(f"{reps} interleaved repetition(s) per layout, each step in fresh ranks; "
              f"{os.cpu_count()} CPU cores split over the ranks", flush=True)
        if src.exists():
            shutil.rmtree(src)
        run_ranks(_make_source, 2, cfg["arch"], str(src))
        results = {}
        for tp in args.tp:
            res = {"prune": [], "load+save": []}
            for r in range(reps):
                for kind in (("prune", "load+save") if r % 2 == 0 else ("load+save", "prune")):
                    out = work / f"out_{kind.replace('+', '_')}_tp{tp}"
                    res[kind].append(run_ranks(_step, tp, "prune" if kind == "prune" else "load", tp, str(src), plan,
                                               str(out)))
                    shutil.rmtree(out, ignore_errors=True)
                print(f"  TP{tp} rep {r + 1}: prune {res['prune'][-1][0]['seconds']:.1f}s, "
                      f"load+save {res['load+save'][-1][0]['seconds']:.1f}s", flush=True)
            results[tp] = res
        breakdown = None
        if not args.no_breakdown and 2 in args.tp:
            breakdown = run_ranks(_breakdown, 2, 2, str(src), plan)

        print()
        print("Time (s, median over repetitions; max over ranks within a run)")
        print()
        print("| layout | prune_checkpoint | load_model + save_checkpoint | ratio prune / load+save |")
        print("|---|---|---|---|")
        for tp, res in results.items():
            p = median([run[0]["seconds"] for run in res["prune"]])
            ls = median([run[0]["seconds"] for run in res["load+save"]])
            print(f"| TP{tp} | {p:.1f} | {ls:.1f} | {p / ls:.2f} |")
        print()
        print("Peak RSS above baseline per rank (GiB, median) vs that rank's source shard (GiB of parameters)")
        print()
        print("| layout | rank | shard | baseline RSS | load+save peak | peak/shard | prune peak | peak/shard |")
        print("|---|---|---|---|---|---|---|---|")
        for tp, res in results.items():
            for rank in range(tp):
                shard = res["load+save"][0][rank]["shard_bytes"]
                base = median([run[rank]["base"] for run in res["prune"] + res["load+save"]])
                pl = median([run[rank]["peak"] for run in res["load+save"]])
                pp_ = median([run[rank]["peak"] for run in res["prune"]])
                print(f"| TP{tp} | {rank} | {gb(shard)} | {gb(base)} | {gb(pl)} | {pl / shard:.2f} | {gb(pp_)} | "
                      f"{pp_ / shard:.2f} |")
        if not all(run[r]["reset_ok"] for res in results.values() for runs in res.values() for run in runs
                   for r in range(len(run))):
            print("\nWARNING: could not reset VmHWM (/proc/self/clear_refs); peaks include the process start-up")
        if breakdown:
            shard = results[2]["load+save"][0][0]["shard_bytes"]
            print()
            print(f"prune_checkpoint step by step, TP2 rank 0 (shard {gb(shard)} GiB): RSS above baseline after each "
                  "step, and the peak so far (GiB)")
            print()
            print("| step | s | RSS after | peak so far | peak/shard |")
            print("|---|---|---|---|---|")
            for name, s, now, peak in breakdown[0]["rows"]:
                print(f"| {name} | {s:.1f} | {gb(now)} | {gb(peak)} | {peak / shard:.2f} |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
