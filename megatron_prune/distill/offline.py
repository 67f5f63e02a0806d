"""Offline logit distillation: the teacher's top-K log-probabilities per token, written once, read by the trainer.

A directory of chunk files plus ``metadata.json`` (format in docs/offline_logits.md):

* ``chunk_NNNNNN.npz`` (numpy, deflate-compressed) holds training samples ``[c * chunk_samples, ...)`` of the
  exact sample order the trainer uses (megatron's GPTDataset with the same data, seq_len, seed and number of
  samples): ``logprobs [n, s, K]`` (float16 / float32, or bfloat16 stored as its uint16 bit pattern), ``ids``
  ``[n, s, K]`` (packed: uint16 for vocabularies up to 65536, 3 little-endian bytes up to 2**24, else int32),
  ``tokens [n, s]`` (packed the same way: the inputs, so a run on other data is caught) and ``first_sample``.
* The K entries of a token are its teacher's top-K by logit over the real vocabulary (padding rows excluded),
  sorted by decreasing value; ``logprobs`` are ``log_softmax`` over the whole vocabulary at those ids (tau 1),
  so ``1 - sum(exp(logprobs))`` is the teacher's tail mass outside the top-K.

The KD loss from the file is :func:`megatron_prune.distill.losses.topk_kl_at`, the function the online top-K
loss calls: both sides renormalised over the K ids (NeMo-Aligner's top-K KD does the same); a per-token shift
cancels in that softmax, so log-probabilities give the online loss exactly at every temperature.

Nothing here gathers the vocabulary: the top-K is a local top-K per TP shard and a top-K of the all-gathered
``tp * K`` candidates (:func:`teacher_topk`); the log-softmax normaliser is an all-reduce of max and sum-exp.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

FORMAT = "megatron-prune/teacher-logits"
VERSION = 1
METADATA_FILE = "metadata.json"
OPTIONS_FILE = "options.json"  # in an unfinished directory: what it is being written with (for resuming)
VALUE_DTYPES = ("float16", "bfloat16", "float32")
CHUNK_BYTES = 64 << 20  # target uncompressed size of one chunk (what a reader holds in memory per chunk)


# --------------------------------------------------------------------------------------------------------
# the numbers: global top-K log-probabilities of vocab-parallel logits
# --------------------------------------------------------------------------------------------------------
def topk_logprobs(logits: torch.Tensor, k: int, *, vocab_size: Optional[int] = None, group=None):
    """``(logprobs, ids)`` ``[..., k]``: the global top-``k`` of this rank's vocab shard ``[..., V_padded/tp]``
    and ``log_softmax`` over the real vocabulary at those ids, float32, sorted by decreasing value, identical
    on every TP rank. Only ``k`` candidates per token and rank and two scalars per token are communicated."""
    from megatron_prune.distill.losses import teacher_topk, tp_all_reduce, tp_group_rank_world, valid_columns

    vals, ids = teacher_topk(logits, k, vocab_size=vocab_size, group=group)
    group, rank, world = tp_group_rank_world(group)
    x = logits.detach().float()
    n_valid = valid_columns(x.shape[-1], rank, vocab_size)
    if n_valid < x.shape[-1]:
        x = x.clone()
        x[..., n_valid:] = float("-inf")
    m = x.amax(-1)
    tp_all_reduce(m, group, world, dist.ReduceOp.MAX)  # a shard of padding only has -inf: the max is global
    sum_exp = (x - m.unsqueeze(-1)).exp().sum(-1, dtype=torch.float64)
    tp_all_reduce(sum_exp, group, world)
    lse = m.double() + sum_exp.log()
    return (vals.double() - lse.unsqueeze(-1)).float(), ids


def index_kind(vocab_size: int) -> str:
    """The smallest stored integer type that holds ids ``< vocab_size``: uint16, uint24 (3 bytes) or int32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint24" if vocab_size <= 1 << 24 else "int32"


def index_bytes(kind: str) -> int:
    return {"uint16": 2, "uint24": 3, "int32": 4}[kind]


def pack_ids(ids: np.ndarray, kind: str) -> np.ndarray:
    ids = np.asarray(ids)
    if kind == "uint24":
        return ids.astype("<u4").view(np.uint8).reshape(*ids.shape, 4)[..., :3].copy()
    return ids.astype("<u2" if kind == "uint16" else "<i4")


def unpack_ids(packed: np.ndarray, kind: str) -> np.ndarray:
    if kind == "uint24":
        wide = np.zeros((*packed.shape[:-1], 4), dtype=np.uint8)
        wide[..., :3] = packed
        return wide.view("<u4")[..., 0].astype(np.int64)
    return packed.astype(np.int64)


