#!/usr/bin/env python
"""The self-data distillation study's report: tables and a plot from a finished `smollm2_selfdistill.yaml` run.

    megatron-prune run examples/smollm2_selfdistill.yaml
    python examples/selfdistill_report.py --workdir runs/smollm2-selfdistill --out docs/selfdistill_results.md

Reads eval.json (held-out LM loss, KL(teacher || model), arithmetic accuracy, human-eval pass rate per model),
rewrites.stats.json (what the teacher's rewriting kept) and specdec-*.json (each student as the draft of the
teacher); seeds of the same variant (`sft-s0`, `sft-s1`, ...) are averaged (mean and spread).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

METRICS = (("lm_loss", "held-out LM loss", "{:.4f}"), ("kl_to_teacher", "KL(teacher‖model)", "{:.4f}"),
           ("arithmetic_accuracy", "arithmetic acc", "{:.3f}"), ("humaneval_pass", "human-eval pass", "{:.3f}"))


def variants(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by model name without its seed suffix (`sdd-s1` -> `sdd`), in the order they appear."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"-s\d+$", "", Path(r["model"]).name), []).append(r)
    return groups


def cell(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/smollm2-selfdistill")
    p.add_argument("--out", default="docs/selfdistill_results.md")
    args = p.parse_args(argv)
    work, out = Path(args.workdir), Path(args.out)
    rows = json.loads((work / "eval.json").read_text())["rows"]
    groups = variants(rows)
    teacher, pruned = groups["teacher"][0], groups["pruned"][0]

    lines = ["| model | params | seeds | " + " | ".join(t for _, t, _ in METRICS) + " | LM-loss gap recovered |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for name, rs in groups.items():
        cells = [cell([r[k] for r in rs], fmt) if all(k in r for r in rs) else "-" for k, _, fmt in METRICS]
        gap = pruned["lm_loss"] - teacher["lm_loss"]
        recovered = [(pruned["lm_loss"] - r["lm_loss"]) / gap for r in rs] if gap > 0 else []
        lines.append(f"| {name} | {rs[0]['params'] / 1e6:.1f}M | {len(rs)} | " + " | ".join(cells)
                     + f" | {cell(recovered, '{:.0%}') if name not in ('teacher', 'pruned') and recovered else '-'} |")
    table = "\n".join(lines)

    spec_lines = ["| draft | k | acceptance rate | mean accepted length | speed-up vs teacher alone |",
                  "|---|---|---|---|---|"]
    spec = {}
    for f in sorted(work.glob("specdec-*.json")):
        report = json.loads(f.read_text())
        spec[f.stem[len("specdec-"):]] = report["k"]
        for k, r in report["k"].items():
            spec_lines.append(f"| {f.stem[len('specdec-'):]} | {k} | {r['acceptance_rate']:.3f} | "
                              f"{r['mean_accepted_length']:.2f} | {r['speedup']:.2f}x |")
    stats_file = work / "rewrites.stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    log = [json.loads(x) for x in (work / "run_log.jsonl").read_text().splitlines() if x.strip()]
    seconds = {e["stage"]: e["seconds"] for e in log if e["event"] == "done"}

    _plot(groups, spec, out.with_suffix(".png"))
    text = [f"<!-- written by examples/selfdistill_report.py from {work} -->", "", "### Models", "", table, "",
            "### Each student as the speculative-decoding draft of the teacher (greedy)", "", "\n".join(spec_lines),
            "", "### Rewrites", "", f"`{json.dumps(stats)}`", "",
            "### Time per stage (s)", "", " · ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f" · total {sum(seconds.values()) / 60:.0f} min", "", f"![study]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(text))
    print("\n".join(text))


def _plot(groups: dict, spec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(k, t) for k, t, _ in METRICS if all(k in r for rs in groups.values() for r in rs)]
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4 * (len(shown) + 1), 3.6))
    names = list(groups)
    palette = ["C0", "C1", "C2", "C3", "C4", "C5"]
    color = {"teacher": "#555", "pruned": "#aaa"}  # one colour per model in every panel
    color.update({n: palette[i % len(palette)] for i, n in enumerate(n for n in names if n not in color)})
    for ax, (key, title) in zip(axes, shown):
        means = [statistics.mean(r[key] for r in groups[n]) for n in names]
        errs = [statistics.stdev(r[key] for r in groups[n]) if len(groups[n]) > 1 else 0 for n in names]
        ax.bar(range(len(names)), means, yerr=errs, color=[color[n] for n in names])
        if key == "lm_loss":  # the differences are tenths of a nat on a loss of ~4: start the axis near them
            ax.set_ylim(min(means) - 0.1, max(means) + 0.05)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[-1]
    for draft, ks in spec.items():
        ax.plot([int(k) for k in ks], [r["mean_accepted_length"] for r in ks.values()], marker="o", label=draft,
                color=color.get(draft))
    ax.set_xlabel("draft length k")
    ax.set_title("mean accepted length per target step", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
