"""Megatron distributed checkpoints plus one metadata file of ours.

Layout of a checkpoint directory::

    ckpt/
      megatron_prune.json   ModelArch, dtype, tokenizer location, provenance (parent, plan, steps)
      tokenizer/            the HF tokenizer files (or a sentencepiece model), when known
      ...                   megatron dist-checkpoint files (torch_dist), loadable at any TP/PP

Writes go to a hidden sibling directory that is renamed into place once every rank has finished, so a
crash never leaves a directory that looks like a valid checkpoint. Inputs are only ever read.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.arch import ModelArch
from megatron_prune.checkpoint.outputs import replace_dir
from megatron_prune.inputs import free_output

METADATA_FILE = "megatron_prune.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or of another architecture."""


@dataclass
class CheckpointMeta:
    arch: ModelArch
    dtype: str = "float32"
    provenance: dict = field(default_factory=dict)
    has_tokenizer: bool = False

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.arch.to_dict(),
            "dtype": self.dtype,
            "tokenizer": TOKENIZER_DIR if self.has_tokenizer else None,
            "provenance": self.provenance,
        }


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def read_meta(ckpt_dir: str | os.PathLike) -> CheckpointMeta:
    """Read and check our metadata; raises CheckpointError with the fix when something is wrong."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path "
                              "(or create it with `megatron-prune convert`)")
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        hint = ""
        if (path / "config.json").is_file():
            hint = (f" It looks like a Hugging Face model: convert it first with `megatron-prune convert {path} "
                    f"CKPT_DIR` and pass CKPT_DIR.")
        elif path.name.startswith(".") and path.name.endswith(".tmp"):
            hint = " It is an unfinished write (a job died while saving); delete it and re-run."
        raise CheckpointError(f"{path} is not a megatron-prune checkpoint: {METADATA_FILE} is missing.{hint}")
    try:
        raw = json.loads(meta_path.read_text())
        arch = ModelArch.from_dict(raw["arch"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e}); restore it or re-create the checkpoint") from e
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer megatron-prune (format {raw['format_version']}); upgrade")
    if not (path / "metadata.json").is_file() or not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path} has our metadata but no megatron distributed-checkpoint files (metadata.json/.metadata); "
            "it is incomplete or corrupt: re-create it"
        )
    return CheckpointMeta(
        arch=arch,
        dtype=raw.get("dtype", "float32"),
        provenance=raw.get("provenance", {}),
        has_tokenizer=raw.get("tokenizer") is not None and tokenizer_dir(path) is not None,
    )


def tokenizer_dir(ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """The checkpoint's ``tokenizer/`` folder, or None when it carries no tokenizer."""
    from megatron_prune.checkpoint.hf import has_tokenizer

    p = Path(ckpt_dir) / TOKENIZER_DIR
    return p if has_tokenizer(p) else None