def encode_values(values: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: its bit pattern as uint16
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    # log-probabilities are <= 0; the finite floor keeps float16 away from -inf
    return values.clamp_min(-60000.0).to(getattr(torch, dtype)).numpy()


def decode_values(stored: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(np.asarray(stored)).float()


# --------------------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------------------
@dataclass
class LogitsFileMeta:
    teacher: str  # absolute path of the teacher checkpoint
    vocab_size: int  # real vocabulary (ids are < vocab_size)
    top_k: int
    dtype: str  # of the stored log-probabilities: float16 | bfloat16 | float32
    index_dtype: str  # uint16 | uint24 | int32
    seq_len: int
    seed: int
    data: list  # the blend as given to the trainer, prefixes made absolute (weights kept)
    num_samples: int
    chunk_samples: int
    tokenizer: Optional[str] = None  # the teacher's tokenizer directory (None: the checkpoint has none)
    eod: int = 0
    teacher_arch: str = ""
    written_at: dict = dataclasses.field(default_factory=dict)  # {"tp":, "pp":, "dp":} of the writing run
    format: str = FORMAT
    version: int = VERSION

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_samples)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_samples, min(self.num_samples, (c + 1) * self.chunk_samples)

    def options(self) -> dict:
        """What decides the file's content (a resumed write must match it)."""
        d = dataclasses.asdict(self)
        for key in ("written_at", "teacher_arch", "tokenizer"):
            d.pop(key)
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LogitsFileMeta":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def chunk_name(c: int) -> str:
    return f"chunk_{c:06d}.npz"


def default_chunk_samples(seq_len: int, k: int, dtype: str, vocab_size: int) -> int:
    per_sample = seq_len * (k * (np.dtype(dtype if dtype != "bfloat16" else "uint16").itemsize
                                 + index_bytes(index_kind(vocab_size))) + index_bytes(index_kind(vocab_size)))
    return max(1, CHUNK_BYTES // per_sample)


def blend_key(data: Sequence[str] | str) -> list[str]:
    """The blend with its prefixes made absolute (weights as written), to compare a run with a file."""
    items = data.split() if isinstance(data, str) else [str(d) for d in data]
    out = []
    for item in items:
        try:
            float(item)
            out.append(item)
        except ValueError:
            out.append(str(Path(item).absolute()))
    return out


def bytes_per_token(meta: LogitsFileMeta) -> float:
    """Uncompressed bytes per token of the stored arrays (log-probs + ids + the input token)."""
    idx = index_bytes(meta.index_dtype)
    val = 2 if meta.dtype in ("float16", "bfloat16") else 4
    return meta.top_k * (val + idx) + idx


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------
def write_chunk(directory: Path, c: int, first_sample: int, logprobs: torch.Tensor, ids: torch.Tensor,
                tokens: torch.Tensor, meta: LogitsFileMeta) -> Path:
    """One chunk, written to a hidden temporary file and renamed: a chunk that exists is complete."""
    from megatron_prune.checkpoint.outputs import follow_umask

    path = directory / chunk_name(c)
    tmp = directory / f".{chunk_name(c)}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, logprobs=encode_values(logprobs, meta.dtype),
                                ids=pack_ids(ids.numpy(), meta.index_dtype),
                                tokens=pack_ids(tokens.numpy(), meta.index_dtype), first_sample=np.int64(first_sample))
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:  # also a stop signal (StopRequested) in the middle: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


@torch.no_grad()
def write_teacher_chunks(model: torch.nn.Module, arch, dataset, meta: LogitsFileMeta, directory: Path,
                         chunks: Sequence[int], micro_batch_size: int, bar=None) -> None:
    """Run the teacher over the samples of ``chunks`` (this data-parallel rank's share) and write each chunk.

    Collective over this rank's model-parallel group: every TP/PP rank of one data-parallel replica calls it
    with the same chunks. The last pipeline stage's TP rank 0 writes.
    """
    from megatron.core import parallel_state as ps

    from megatron_prune.data.blend import collate
    from megatron_prune.forward import run_forward

    model.eval()
    device = next(model.parameters()).device
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    dp = ps.get_data_parallel_world_size()

    def on_output(logits, batch):
        logprobs, ids = topk_logprobs(logits, meta.top_k, vocab_size=meta.vocab_size)
        return logprobs.cpu(), ids.cpu()

    for c in chunks:
        lo, hi = meta.chunk_range(c)
        batches = [collate([dataset[i] for i in range(s, min(hi, s + micro_batch_size))])
                   for s in range(lo, hi, micro_batch_size)]
        tokens = torch.cat([b["tokens"] for b in batches])
        batches = [{"tokens": b["tokens"].to(device)} for b in batches]
        # megatron's schedule wants equal micro-batches: a short last one gets a call of its own
        full = [b for b in batches if len(b["tokens"]) == micro_batch_size]
        results = []
        for part in ([full] if full else []) + [[b] for b in batches[len(full):]]:
            results += run_forward(model, part, len(part), meta.seq_len, len(part[0]["tokens"]), on_output)
        if writer:
            write_chunk(directory, c, lo, torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results]),
                        tokens, meta)
        if bar is not None:
            bar.update((hi - lo) * dp)


