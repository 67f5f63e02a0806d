#!/usr/bin/env python
"""Which attention-head score prunes heads best? Zero-shot and after a short distillation, several seeds.

The head metrics (all stored by one `megatron-prune importance` pass, see megatron_prune/importance/width.py):
activation (Minitron: L2 of the head output per token, then sequence/batch aggregation), channel (each channel
aggregated over sequence and batch first, then L2 over the head's channels) and residual (L2 of the head's
contribution to the residual stream, i.e. through its slice of the output projection). Random head choices are
the baseline every metric must beat.

    python examples/head_metric_study.py --workdir runs/heads --ckpt runs/demo/smollm2-135m \
        --calib runs/demo/data/shakespeare_train --eval runs/demo/data/shakespeare_valid

Steps (each resumes from workdir/results.json):
  1. importance on --calib-samples random windows for every --calib-seeds seed (one pass each, all metrics);
  2. zero-shot: every target x metric x seed pruned in memory and evaluated; random choices for --random-seeds;
  3. after distillation: for each --distill-seeds calibration seed (default: the first), every metric, and
     --distill-random random choices, prune to a checkpoint and distill --distill-steps steps from the unpruned
     model (same data, schedule and seed for all), then evaluate;
  4. workdir/report.md (tables) and workdir/report.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

METRICS = ("activation", "channel", "residual")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/heads")
    p.add_argument("--ckpt", default="runs/demo/smollm2-135m", help="converted megatron-prune checkpoint")
    p.add_argument("--calib", default="runs/demo/data/shakespeare_train", help="calibration / distillation data")
    p.add_argument("--eval", default="runs/demo/data/shakespeare_valid", help="held-out data prefix")
    p.add_argument("--targets", nargs="+", default=["heads=6", "heads=3"], help="head prunes to study")
    p.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--random-seeds", type=int, default=4, help="random head choices per target (zero-shot)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=48)
    p.add_argument("--distill-steps", type=int, default=40, help="0: zero-shot only")
    p.add_argument("--distill-target", default="heads=6")
    p.add_argument("--distill-random", type=int, default=2, help="random choices also distilled")
    p.add_argument("--distill-seeds", type=int, nargs="+",
                   help="calibration seeds whose metric choices are distilled (default: the first calibration seed)")
    return p.parse_args(argv)


def log(msg):
    print(f"[heads {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_heads(scores, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    heads = torch.rand(scores.heads.shape, generator=g)
    from megatron_prune.importance.width import query_group_scores

    return dataclasses.replace(scores, heads=heads,
                               query_groups=query_group_scores(heads, scores.arch["num_query_groups"]))


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["config"] = vars(args)
    zero = results.setdefault("zero_shot", {})
    after = results.setdefault("distilled", {})

    def save():
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import calibration_windows, fixed_length_windows
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.importance import ImportanceScores, compute_importance
    from megatron_prune.prune import PruneTarget, apply_plan, make_plan
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, meta = load_model(args.ckpt, use_te=False)
    arch = meta.arch
    windows = fixed_length_windows(args.eval, args.seq_len, max_windows=args.eval_windows)
    if "base" not in results:
        results["base"] = lm_loss(model, arch, windows, 4, desc=None).lm_loss
        save()
    log(f"base LM loss {results['base']:.4f}")

    # 1. one importance pass per calibration seed (every head metric from the same pass)
    scores = {}
    for seed in args.calib_seeds:
        f = work / f"seed{seed}.scores"
        if not f.is_file():
            calib = calibration_windows(args.calib, args.calib_samples, args.seq_len, seed)[:, :-1]
            compute_importance(model, arch, calib, 4, desc=f"importance seed {seed}").save(f)
        scores[seed] = ImportanceScores.load(f)

    # 2. zero-shot
    def evaluate(name, sc, target):
        if name in zero:
            return
        plan = make_plan(sc, arch, PruneTarget.parse(target))
        pruned = apply_plan(model, plan)
        zero[name] = {"target": target, "loss": lm_loss(pruned, plan.target_arch, windows, 4, desc=None).lm_loss,
                      "params": plan.target_arch.param_count()}
        log(f"{name}: {zero[name]['loss']:.4f}")
        save()

    for target in args.targets:
        for metric in METRICS:
            for seed in args.calib_seeds:
                evaluate(f"{target} {metric} seed{seed}", scores[seed].with_head_metric(metric), target)
        for r in range(args.random_seeds):
            evaluate(f"{target} random seed{r}", random_heads(scores[args.calib_seeds[0]], r), target)

    # 3. after a short distillation
    if args.distill_steps:
        from megatron_prune.prune.checkpoint import prune_checkpoint
        from megatron_prune.training.config import TrainConfig
        from megatron_prune.training.trainer import latest_step_dir, train

        distill_seeds = args.distill_seeds or args.calib_seeds[:1]
        seed0 = scores[args.calib_seeds[0]]
        runs = [(f"{m} seed{s}", scores[s].with_head_metric(m)) for s in distill_seeds for m in METRICS]
        runs += [(f"random seed{r}", random_heads(seed0, r)) for r in range(args.distill_random)]
        for name, sc in runs:
            if name in after or (name.endswith(" seed0") and name.split()[0] in after):
                continue  # (results of an earlier version of this script name seed 0's runs by metric alone)
            plan = make_plan(sc, arch, PruneTarget.parse(args.distill_target))
            student = work / f"ckpt-{name.replace(' ', '-')}"
            if not student.exists():
                prune_checkpoint(args.ckpt, plan, student)
            run = work / f"distill-{name.replace(' ', '-')}"
            train(TrainConfig(teacher=args.ckpt, student=str(student), data=[args.calib], out=str(run),
                              seq_len=128, micro_batch_size=4, global_batch_size=4, steps=args.distill_steps,
                              lr=5e-4, min_lr=5e-5, warmup_steps=min(10, args.distill_steps),
                              save_every=args.distill_steps, keep_last=1, log_every=10, seed=1234))
            init_distributed(1, 1)
            trained, tmeta = load_model(latest_step_dir(run), use_te=False)
            after[name] = {"target": args.distill_target, "steps": args.distill_steps,
                           "loss": lm_loss(trained, tmeta.arch, windows, 4, desc=None).lm_loss}
            log(f"distilled {name}: {after[name]['loss']:.4f}")
            save()
            del trained

    (work / "report.md").write_text(render(results))
    plot(results, work / "report.png")
    print(render(results))


def _summary(values):
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
            f"(min {min(values):.3f}, max {max(values):.3f})")


def render(results) -> str:
    cfg, base = results["config"], results["base"]
    lines = [f"Base LM loss {base:.3f} on {cfg['eval_windows']} x {cfg['seq_len']} held-out tokens of {cfg['eval']}; "
             f"calibration {cfg['calib_samples']} x {cfg['seq_len']} tokens, seeds {cfg['calib_seeds']}.", "",
             "### Zero-shot (no retraining): LM loss, mean ± sd over seeds", "",
             "| target | " + " | ".join(METRICS) + " | random |", "|---|" + "---|" * (len(METRICS) + 1)]
    for target in cfg["targets"]:
        cells = []
        for metric in (*METRICS, "random"):
            vals = [r["loss"] for k, r in results["zero_shot"].items() if k.startswith(f"{target} {metric} ")]
            cells.append(_summary(vals) if vals else "")
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    if results.get("distilled"):
        seeds = cfg.get("distill_seeds") or cfg["calib_seeds"][:1]
        lines += ["", f"### After {cfg['distill_steps']} distillation steps ({cfg['distill_target']}): "
                  f"LM loss, mean ± sd over calibration seeds {seeds} (random: over random choices)", "",
                  "| head choice | LM loss |", "|---|---|"]
        for metric in (*METRICS, "random"):
            vals = [r["loss"] for k, r in results["distilled"].items() if k.split()[0] == metric]
            if vals:
                lines.append(f"| {metric} | {_summary(vals)} |")
    return "\n".join(lines) + "\n"


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, axes = plt.subplots(1, 2 if results.get("distilled") else 1, figsize=(10, 4), squeeze=False)
    ax = axes[0][0]
    for i, target in enumerate(cfg["targets"]):
        for j, metric in enumerate((*METRICS, "random")):
            vals = [r["loss"] for k, r in results["zero_shot"].items() if k.startswith(f"{target} {metric} ")]
            x = i * (len(METRICS) + 2) + j
            ax.scatter([x] * len(vals), vals, color=f"C{j}", label=metric if i == 0 else None)
    ax.axhline(results["base"], color="gray", ls="--", label="unpruned")
    ax.set_xticks([i * (len(METRICS) + 2) + 1.5 for i in range(len(cfg["targets"]))], cfg["targets"])
    ax.set_ylabel("held-out LM loss")
    ax.set_title("zero-shot, per calibration / random seed")
    ax.legend(fontsize=7)
    if results.get("distilled"):
        ax = axes[0][1]
        for j, metric in enumerate((*METRICS, "random")):
            vals = [r["loss"] for k, r in results["distilled"].items() if k.split()[0] == metric]
            ax.scatter([j] * len(vals), vals, color=f"C{j}")
        ax.set_xticks(range(len(METRICS) + 1), [*METRICS, "random"], fontsize=8)
        lo = min(r["loss"] for r in results["distilled"].values())
        ax.set_ylim(lo - 0.2, None)
        ax.set_title(f"after {cfg['distill_steps']} KD steps ({cfg['distill_target']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
