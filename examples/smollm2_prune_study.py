#!/usr/bin/env python
"""Zero-shot pruning study on SmolLM2-135M (or any converted checkpoint): width vs depth vs aggregation.

Reproduces docs/pruning_results.md end to end from a converted checkpoint and indexed data, e.g. after
`megatron-prune demo` (which writes runs/demo/smollm2-135m and runs/demo/data/shakespeare_{train,valid}):

    python examples/smollm2_prune_study.py --workdir runs/study \
        --ckpt runs/demo/smollm2-135m --calib runs/demo/data/shakespeare_train \
        --eval shakespeare=runs/demo/data/shakespeare_valid

Steps (each one resumes: finished outputs under --workdir are reused):
  1. `megatron-prune importance` (the CLI, as a subprocess): default aggregation (batch=l2, seq=mean), Block
     Influence, angular distance, and the LM-loss drop of every block of 1 and of --drop-layers layers.
  2. Aggregation sweep (Python API): ONE more forward pass over the same calibration windows with three sets
     of width hooks attached (sequence aggregation mean / l2 / variance), each finalised with the three batch
     aggregations -> 9 score files. The (seq=mean, batch=l2) file must equal step 1's scores (checked).
  3. Every variant is planned with `make_plan`, pruned in memory with `apply_plan` and evaluated (LM loss,
     no retraining) on the first --eval-windows windows of each eval split; random-score baselines too.
  4. Cross-check of the checkpoint path: `megatron-prune prune` + `megatron-prune eval` on the width-pruned
     model must give the in-memory loss.
  5. workdir/report.md (tables) and workdir/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

AGGS = ("mean", "l2", "variance")
MAIN_AGGS = [("l2", "mean"), ("mean", "mean"), ("l2", "l2"), ("variance", "mean"), ("mean", "l2")]  # (batch, seq)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/study")
    p.add_argument("--ckpt", default="runs/demo/smollm2-135m", help="converted megatron-prune checkpoint")
    p.add_argument("--calib", default="runs/demo/data/shakespeare_train", help="calibration data prefix")
    p.add_argument("--eval", action="append", metavar="NAME=PREFIX",
                   help="held-out eval split (repeatable); default shakespeare=<calib dir>/shakespeare_valid")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--lm-loss-samples", type=int, default=16, help="calibration windows for the LM-loss drop")
    p.add_argument("--eval-windows", type=int, default=48, help="windows per eval split (multiple of the micro batch)")
    p.add_argument("--hidden", type=int, default=448)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=6, help="attention heads kept by the head prune (same groups)")
    p.add_argument("--query-groups", type=int, default=1, help="query groups kept by the group prune")
    p.add_argument("--layers", type=int, default=24, help="layers kept by the depth prunes")
    p.add_argument("--aggs", choices=["all", "main", "none"], default="all",
                   help="all 9 (batch, seq) aggregations (one extra pass), the paper's 5 main ones, or none")
    p.add_argument("--random-seeds", type=int, default=1, help="random-score baselines per axis")
    p.add_argument("--no-heads", action="store_true", help="skip the attention-head / query-group prunes")
    p.add_argument("--no-crosscheck", action="store_true", help="skip step 4")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def log(msg):
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args) -> float:
    """Run `megatron-prune ARGS` as a subprocess (the same as typing it); returns seconds."""
    cmd = [sys.executable, "-m", "megatron_prune.cli", *map(str, args)]
    log("$ megatron-prune " + " ".join(map(str, args)))
    # init_distributed() of this process exported MASTER_ADDR/PORT (and holds that port): let the child pick its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    t = time.time()
    subprocess.run(cmd, check=True, env=env)
    return time.time() - t


# ---------------------------------------------------------------------------------------------- step 2
def aggregation_sweep(model, arch, windows, main, out_dir: Path, micro_batch_size: int, wanted) -> dict:
    """One forward pass with WidthHooks for every sequence aggregation -> {(batch, seq): ImportanceScores}."""
    from megatron_prune.forward import run_forward
    from megatron_prune.importance import WidthHooks
    from megatron_prune.importance.scores import make_scores

    files = {(b, s): out_dir / f"{b}_{s}.scores" for b, s in wanted}
    if all(f.is_file() for f in files.values()):
        from megatron_prune.importance import ImportanceScores
        return {k: ImportanceScores.load(f) for k, f in files.items()}
    seqs = sorted({s for _, s in wanted})
    hooks = {s: WidthHooks(model, arch, 1, s) for s in seqs}
    handles = [h for w in hooks.values() for h in w.attach()]
    model.eval()
    t = time.time()
    try:
        with torch.no_grad():
            for i in range(0, len(windows), micro_batch_size):
                mb = windows[i:i + micro_batch_size]
                run_forward(model, [{"tokens": mb}], 1, mb.shape[1], len(mb), lambda logits, batch: None)
    finally:
        for h in handles:
            h.remove()
    log(f"aggregation sweep: one pass over {len(windows)} windows in {time.time() - t:.0f}s")
    depth = {k: getattr(main, k) for k in ("block_influence", "angle_matrix")}
    out = {}
    for (b, s), f in files.items():
        parts = {**hooks[s].finalize(b), **depth}
        sc = make_scores(parts, arch, s, b, len(windows), windows.shape[1], sorted(main.angular),
                         extra={"computed_by": "examples/smollm2_prune_study.py aggregation sweep"})
        sc = dataclasses.replace(sc, base_lm_loss=main.base_lm_loss, loss_drop=main.loss_drop)
        sc.save(f)
        out[(b, s)] = sc
    # the sweep's default combination must reproduce the CLI's score file
    ref = out.get(("l2", "mean"))
    if ref is not None:
        for k in ("mlp", "heads", "embedding"):
            a, r = getattr(ref, k), getattr(main, k)
            err = ((a - r).abs().max() / r.abs().max()).item()
            log(f"check: sweep (l2, mean) vs CLI scores, {k}: max rel diff {err:.2e}")
            if err > 1e-5:
                raise RuntimeError(f"aggregation sweep disagrees with `megatron-prune importance` on {k}: {err}")
    return out


def random_scores(main, seed: int):
    g = torch.Generator().manual_seed(1000 + seed)
    r = lambda t: torch.rand(t.shape, generator=g)  # noqa: E731
    return dataclasses.replace(main, mlp=r(main.mlp), heads=r(main.heads), query_groups=r(main.query_groups),
                               embedding=r(main.embedding), block_influence=r(main.block_influence))


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir)
    (work / "scores").mkdir(parents=True, exist_ok=True)
    evals = dict(e.split("=", 1)
                 for e in (args.eval or [f"shakespeare={Path(args.calib).parent / 'shakespeare_valid'}"]))
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.setdefault("config", {}).update({k: v for k, v in vars(args).items() if k != "eval"}, evals=evals)
    results.setdefault("timings_s", {})
    results.setdefault("variants", {})

    def save():
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    # 1. importance with the CLI (default aggregation + every depth metric)
    from megatron_prune.checkpoint import read_meta

    arch = read_meta(args.ckpt).arch
    drop = arch.num_layers - args.layers
    main_file = work / "scores" / "l2_mean.scores"
    if not main_file.is_file():
        results["timings_s"]["importance_cli"] = cli(
            "importance", args.ckpt, "--data", args.calib, "--out", main_file, "--samples", args.calib_samples,
            "--seq-len", args.seq_len, "--micro-batch-size", args.micro_batch_size, "--lm-loss-drop", 1, drop,
            "--lm-loss-samples", args.lm_loss_samples, "--seed", args.seed)
        save()

    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import calibration_windows, fixed_length_windows
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.importance import ImportanceScores
    from megatron_prune.prune import PruneTarget, apply_plan, make_plan
    from megatron_prune.runtime import init_distributed

    main_scores = ImportanceScores.load(main_file)
    init_distributed(1, 1)
    model, meta = load_model(args.ckpt, use_te=False)
    arch = meta.arch

    # 2. aggregation sweep
    wanted = {"all": [(b, s) for b in AGGS for s in AGGS], "main": MAIN_AGGS, "none": []}[args.aggs]
    agg_scores = {}
    if wanted:
        t = time.time()
        windows = calibration_windows(args.calib, args.calib_samples, args.seq_len, args.seed)[:, :-1]
        agg_scores = aggregation_sweep(model, arch, windows, main_scores, work / "scores", args.micro_batch_size,
                                       wanted)
        results["timings_s"].setdefault("aggregation_sweep", round(time.time() - t, 1))
        save()

    # 3. variants, pruned in memory and evaluated
    eval_windows = {name: fixed_length_windows(prefix, args.seq_len, max_windows=args.eval_windows)
                    for name, prefix in evals.items()}
    width_both = f"hidden={args.hidden},ffn={args.ffn}"
    variants = [("base", "base", None, None)]
    variants += [(f"width {t}", "width", main_scores, t) for t in
                 (f"hidden={args.hidden}", f"ffn={args.ffn}", width_both)]
    if not args.no_heads:
        hpg = arch.num_attention_heads // arch.num_query_groups
        variants += [(f"width heads={args.heads}", "width", main_scores, f"heads={args.heads}"),
                     (f"width query_groups={args.query_groups} (heads={args.query_groups * hpg})", "width", main_scores,
                      f"query_groups={args.query_groups}")]
    for metric in ("block_influence", "angular", "lm_loss", "lm_loss_block"):
        variants.append((f"depth {metric}", "depth", main_scores, f"layers={args.layers},depth_metric={metric}"))
    for (b, s), sc in agg_scores.items():  # (l2, mean) is the default: reuse "width hidden=..,ffn=.." below
        variants.append((f"agg batch={b} seq={s}" + (" (default)" if (b, s) == ("l2", "mean") else ""), "agg", sc,
                         width_both))
    for seed in range(args.random_seeds):
        rs = random_scores(main_scores, seed)
        variants.append((f"random width {width_both} (seed {seed})", "random", rs, width_both))
        variants.append((f"random depth layers={args.layers} (seed {seed})", "random", rs, f"layers={args.layers}"))
        if not args.no_heads:
            variants.append((f"random heads={args.heads} (seed {seed})", "random", rs, f"heads={args.heads}"))

    for name, group, scores, target in variants:
        done = results["variants"].get(name)
        if done and all(e in done["loss"] for e in eval_windows):
            continue
        if group == "agg" and name.endswith("(default)") and f"width {width_both}" in results["variants"]:
            results["variants"][name] = dict(results["variants"][f"width {width_both}"], group="agg",
                                             overlap_with_default={"hidden": 1.0, "ffn": 1.0})
            continue
        t = time.time()
        if scores is None:
            pruned, tarch, kept = model, arch, list(range(arch.num_layers))
            plan = None
        else:
            plan = make_plan(scores, arch, PruneTarget.parse(target))
            pruned, tarch, kept = apply_plan(model, plan), plan.target_arch, plan.kept_layers
        row = {"group": group, "target": target, "params": tarch.param_count(), "arch": tarch.describe(),
               "dropped_layers": [i for i in range(arch.num_layers) if i not in kept], "loss": {}}
        if plan is not None and group in ("agg", "random"):
            ref = make_plan(main_scores, arch, PruneTarget.parse(target))
            row["overlap_with_default"] = {
                "hidden": len(set(plan.kept_hidden) & set(ref.kept_hidden)) / len(ref.kept_hidden),
                "ffn": sum(len(set(a) & set(b)) for a, b in zip(plan.kept_ffn, ref.kept_ffn))
                / sum(len(b) for b in ref.kept_ffn)}
        for e, w in eval_windows.items():
            row["loss"][e] = lm_loss(pruned, tarch, w, args.micro_batch_size, desc=None).lm_loss
        row["seconds"] = round(time.time() - t, 1)
        results["variants"][name] = row
        log(f"{name}: {tarch.param_count() / 1e6:.1f}M params, " +
            ", ".join(f"{e} {v:.4f}" for e, v in row["loss"].items()) + f" ({row['seconds']}s)")
        save()
        del pruned

    # 4. the checkpoint path (CLI prune + CLI eval) must agree with the in-memory prune
    if not args.no_crosscheck and "crosscheck" not in results:
        out = work / "ckpt-width"
        e, prefix = next(iter(evals.items()))
        tp_ = cli("prune", args.ckpt, "--scores", main_file, "--target", width_both, "--out", out,
                  "--plan-out", work / "plan-width.json", "--overwrite")
        te = cli("eval", out, "--data", prefix, "--seq-len", args.seq_len, "--max-sequences", args.eval_windows,
                 "--micro-batch-size", args.micro_batch_size, "--out", work / "eval-width.json")
        got = json.loads((work / "eval-width.json").read_text())["lm_loss"]
        want = results["variants"][f"width {width_both}"]["loss"][e]
        results["crosscheck"] = {"cli_prune_s": round(tp_, 1), "cli_eval_s": round(te, 1), "cli_loss": got,
                                 "in_memory_loss": want, "abs_diff": abs(got - want)}
        log(f"cross-check: CLI prune+eval {got:.6f} vs in-memory {want:.6f}")
        save()

    # 5. report
    report = render(results, main_scores, arch, list(eval_windows))
    (work / "report.md").write_text(report)
    print(report)


def render(results, main_scores, arch, eval_names) -> str:
    V = results["variants"]
    base = V["base"]["loss"]
    P0 = V["base"]["params"]
    cfg = results["config"]
    hdr = "| variant | params | " + " | ".join(f"{e} LM loss (Δ)" for e in eval_names)
    lines = [f"Calibration: {cfg['calib_samples']} x {cfg['seq_len']} tokens of {cfg['calib']} (seed {cfg['seed']}); "
             f"LM-loss drop on the first {cfg['lm_loss_samples']} of them; eval: first {cfg['eval_windows']} windows "
             f"x {cfg['seq_len']} tokens of " + ", ".join(f"{k}={v}" for k, v in cfg["evals"].items()) + ".", ""]

    def table(group, extra_col=None):
        out = [hdr + (f" | {extra_col[0]}" if extra_col else "") + " |",
               "|---|---|" + "---|" * len(eval_names) + ("---|" if extra_col else "")]
        for name, r in V.items():
            if r["group"] not in group:
                continue
            cells = [name, f"{r['params'] / 1e6:.1f}M ({100 * r['params'] / P0:.0f}%)"]
            cells += [f"{r['loss'][e]:.3f} ({r['loss'][e] - base[e]:+.3f})" for e in eval_names]
            if extra_col:
                cells.append(extra_col[1](r))
            out.append("| " + " | ".join(cells) + " |")
        return out

    lines += ["### Width and depth", ""] + table(
        ("base", "width", "depth"),
        ("dropped layers", lambda r: str(r["dropped_layers"]) if r["dropped_layers"] else "")) + [""]
    if any(r["group"] == "agg" for r in V.values()):
        lines += ["### Aggregation (width prune, batch x sequence)", ""] + table(
            ("agg",), ("kept hidden / FFN shared with default",
                       lambda r: "{hidden:.0%} / {ffn:.0%}".format(**r["overlap_with_default"]))) + [""]
    if any(r["group"] == "random" for r in V.values()):
        lines += ["### Random-score baselines", ""] + table(
            ("random",), ("dropped layers", lambda r: str(r["dropped_layers"]) if r["dropped_layers"] else "")) + [""]
    L = arch.num_layers
    fmt = lambda t: " ".join(f"{float(x):.3f}" for x in t)  # noqa: E731
    lines += ["### Depth scores per layer (layer 0 first)", "",
              f"- Block Influence: {fmt(main_scores.block_influence)}",
              f"- angular distance d(l, 1): {fmt(main_scores.angular_distance(1))}",
              f"- angular distance d(l, {L - cfg['layers']}): {fmt(main_scores.angular_distance(L - cfg['layers']))}"]
    if main_scores.loss_drop:
        lines.append(f"- base LM loss on the LM-loss-drop samples: {main_scores.base_lm_loss:.4f}")
        for n, t in main_scores.loss_drop.items():
            lines.append(f"- LM-loss increase, block of {n} starting at l: {fmt(t)}")
    if "crosscheck" in results:
        c = results["crosscheck"]
        lines += ["", f"Cross-check (checkpoint path): `megatron-prune prune` + `megatron-prune eval` gives "
                  f"{c['cli_loss']:.6f}, in-memory apply_plan {c['in_memory_loss']:.6f} (|diff| {c['abs_diff']:.1e})."]
    lines += ["", "Timings (s): " + json.dumps(results["timings_s"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