# --------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------
class TeacherLogitsError(ValueError):
    """A teacher-logits directory is missing, unfinished, or does not match the run; the message says the fix."""


def read_meta(directory) -> LogitsFileMeta:
    d = Path(directory)
    if not d.is_dir():
        raise TeacherLogitsError(f"--teacher-logits {d} does not exist; write it first with `megatron-prune "
                                 f"teacher-logits TEACHER --data ... --out {d}`")
    meta_path = d / METADATA_FILE
    if not meta_path.is_file():
        hint = (" (an unfinished write: run the same `teacher-logits` command again to finish it)"
                if (d / OPTIONS_FILE).is_file() else "")
        raise TeacherLogitsError(f"--teacher-logits {d} has no {METADATA_FILE}: not a finished teacher-logits "
                                 f"directory{hint}; write one with `megatron-prune teacher-logits`")
    raw = json.loads(meta_path.read_text())
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise TeacherLogitsError(f"--teacher-logits {d}: {METADATA_FILE} is not a {FORMAT} v{VERSION} file "
                                 f"(format {raw.get('format')!r} v{raw.get('version')}); rewrite it with this version")
    meta = LogitsFileMeta.from_dict(raw)
    missing = [chunk_name(c) for c in range(meta.num_chunks) if not (d / chunk_name(c)).is_file()]
    if missing:
        raise TeacherLogitsError(f"--teacher-logits {d} lacks {len(missing)} chunk file(s) ({missing[0]} ...); "
                                 f"rewrite it with `megatron-prune teacher-logits`")
    return meta


def check_run(meta: LogitsFileMeta, directory, *, data, seq_len: int, seed: int, num_samples: int,
              vocab_size: int, top_k: Optional[int]) -> None:
    """The file serves a run: same vocabulary, data, seq_len, seed, and enough samples and K."""
    d = directory
    fix = f"rewrite it with `megatron-prune teacher-logits {meta.teacher} --out NEW_DIR` and the run's options"
    if meta.vocab_size != vocab_size:
        raise TeacherLogitsError(f"--teacher-logits {d} was written for a vocabulary of {meta.vocab_size} tokens, "
                                 f"the student has {vocab_size}; distill between models of one tokenizer")
    if meta.seq_len != seq_len:
        raise TeacherLogitsError(f"--teacher-logits {d} holds windows of --seq-len {meta.seq_len}, the run uses "
                                 f"{seq_len}; pass --seq-len {meta.seq_len} or {fix} (--seq-len {seq_len})")
    if blend_key(data) != meta.data:
        raise TeacherLogitsError(f"--teacher-logits {d} was written on --data {' '.join(meta.data)}, the run "
                                 f"uses --data {' '.join(blend_key(data))}; pass that data or {fix}")
    if meta.seed != seed:
        raise TeacherLogitsError(f"--teacher-logits {d} was written with --seed {meta.seed} (the sample order), "
                                 f"the run uses {seed}; pass --seed {meta.seed} or {fix}")
    if meta.num_samples < num_samples:
        raise TeacherLogitsError(f"--teacher-logits {d} holds {meta.num_samples} samples, the run needs "
                                 f"{num_samples} (steps x global batch size); lower --steps/--tokens or {fix} "
                                 f"(--samples {num_samples})")
    if top_k is not None and top_k > meta.top_k:
        raise TeacherLogitsError(f"--kd-top-k {top_k} is more than the {meta.top_k} tokens per position stored in "
                                 f"--teacher-logits {d}; pass --kd-top-k {meta.top_k} or less, or {fix} "
                                 f"(--top-k {top_k})")