def model_chunks(model) -> list:
    """A model, or a list of model chunks (virtual pipeline stages, model.build_chunks), as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def sharded_model_state(model) -> dict:
    """megatron's sharded state of a model or of this rank's model chunks.

    Each chunk's tensors carry their global keys and layer offsets, so the files are the same at any TP/PP/VPP;
    chunks are nested under ``model{i}`` (megatron's own convention) only to keep their local names apart.
    """
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _tmp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def save_checkpoint(
    model: torch.nn.Module,
    arch: ModelArch,
    out_dir: str | os.PathLike,
    *,
    tokenizer_src: Optional[str | os.PathLike] = None,
    provenance: Optional[dict] = None,
    overwrite: bool = False,
    extra_state: Optional[dict] = None,
    extra_files: Optional[dict[str, str]] = None,
) -> Path:
    """Save ``model`` (this rank's shard, or its list of model chunks) as a distributed checkpoint; collective
    over all ranks.

    ``tokenizer_src``: a directory holding tokenizer files (HF or sentencepiece; copied into ``tokenizer/``).
    ``extra_state``: more megatron sharded state (e.g. optimizer state), saved with the model.
    ``extra_files``: {file name: text} written into the checkpoint directory (e.g. the prune plan).
    """
    from megatron_prune.checkpoint.writer import explain_write_error, write_sharded

    out = free_output(Path(out_dir).absolute(), overwrite=overwrite, error=CheckpointError)
    tmp = _tmp_dir_for(out)
    failure = None
    if _rank() == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)  # an earlier crashed write
            tmp.mkdir(parents=True)
        except OSError as e:
            failure = explain_write_error(e, out)
    _agree_or_raise(failure, out)
    state = sharded_model_state(model)
    if extra_state:
        state.update(extra_state)
    try:
        write_sharded(state, tmp)  # on failure every rank raises, together
    except BaseException:  # that failure, or a stop signal (StopRequested) in the middle
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial write would keep a full disk full
        raise
    if _rank() == 0:
        try:
            _finish(model, arch, tmp, out, tokenizer_src, provenance, extra_files)
        except BaseException as e:  # also a stop signal
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, OSError):
                raise
            failure = explain_write_error(e, out)
    _agree_or_raise(failure, out)
    return out


def _agree_or_raise(rank0_failure: Optional[str], out: Path) -> None:
    """Collective: raise CheckpointError on every rank when rank 0's step failed (instead of a barrier that the
    other ranks would wait in forever)."""
    from megatron_prune.runtime.distributed import any_rank

    if any_rank(rank0_failure is not None):
        raise CheckpointError(rank0_failure or f"writing {out} failed on rank 0 (see its message)")


def _finish(model, arch, tmp: Path, out: Path, tokenizer_src, provenance, extra_files) -> None:
    """Rank 0, after the shards: tokenizer, extra files, our metadata, then the rename into place."""
    has_tok = False
    if tokenizer_src is not None:
        from megatron_prune.checkpoint.hf import copy_tokenizer_files, has_tokenizer

        copy_tokenizer_files(tokenizer_src, tmp / TOKENIZER_DIR)
        has_tok = has_tokenizer(tmp / TOKENIZER_DIR)
    prov = dict(provenance or {})
    prov.setdefault("created", datetime.datetime.now().isoformat(timespec="seconds"))
    dtype = str(next(model_chunks(model)[0].parameters()).dtype).replace("torch.", "")
    meta = CheckpointMeta(arch=arch, dtype=dtype, provenance=prov, has_tokenizer=has_tok)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    (tmp / METADATA_FILE).write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    replace_dir(tmp, out)


def load_into(model: torch.nn.Module, ckpt_dir: str | os.PathLike, arch: Optional[ModelArch] = None,
              extra_state: Optional[dict] = None) -> dict:
    """Load a checkpoint into this rank's shard of ``model`` (or its list of model chunks), whatever layout it
    was saved at.

    When ``arch`` is given it must equal the checkpoint's; returns the loaded ``extra_state`` entries.
    """
    from megatron_prune.checkpoint.writer import read_sharded

    meta = read_meta(ckpt_dir)
    if arch is not None and arch != meta.arch:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has a different architecture (checkpoint vs expected: "
            f"{meta.arch.differences(arch)}); build the model from the checkpoint's metadata (load_model) instead"
        )
    state = sharded_model_state(model)
    chunks = model_chunks(model)
    wanted = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    if extra_state:
        state.update(extra_state)
    loaded = read_sharded(state, Path(ckpt_dir))
    extras = {k: loaded.pop(k) for k in list(extra_state or {})}
    parts = [loaded] if len(chunks) == 1 else [loaded[f"model{i}"] for i in range(len(chunks))]
    # megatron merges the checkpoint's whole common state (e.g. a trainer's) into the result: keep what we asked for
    for chunk, part, want in zip(chunks, parts, wanted):
        chunk.load_state_dict({k: v for k, v in part.items() if k in want}, strict=True)
    return extras


def load_model(ckpt_dir: str | os.PathLike, dtype: Optional[torch.dtype] = None, use_te: Optional[bool] = None):
    """Build the model described by a checkpoint at the current TP/PP and load its weights.

    Returns ``(model, meta)``; megatron's parallel state must be initialized.
    """
    from megatron.core import parallel_state as ps

    from megatron_prune.model import build_model

    meta = read_meta(ckpt_dir)
    meta.arch.check_parallel(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if dtype is None:
        dtype = getattr(torch, meta.dtype)
    model = build_model(meta.arch, dtype=dtype, use_te=use_te, perform_initialization=False)  # weights come next
    load_into(model, ckpt_dir, meta.arch)
    return model, meta
