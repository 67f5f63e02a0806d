#!/usr/bin/env python
"""Plot distillation / training curves of one or more `megatron-prune distill|train` run directories.

Each run is given as LABEL=SOURCE, where SOURCE is a run directory (its ``tensorboard/`` event files are
read) or the captured console output of the run (the per-step JSON lines the trainer prints), e.g.

    megatron-prune distill --config examples/distill_smollm2.yaml > runs/kd.log 2>&1
    megatron-prune train   --config examples/distill_smollm2.yaml --out runs/ce ... > runs/ce.log 2>&1
    python examples/plot_training.py KD=runs/kd CE=runs/ce \\
        --teacher-eval runs/teacher_eval.json --out docs/distillation_curves.png

Panels: the training KD loss (runs that have one), the training next-token LM loss of every run
(moving average), and the held-out LM loss of the student (``valid_lm``) against the step, with the
teacher's held-out LM loss (from ``megatron-prune eval ... --out teacher_eval.json``, or --teacher-loss) and
the student's loss before training (its step-0 ``valid_lm``) as horizontal lines. ``--summary`` also prints
a JSON summary (held-out loss at step 0 / end, share of the teacher gap recovered).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

JSON_RE = re.compile(r"\{\"[^{}]*\}")


def read_json_log(path: Path) -> list[dict]:
    """The trainer's per-step JSON records from a console log (tqdm's carriage returns tolerated)."""
    records = []
    for chunk in re.split(r"[\r\n]", path.read_text(errors="replace")):
        for m in JSON_RE.finditer(chunk):
            try:
                rec = json.loads(m.group(0))
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
    return records


def read_tensorboard(run_dir: Path) -> list[dict]:
    """Records rebuilt from a run's TensorBoard scalars: ``train/kd`` -> ``kd``, ``valid_lm`` stays."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, dict] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            key = tag.split("/", 1)[1] if tag.startswith("train/") else tag
            for ev in acc.Scalars(tag):  # a resumed run re-logs steps: the newest file wins
                by_step.setdefault(ev.step, {"step": ev.step})[key] = ev.value
    return [by_step[s] for s in sorted(by_step)]


def read_run(source: str) -> list[dict]:
    path = Path(source)
    if path.is_dir():
        return read_tensorboard(path)
    return read_json_log(path)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    merged: dict[int, float] = {}
    for r in records:
        if key in r and r[key] is not None:
            merged[int(r["step"])] = float(r[key])  # last value per step wins (resumed runs)
    steps = sorted(merged)
    return steps, [merged[s] for s in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def summarize(runs: dict[str, list[dict]], teacher: float | None) -> dict:
    summary = {"teacher_valid_lm": teacher, "runs": {}}
    for label, records in runs.items():
        steps, valid = series(records, "valid_lm")
        if not steps:
            continue
        entry = {"steps": steps[-1], "valid_lm_start": valid[0], "valid_lm_end": valid[-1],
                 "valid_lm_best": min(valid)}
        if teacher is not None and valid[0] != teacher:
            entry["gap_recovered_end"] = (valid[0] - valid[-1]) / (valid[0] - teacher)
        summary["runs"][label] = entry
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR or LABEL=CONSOLE_LOG")
    ap.add_argument("--teacher-eval", help="JSON written by `megatron-prune eval TEACHER ... --out`")
    ap.add_argument("--teacher-loss", type=float, help="the teacher's held-out LM loss (instead of --teacher-eval)")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window of the training curves")
    ap.add_argument("--title", default="Distillation of the width-pruned SmolLM2-135M student")
    ap.add_argument("--out", default="distillation_curves.png")
    ap.add_argument("--summary", help="also write the JSON summary here")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for spec in args.runs:
        label, _, source = spec.partition("=")
        if not source:
            raise SystemExit(f"give runs as LABEL=SOURCE, got {spec!r}")
        runs[label] = read_run(source)
        if not runs[label]:
            raise SystemExit(f"{source}: no training records found")
    teacher = args.teacher_loss
    if teacher is None and args.teacher_eval:
        teacher = float(json.loads(Path(args.teacher_eval).read_text())["lm_loss"])

    colors = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax_kd, ax_lm, ax_valid = axes

    for label, records in runs.items():
        steps, kd = series(records, "kd")
        if steps:
            ax_kd.plot(steps, kd, color=colors[label], alpha=0.25, lw=0.8)
            ax_kd.plot(steps, moving_average(kd, args.smooth), color=colors[label], label=f"{label}: forward KL")
        steps, lm = series(records, "lm")
        if steps:
            ax_lm.plot(steps, lm, color=colors[label], alpha=0.25, lw=0.8)
            ax_lm.plot(steps, moving_average(lm, args.smooth), color=colors[label], label=label)
        steps, valid = series(records, "valid_lm")
        if steps:
            ax_valid.plot(steps, valid, "o-", color=colors[label], ms=4, label=f"{label} student")
    ax_kd.set(title="training KD loss (forward KL, τ=1)", xlabel="step", ylabel="loss (nats/token)")
    ax_lm.set(title="training LM loss on the training batches", xlabel="step", ylabel="cross-entropy (nats/token)")

    first = next(iter(runs.values()))
    _, v0 = series(first, "valid_lm")
    if v0:
        ax_valid.axhline(v0[0], color="gray", ls=":", label=f"pruned student, no training ({v0[0]:.3f})")
    if teacher is not None:
        ax_valid.axhline(teacher, color="black", ls="--", label=f"teacher ({teacher:.3f})")
    ax_valid.set(title="held-out LM loss (validation split)", xlabel="step", ylabel="cross-entropy (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    summary = summarize(runs, teacher)
    print(json.dumps(summary, indent=2))
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
