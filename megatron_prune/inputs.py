"""Checks of a user's inputs, run by every pipeline before it loads a model or starts a process group.

Each failure is an :class:`InputError` (a ValueError: the CLI prints it as one line and exits 2) that names
the input (``--data``, ``CKPT``, ...) and says how to fix it. Only files' names and small metadata are read here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


class InputError(ValueError):
    """A command-line input is wrong; the message names it and the fix."""


def positive(name: str, value, allow_zero: bool = False) -> None:
    """``value`` (when given) is > 0, or >= 0 with ``allow_zero``."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be {'>= 0' if allow_zero else 'a positive number'}, got {value}")


def layout(tp: int, pp: int) -> None:
    positive("--tp", tp)
    positive("--pp", pp)


def checkpoint(path, name: str = "CKPT"):
    """A readable megatron-prune checkpoint; returns its metadata (architecture, dtype)."""
    from megatron_prune.checkpoint import CheckpointError, read_meta

    try:
        return read_meta(path)
    except CheckpointError as e:
        raise InputError(f"{name}: {e}") from e


def checkpoint_fits(meta, tp: int, pp: int, name: str = "CKPT", vpp: int = 1, main: bool = True) -> None:
    """The model can be sharded at ``tp`` x ``pp`` (heads, groups divide; a layer per stage), with ``vpp`` virtual
    stages. ``main``: the command's main model, which --decoder-first/last-pipeline-num-layers size (see
    :func:`pipeline_split`)."""
    arch_fits(meta.arch, tp, pp, name, vpp, main)


def arch_fits(arch, tp: int, pp: int, name: str = "CKPT", vpp: int = 1, main: bool = True) -> None:
    try:
        arch.check_parallel(tp, pp)
    except ValueError as e:
        raise InputError(f"{name} cannot be loaded at --tp {tp} --pp {pp}: {e}") from e
    pipeline_split(arch, pp, name, vpp, main)


def training_models(student, teacher, tp: int, pp: int, vpp: int = 1, ep: int = 1,
                    seq_len: Optional[int] = None) -> None:
    """The architectures of a training run (``teacher`` None without one) shard at tp x pp (x vpp, x ep) and share
    one vocabulary. The stage-size flags size the student. At TP > 1 training is sequence parallel
    (``sequence_parallel``), so the sequence length must split over TP."""
    for name, arch in (("--student", student), ("--teacher", teacher)):
        if arch is None:
            continue
        arch_fits(arch, tp, pp, name, vpp, main=name == "--student")
        if arch.num_experts is not None and ep > 1 and arch.num_experts % ep:
            raise InputError(f"{name}: EP={ep} does not divide its {arch.num_experts} experts; choose an --ep that "
                             "divides them")
    if seq_len is not None and sequence_parallel(tp) and seq_len % tp:
        raise InputError(f"--seq-len {seq_len}: training at TP={tp} is sequence parallel, which splits each "
                         f"sequence over the TP ranks; use a --seq-len divisible by {tp}")
    if teacher is not None and teacher.vocab_size != student.vocab_size:
        raise InputError(f"--teacher vocabulary ({teacher.vocab_size}) differs from --student's "
                         f"({student.vocab_size}); distill between models of one tokenizer")


def sequence_parallel(tp: int) -> bool:
    """Whether a training run shards its sequences over TP (megatron's sequence parallelism): on at TP > 1, as
    NeMo's and Megatron-Bridge's recipes set it and as the memory planner counts activations; megatron trains a
    Mixture-of-Experts layer at TP > 1 only so. The teacher follows the student, so both send activations of one
    shape between pipeline stages."""
    return tp > 1


def stage_override(first, last, pp: int) -> None:
    """--decoder-first/last-pipeline-num-layers, before any model is read: positive, and only with --pp >= 2."""
    from megatron_prune.runtime.stages import FIRST_FLAG, LAST_FLAG

    for flag, v in ((FIRST_FLAG, first), (LAST_FLAG, last)):
        if v is not None:
            positive(flag, v)
            if pp < 2:
                raise InputError(f"{flag} {v} sizes the first/last of several pipeline stages and needs --pp >= 2; "
                                 f"add --pp 2 (or more) or drop it")