class TeacherLogitsFile:
    """Random access by global sample index, keeping the last few chunks in memory."""

    def __init__(self, directory, cached_chunks: int = 2):
        self.dir = Path(directory)
        self.meta = read_meta(self.dir)
        self._cache: dict[int, dict] = {}
        self._cached_chunks = cached_chunks

    def _chunk(self, c: int, members: Sequence[str]) -> dict:
        entry = self._cache.pop(c, None) or {}
        missing = [m for m in members if m not in entry]
        if missing:
            with np.load(self.dir / chunk_name(c)) as z:
                for m in missing:
                    entry[m] = z[m]
        self._cache[c] = entry  # most recent last
        while len(self._cache) > self._cached_chunks:
            self._cache.pop(next(iter(self._cache)))
        return entry

    def _rows(self, indices: Sequence[int], member: str) -> list[np.ndarray]:
        n = self.meta.num_samples
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise TeacherLogitsError(f"sample {bad[0]} is beyond the {n} samples of --teacher-logits {self.dir}")
        cs = self.meta.chunk_samples
        return [self._chunk(i // cs, [member])[member][i % cs] for i in indices]

    def tokens(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(unpack_ids(np.stack(self._rows(indices, "tokens")), self.meta.index_dtype))

    def topk(self, indices: Sequence[int], k: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs float32, ids int64)`` ``[len(indices), seq_len, k]`` (k: the first k of the stored K)."""
        k = k or self.meta.top_k
        values = decode_values(np.stack([r[..., :k] for r in self._rows(indices, "logprobs")]), self.meta.dtype)
        ids = unpack_ids(np.stack([r[..., :k, :] if self.meta.index_dtype == "uint24" else r[..., :k]
                                   for r in self._rows(indices, "ids")]), self.meta.index_dtype)
        return values, torch.from_numpy(ids)

    def check_tokens(self, indices: Sequence[int], tokens: torch.Tensor) -> None:
        """The run's input tokens of these samples are the ones the file was written on."""
        stored = self.tokens(indices)
        if not torch.equal(stored, tokens.cpu().to(stored.dtype)):
            bad = next(i for i, (a, b) in zip(indices, zip(stored, tokens.cpu())) if not torch.equal(a, b.to(a.dtype)))
            raise TeacherLogitsError(f"training sample {bad} holds other tokens than sample {bad} of --teacher-logits "
                                     f"{self.dir}: the file was written on other data (or another dataset build); "
                                     f"rewrite it with `megatron-prune teacher-logits` on this run's --data")

    def check_dataset(self, dataset, needed: int) -> None:
        """The run's dataset gives the file's tokens (first and last sample the run uses), before training."""
        from megatron_prune.data.blend import collate

        for i in sorted({0, needed - 1}):
            self.check_tokens([i], collate([dataset[i]])["tokens"])

    def attach(self, batches: list[dict], first_sample: int, k: Optional[int] = None) -> None:
        """Add ``teacher_logprobs`` / ``teacher_ids`` ``[b, s, k]`` to the micro-batches of consecutive samples
        starting at ``first_sample`` (what Trainer._microbatches builds), checking their tokens."""
        start = first_sample
        for batch in batches:
            indices = list(range(start, start + len(batch["tokens"])))
            self.check_tokens(indices, batch["tokens"])
            logprobs, ids = self.topk(indices, k)
            batch["teacher_logprobs"] = logprobs.to(batch["tokens"].device)
            batch["teacher_ids"] = ids.to(batch["tokens"].device)
            start += len(indices)


def open_for_run(cfg, vocab_size: int) -> TeacherLogitsFile:
    """The --teacher-logits directory of a TrainConfig, checked against the run."""
    from megatron_prune.data.sft import is_sft_data

    if is_sft_data(cfg.data):
        raise TeacherLogitsError("--teacher-logits works with Megatron indexed --data (pretraining-style samples); "
                                 "for SFT JSONL data use --teacher")
    file = TeacherLogitsFile(cfg.teacher_logits)
    check_run(file.meta, cfg.teacher_logits, data=cfg.data, seq_len=cfg.seq_len, seed=cfg.seed,
              num_samples=cfg.train_steps() * cfg.global_batch_size, vocab_size=vocab_size, top_k=cfg.kd_top_k)
    return file


def offline_topk_kl(student_logits: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, *,
                    tau_sq_scale: bool = True, group=None) -> torch.Tensor:
    """Per-token top-K KL of vocab-parallel student logits ``[b, s, V/tp]`` against stored teacher top-K
    log-probabilities ``[b, s, k]`` at ids ``[b, s, k]``: the online :func:`topk_kl`, without the teacher."""
    from megatron_prune.distill.losses import topk_kl_at

    return topk_kl_at(student_logits, logprobs.to(student_logits.device), ids.to(student_logits.device), tau,
                      tau_sq_scale=tau_sq_scale, group=group)
