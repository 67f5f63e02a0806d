"""JSONL text -> Megatron indexed dataset (``.bin``/``.idx``), and the fixed windows evaluation reads back.

The indexed dataset is megatron-core's own format (``IndexedDatasetBuilder`` / ``IndexedDataset``), so the
files we write feed Megatron's ``GPTDataset`` for training and distillation unchanged. Each JSONL line is one
document: its text is tokenized without special tokens and the tokenizer's EOS is appended, so documents
stay separated when Megatron concatenates them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_prune.runtime.distributed import is_rank0

__all__ = ["IndexedInfo", "fixed_length_windows", "read_indexed_info", "tokenize_jsonl"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt")


@dataclass
class IndexedInfo:
    """What ``<prefix>.meta.json`` records: enough to tell whether cached files match their inputs."""

    source: str
    source_bytes: int
    text_key: str
    tokenizer_dir: str
    tokenizer_sha256: str
    eos_id: int | None
    add_special_tokens: bool
    dtype: str
    num_docs: int
    num_tokens: int
    seconds: float


def _tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """Hash of the tokenizer's files, so a cache built with another tokenizer is never reused."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = tokenizer_dir / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def read_indexed_info(out_prefix: str | os.PathLike) -> IndexedInfo | None:
    """The ``IndexedInfo`` written next to a finished indexed dataset, or None if there is none."""
    try:
        return IndexedInfo(**json.loads(Path(f"{out_prefix}.meta.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _load_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist; it must hold the files "
                                f"written by a Hugging Face tokenizer's save_pretrained()")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tokenize_jsonl(jsonl: str | os.PathLike, tokenizer_dir: str | os.PathLike, out_prefix: str | os.PathLike,
                   text_key: str = "text", append_eos: bool = True, add_special_tokens: bool = False,
                   batch_size: int = 256, show_progress: bool | None = None, overwrite: bool = False) -> Path:
    """Tokenize every document of a JSONL file into ``<out_prefix>.bin``/``.idx``; return ``out_prefix``.

    One indexed-dataset document per JSONL line: ``tokenizer(text, add_special_tokens=...)`` + [EOS].
    Lines are tokenized in batches (the fast tokenizer's Rust batch encoder runs them on all cores).
    A document that comes out empty is skipped. Token ids are stored as uint16 when the vocabulary allows
    (as Megatron's preprocess_data.py does), else int32.

    Cached and atomic: the files are written under a temporary prefix, renamed into place, and then a
    ``<out_prefix>.meta.json`` is written; when that matches this source and tokenizer, nothing is redone.
    ``show_progress=None`` shows a tqdm bar (bytes read, with ETA) on rank 0 when stderr is a terminal.
    """
    jsonl, tokenizer_dir, out_prefix = Path(jsonl), Path(tokenizer_dir), Path(out_prefix)
    if not jsonl.is_file():
        raise FileNotFoundError(f"{jsonl} does not exist (make it with megatron_prune.data.write_corpus_jsonl)")
    source_bytes = jsonl.stat().st_size
    fingerprint = _tokenizer_fingerprint(tokenizer_dir) if tokenizer_dir.is_dir() else ""
    old = read_indexed_info(out_prefix)
    if (not overwrite and old is not None and old.source == str(jsonl.resolve())
            and old.source_bytes == source_bytes and old.text_key == text_key
            and old.tokenizer_sha256 == fingerprint and old.add_special_tokens == add_special_tokens
            and (old.eos_id is not None) == append_eos
            and Path(f"{out_prefix}.bin").is_file() and Path(f"{out_prefix}.idx").is_file()):
        return out_prefix

    tok = _load_tokenizer(tokenizer_dir)
    eos_id = tok.eos_token_id if append_eos else None
    if append_eos and eos_id is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no eos_token; pass append_eos=False or fix the "
                         f"tokenizer config")
    dtype = DType.optimal_dtype(len(tok))
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = out_prefix.with_name(f".{out_prefix.name}.tmp{os.getpid()}")
    if show_progress is None:
        show_progress = is_rank0() and sys.stderr.isatty()

    t0 = time.perf_counter()
    num_docs = num_tokens = 0
    builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
    try:
        with open(jsonl, "rb") as f, tqdm(total=source_bytes, unit="B", unit_scale=True, disable=not show_progress,
                                          desc=f"tokenize {jsonl.name}") as bar:
            batch: list[str] = []

            def flush():
                nonlocal num_docs, num_tokens
                enc = tok(batch, add_special_tokens=add_special_tokens, return_attention_mask=False,
                          return_token_type_ids=False, verbose=False)["input_ids"]
                for ids in enc:
                    if eos_id is not None:
                        ids = ids + [eos_id]
                    if ids:
                        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                        num_docs += 1
                        num_tokens += len(ids)
                batch.clear()

            for lineno, line in enumerate(f, 1):
                bar.update(len(line))
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_key]
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{jsonl}:{lineno}: expected a JSON object with a string {text_key!r} "
                                     f"({type(e).__name__}: {e})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{jsonl}:{lineno}: {text_key!r} is {type(text).__name__}, not a string")
                batch.append(text)
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        builder.finalize(f"{tmp_prefix}.idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
        raise
    if num_docs == 0:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
        raise ValueError(f"{jsonl}: no non-empty documents")

    Path(f"{out_prefix}.meta.json").unlink(missing_ok=True)  # must not vouch for the new files
    os.replace(f"{tmp_prefix}.bin", f"{out_prefix}.bin")
    os.replace(f"{tmp_prefix}.idx", f"{out_prefix}.idx")
    info = IndexedInfo(source=str(jsonl.resolve()), source_bytes=source_bytes, text_key=text_key,
                       tokenizer_dir=str(tokenizer_dir.resolve()), tokenizer_sha256=fingerprint, eos_id=eos_id,
                       add_special_tokens=add_special_tokens, dtype=np.dtype(dtype).name, num_docs=num_docs,
                       num_tokens=num_tokens, seconds=round(time.perf_counter() - t0, 3))
    meta = Path(f"{out_prefix}.meta.json")
    tmp_meta = meta.with_name(f".{meta.name}.tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(asdict(info), indent=1) + "\n")
    os.replace(tmp_meta, meta)
    return out_prefix


def fixed_length_windows(prefix: str | os.PathLike, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive, non-overlapping windows of ``seq_len + 1`` tokens over the dataset's token stream.

    The stream is all documents concatenated in order (each already ends with EOS). Row ``i`` is
    ``stream[i*(seq_len+1) : (i+1)*(seq_len+1)]``; use ``w[:, :-1]`` as inputs and ``w[:, 1:]`` as labels.
    The incomplete tail is dropped. Returns int64 ``[n, seq_len + 1]`` with
    ``n = min(len(stream) // (seq_len + 1), max_windows)``; deterministic, reads only what it needs.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    prefix = str(prefix)
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise FileNotFoundError(f"no indexed dataset at {prefix}(.bin/.idx); make one with `megatron-prune data` "
                                f"(or megatron_prune.data.tokenize_jsonl)")
    ds = IndexedDataset(prefix)
    width = seq_len + 1
    total = int(ds.sequence_lengths.sum())
    n = total // width
    if max_windows is not None:
        n = min(n, max_windows)
    need = n * width
    out = torch.empty(need, dtype=torch.int64)
    filled = 0
    for i in range(len(ds)):
        if filled >= need:
            break
        take = min(int(ds.sequence_lengths[i]), need - filled)
        out[filled:filled + take] = torch.from_numpy(ds.get(i, 0, take).astype(np.int64))
        filled += take
    return out.view(n, width)


def count_windows(prefix: str | os.PathLike, seq_len: int) -> int:
    """How many windows :func:`fixed_length_windows` would return without a limit."""
    ds = IndexedDataset(str(prefix))  # keep it referenced: sequence_lengths is a view into its mmap
    return int(ds.sequence_lengths.sum()) // (seq_len + 1)


def read_windows(prefix: str | os.PathLike, seq_len: int, indices) -> torch.Tensor:
    """Rows ``indices`` of :func:`fixed_length_windows`, reading only those tokens (for random calibration
    samples from a large dataset). Returns int64 ``[len(indices), seq_len + 1]``."""
    ds = IndexedDataset(str(prefix))
    width = seq_len + 1
    lengths = ds.sequence_lengths.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each document
    total_windows = int(starts[-1]) // width
    out = torch.empty(len(indices), width, dtype=torch.int64)
    for row, w in enumerate(indices):
        if not 0 <= int(w) < total_windows:
            raise IndexError(f"window {w} out of range: {prefix} has {total_windows} windows of {width} tokens")
        pos, filled = int(w) * width, 0
        doc = int(np.searchsorted(starts, pos, side="right")) - 1
        while filled < width:
            offset = pos + filled - int(starts[doc])
            take = min(int(lengths[doc]) - offset, width - filled)
            if take > 0:
                out[row, filled:filled + take] = torch.from_numpy(ds.get(doc, offset, take).astype(np.int64))
                filled += take
            doc += 1
    return out


def calibration_windows(data_prefix: str | os.PathLike, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``num_samples`` random windows [n, seq_len + 1] of the data set (the paper: 1024 random training samples).

    Reads only the chosen windows, so a large training set costs no more than the samples themselves.
    """
    available = count_windows(data_prefix, seq_len)
    if available < num_samples:
        raise ValueError(f"{data_prefix} has only {available} windows of {seq_len + 1} tokens, fewer than the "
                         f"{num_samples} samples asked for; lower --samples or --seq-len, or use more data")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return read_windows(data_prefix, seq_len, order.sort().values.tolist())