def pipeline_split(arch, pp: int, name: str = "CKPT", vpp: int = 1, main: bool = True) -> list:
    """Layers per pipeline stage of this model (runtime/stages.py); InputError with the fix when megatron cannot
    build it. ``main``: the command's main model (written, trained or read), to which the user's
    --decoder-first/last-pipeline-num-layers apply; another model of the same depth then uses the same split,
    one of another depth its automatic split."""
    from megatron_prune.runtime import stages

    split = stages.bind_split if main else stages.split_for
    try:
        return split(arch.num_layers, pp, vpp)
    except ValueError as e:
        hint = ""
        if vpp > 1 and _splits(split, arch.num_layers, pp, 1):  # the virtual stages are the problem
            fits = [v for v in range(2, arch.num_layers // pp + 1) if _splits(split, arch.num_layers, pp, v)]
            hint = f"; --vpp values that fit: {fits or 'none (drop --vpp)'}"
        raise InputError(f"{name} has {arch.num_layers} layers, which cannot be split over --pp {pp}"
                         f"{f' --vpp {vpp}' if vpp > 1 else ''}: {e}{hint}") from e


def _splits(split, num_layers: int, pp: int, vpp: int) -> bool:
    try:
        split(num_layers, pp, vpp)
    except ValueError:
        return False
    return True


def indexed_data(prefix, name: str = "--data") -> str:
    """A Megatron indexed dataset: ``prefix.bin`` and ``prefix.idx`` both exist."""
    p = str(prefix)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix) and Path(p).is_file():
            raise InputError(f"{name} {p}: give the prefix without {suffix}, i.e. {p[:-len(suffix)]}")
    missing = [s for s in (".bin", ".idx") if not Path(p + s).is_file()]
    if missing:
        hint = ("make one with `megatron-prune data --tokenizer CKPT --out DIR` (it prints the prefixes)"
                if len(missing) == 2 else f"{p}{missing[0]} is missing: rebuild it with `megatron-prune data`")
        raise InputError(f"{name} {p}: no indexed dataset ({p}.bin/.idx); {hint}")
    return p


def enough_windows(prefix: str, seq_len: int, needed: int, name: str, fix: str) -> int:
    """The data holds at least ``needed`` windows of ``seq_len + 1`` tokens; returns how many it holds."""
    from megatron_prune.data.indexed import count_windows

    try:
        available = count_windows(prefix, seq_len)
    except Exception as e:  # megatron's reader asserts on a foreign or truncated index
        raise InputError(f"{name} {prefix}: {prefix}.idx/.bin cannot be read as a Megatron indexed dataset "
                         f"({type(e).__name__}: {e}); rebuild it with `megatron-prune data`") from e
    if available < needed:
        raise InputError(f"{name} {prefix} has {available} windows of {seq_len + 1} tokens, fewer than the {needed} "
                         f"needed; {fix}")
    return available


def existing_file(path, name: str, fix: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{name} {p} {'is a directory, not a file' if p.is_dir() else 'does not exist'}; {fix}")
    return p


def free_output(path, name: str = "output", overwrite: bool = False, error: type = FileExistsError) -> Path:
    """``path`` does not exist yet, or ``overwrite``. Checked with the other inputs by :func:`output`, and again
    by whatever writes the output (it may be called directly, or something may have appeared since)."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise error(f"{name} {p} already exists; choose another path or pass --overwrite")
    return p


def output(path, name: str = "--out", overwrite: Optional[bool] = False, kind: str = "dir") -> Path:
    """An output path we may write: its parent exists (or can be created) and it does not exist yet (unless
    ``overwrite``; ``None``: an existing output is fine, e.g. a run directory to resume in)."""
    p = Path(path)
    if overwrite is False:
        free_output(p, name, error=InputError)
    if kind == "file" and p.is_dir():
        raise InputError(f"{name} {p} is a directory; give a file name")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise InputError(f"{name} {p} is a file; give a directory")
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"{name} {p}: cannot write under {parent}; choose a writable location")
    if kind == "file" and not p.parent.is_dir():
        raise InputError(f"{name} {p}: directory {p.parent} does not exist; create it first")
    return p


def tokenizer_source(path, name: str = "--tokenizer") -> Path:
    """A megatron-prune checkpoint that carries a tokenizer, or a directory of tokenizer files."""
    from megatron_prune.checkpoint.hf import TOKENIZER_MODEL_FILES, has_tokenizer
    from megatron_prune.checkpoint.megatron import METADATA_FILE, tokenizer_dir

    p = Path(path)
    if (p / METADATA_FILE).is_file():
        found = tokenizer_dir(p)
        if found is None:
            raise InputError(f"{name} {p}: this checkpoint carries no tokenizer; pass the Hugging Face directory it "
                             f"was converted from (or any directory with {' / '.join(TOKENIZER_MODEL_FILES)})")
        return found
    if not p.exists():
        raise InputError(f"{name} {p} does not exist; pass a megatron-prune checkpoint or a Hugging Face tokenizer "
                         f"directory")
    if not p.is_dir() or not has_tokenizer(p):
        raise InputError(f"{name} {p} holds no tokenizer files ({', '.join(TOKENIZER_MODEL_FILES)}); pass a "
                         f"megatron-prune checkpoint or a directory written by a tokenizer's save_pretrained()")
    return p


def numbers(text: str, name: str, kind=float) -> list:
    """A comma-separated list of numbers (``--k 1,2,4``, ``--t 0.3,0.7``)."""
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values:
        what = "whole numbers" if kind is int else "numbers"
        example = "1,2,4" if kind is int else "0.5"
        raise InputError(f"{name} {text!r}: give comma-separated {what}, e.g. {name} {example}")
    return values


def has_chat_template(tok_dir) -> bool:
    """The tokenizer directory carries a chat template (read from its files; the tokenizer is not loaded)."""
    import json

    p = Path(tok_dir)
    if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((p / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def chat_tokenizer(ckpt, name: str) -> Path:
    """The checkpoint's tokenizer directory, which must hold a chat template (SFT data is rendered through it)."""
    from megatron_prune.checkpoint import tokenizer_dir

    found = tokenizer_dir(ckpt)
    if found is None:
        raise InputError(f"{name} {ckpt} carries no tokenizer (needed for its chat template); convert the "
                         f"instruction-tuned Hugging Face model with `megatron-prune convert HF_DIR CKPT_DIR`, which "
                         f"copies its tokenizer")
    if not has_chat_template(found):
        raise InputError(f"{name} {ckpt}: its tokenizer ({found}) has no chat template; use an instruction-tuned "
                         f"checkpoint, or add chat_template to {found}/tokenizer_config.json")
    return found


def prompts(path, name: str, vocab_size: int, tok_dir, chat: bool = True) -> int:
    """A prompts file that `generate`/`specdec` can encode with this checkpoint; returns the number of prompts."""
    from megatron_prune.generation.prompts import read_prompt_records

    existing_file(path, name, 'give a .jsonl file of {"prompt"} / {"messages"} / {"tokens"} records, or a text '
                  'file with one prompt per line')
    try:
        records = read_prompt_records(path, vocab_size=vocab_size)
    except ValueError as e:
        raise InputError(f"{name} {e}") from e
    if tok_dir is None and any("tokens" not in r for r in records):
        raise InputError(f"{name} {path}: the checkpoint carries no tokenizer, so text prompts cannot be encoded; "
                         'give prompts as {"tokens": [...]} records, or convert the model again with its tokenizer')
    if any("messages" in r for r in records) and not (tok_dir is not None and has_chat_template(tok_dir)):
        raise InputError(f"{name} {path}: {{'messages'}} prompts need a chat template and the checkpoint's tokenizer "
                         f"has none; give {{'prompt'}} text (with --no-chat) instead")
    return len(records)


def score_file(path, name: str = "--scores"):
    """A megatron-prune score file (read: it is small); returns the ImportanceScores."""
    from megatron_prune.importance import ImportanceScores

    existing_file(path, name, "compute it with `megatron-prune importance` on this checkpoint (--data PREFIX --out "
                  "FILE)")
    try:
        return ImportanceScores.load(path)
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise InputError(f"{name} {path} is not a megatron-prune score file ({e}); compute it with "
                         f"`megatron-prune importance`") from e
