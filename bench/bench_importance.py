"""Calibration pass with every importance hook vs a plain forward pass over the same samples (issue 3).

    python bench/bench_importance.py            # Llama-shaped 8 x 1024 model, TP1 and TP2
    python bench/bench_importance.py --quick    # small model, a few seconds
    python bench/bench_importance.py --moe      # Mixtral-shaped: 8 experts, top-2 (the expert hooks too)

Both passes run on the same randomly initialised model (megatron_prune.model.build_model), the same token
ids, and the same megatron schedule calls (compute_importance groups micro-batches into calls of 4*PP; the
plain pass uses that grouping too, with a no-op on_output). Repetitions are interleaved (plain, hooks,
hooks, plain, ...) after one warm-up of each, so machine noise hits both sides alike; medians are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, run_ranks, synced_times  # noqa: E402

FULL = dict(arch=dict(num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16, num_query_groups=4,
                      vocab_size=32000), samples=8, seq_len=256, micro_batch_size=2, reps=3)
QUICK = dict(arch=dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8, num_query_groups=4,
                       vocab_size=8000), samples=8, seq_len=128, micro_batch_size=2, reps=2)
# --moe: every MLP becomes 8 experts of width FFN / 4, the router picking 2 (Mixtral's shape, scaled down)
MOE = dict(model_type="mixtral", num_experts=8, moe_router_topk=2)


def _worker(tp: int, cfg: dict) -> dict:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_prune.arch import ModelArch
    from megatron_prune.forward import run_forward
    from megatron_prune.importance import compute_importance
    from megatron_prune.importance.compute import _schedule_calls
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(tp=tp, pp=1, seed=0)
    arch = ModelArch(**cfg["arch"])
    model = build_model(arch, dtype=torch.float32, use_te=False)
    model.eval()
    samples = torch.randint(0, arch.vocab_size, (cfg["samples"], cfg["seq_len"]),
                            generator=torch.Generator().manual_seed(0))
    mbs = cfg["micro_batch_size"]
    pp = ps.get_pipeline_model_parallel_world_size()

    def plain():
        for call in _schedule_calls(samples, mbs, 4 * pp):  # the same schedule calls as compute_importance
            batches = [{"tokens": t} for t in call]
            run_forward(model, batches, len(batches), cfg["seq_len"], len(call[0]), lambda logits, batch: None)

    def hooks():
        return compute_importance(model, arch, samples, micro_batch_size=mbs, desc=None)

    synced_times(plain)  # warm-up (allocator, first-call overheads)
    synced_times(hooks)
    times = {"plain": [], "hooks": []}
    cpu = {"plain": [], "hooks": []}
    for r in range(cfg["reps"]):
        order = ("plain", "hooks") if r % 2 == 0 else ("hooks", "plain")
        for name in order:
            dt, ct, _ = synced_times(plain if name == "plain" else hooks)
            times[name].append(dt)
            cpu[name].append(ct)
    return {"times": times, "cpu": cpu, "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, quick run")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes to run (default: 1 2)")
    ap.add_argument("--reps", type=int, help="timed repetitions of each pass (after one warm-up each)")
    ap.add_argument("--moe", action="store_true", help="a Mixture-of-Experts model (8 experts, top-2)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.moe:
        cfg["arch"] = dict(cfg["arch"], **MOE, moe_ffn_hidden_size=cfg["arch"]["ffn_hidden_size"] // 4)
    if args.reps:
        cfg["reps"] = args.reps
    import os

    a = cfg["arch"]
    print(f"model: {a['num_layers']} layers, hidden {a['hidden_size']}, FFN {a['ffn_hidden_size']}, "
          f"{a['num_attention_heads']} heads / {a['num_query_groups']} groups, vocab {a['vocab_size']}, fp32, "
          f"random weights" + (f"; MoE: {a['num_experts']} experts of FFN {a['moe_ffn_hidden_size']}, top-"
                               f"{a['moe_router_topk']}" if args.moe else ""))
    print(f"data: {cfg['samples']} samples x {cfg['seq_len']} tokens, micro-batch {cfg['micro_batch_size']}; "
          f"{cfg['reps']} interleaved repetitions (+1 warm-up each); {os.cpu_count()} CPU cores split over the ranks")
    rows = []
    for tp in args.tp:
        results = run_ranks(_worker, tp, tp, cfg)
        for what in ("times", "cpu"):
            t = results[0][what]
            plain, hooks = median(t["plain"]), median(t["hooks"])
            ratios = [h / p for h, p in zip(t["hooks"], t["plain"])]
            label = f"TP{tp} {'wall' if what == 'times' else 'CPU'}"
            rows.append((label, plain, hooks, hooks / plain, median(ratios), min(ratios), max(ratios)))
            print(f"  {label}: plain {['%.2f' % x for x in t['plain']]}  hooks {['%.2f' % x for x in t['hooks']]}",
                  flush=True)
    print()
    print("| layout, clock | plain forward (s, median) | with all hooks (s, median) | ratio of medians | "
          "median of per-rep ratios (range) |")
    print("|---|---|---|---|---|")
    for label, plain, hooks, ratio, mid, lo, hi in rows:
        print(f"| {label} | {plain:.2f} | {hooks:.2f} | {ratio:.3f} | {mid:.3f} ({lo:.3f} - {hi:.3f}) |")
    print("\nper-rep ratio: hooks time / plain time of the same repetition (adjacent in time, so less exposed to "
          "load changes on a shared machine); CPU = CPU seconds of the rank process (all threads), max over ranks")


if __name__ == "__main__":
    main()
