"""`megatron-prune teacher-logits`: the teacher's top-K log-probabilities over the training samples, once.

`distill --teacher-logits DIR` then trains any number of students from DIR without running the teacher. The
samples are the trainer's: megatron's GPTDataset over the same --data blend, --seq-len, --seed and number of
samples (steps x global batch size), in the same order. Written into a hidden ``.DIR.partial`` directory chunk by
chunk (each chunk renamed into place when complete), so an interrupted run resumes where it stopped; renamed to
DIR at the end. Format: megatron_prune/distill/offline.py and docs/offline_logits.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.distill.offline import (
    METADATA_FILE,
    OPTIONS_FILE,
    VALUE_DTYPES,
    LogitsFileMeta,
    blend_key,
    bytes_per_token,
    chunk_name,
    default_chunk_samples,
    index_kind,
)
from megatron_prune.runtime.device import on_gpu
from megatron_prune.runtime.stop import StopRequested, stop_on_signals


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def check_teacher_logits(teacher, data, out, seq_len: int, top_k: int, samples: Optional[int],
                         tokens: Optional[int], dtype: str, micro_batch_size: int, tp: int, pp: int,
                         overwrite: bool):
    """Every input, before any process group or weight; returns the teacher's metadata."""
    from megatron_prune.checkpoint.outputs import check_output_path
    from megatron_prune.data.blend import parse_blend

    inputs.layout(tp, pp)
    for name, value in (("--seq-len", seq_len), ("--top-k", top_k), ("--micro-batch-size", micro_batch_size),
                        ("--samples", samples), ("--tokens", tokens)):
        inputs.positive(name, value)
    if (samples is None) == (tokens is None):
        raise inputs.InputError("give exactly one of --samples N or --tokens N (the run's steps x global batch "
                                "size samples, or its training tokens)")
    if dtype not in VALUE_DTYPES:
        raise inputs.InputError(f"--dtype {dtype!r}: choose one of {', '.join(VALUE_DTYPES)}")
    meta = inputs.checkpoint(teacher, "TEACHER")
    inputs.checkpoint_fits(meta, tp, pp, "TEACHER")
    if top_k > meta.arch.vocab_size:
        raise inputs.InputError(f"--top-k {top_k} is more than the teacher's vocabulary ({meta.arch.vocab_size})")
    items = data.split() if isinstance(data, str) else [str(d) for d in data]
    if not items:
        raise inputs.InputError("--data: give indexed dataset prefixes or a WEIGHT PREFIX blend")
    prefixes = []
    for item in items:
        try:
            float(item)
        except ValueError:
            prefixes.append(inputs.indexed_data(item, "--data"))
    parse_blend(items)
    out = inputs.output(out, "--out", overwrite=overwrite)
    check_output_path(out, {"teacher checkpoint": teacher, **{f"data {p}": p + ".bin" for p in prefixes}})
    check_output_path(partial_dir(out), {"teacher checkpoint": teacher})
    return meta


def teacher_logits(teacher: str | Path, data, out: str | Path, seq_len: int = 512, top_k: int = 32,
                   samples: Optional[int] = None, tokens: Optional[int] = None, dtype: str = "float16",
                   micro_batch_size: int = 4, seed: int = 1234, tp: int = 1, pp: int = 1, overwrite: bool = False,
                   chunk_samples: Optional[int] = None) -> dict:
    """Write ``out``: the top-``top_k`` log-probabilities of ``teacher`` for the first ``samples`` (or
    ``ceil(tokens / seq_len)``) training samples of ``data``; returns the metadata written."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_prune.checkpoint import load_model, tokenizer_dir
    from megatron_prune.checkpoint.outputs import write_json_atomic
    from megatron_prune.data.blend import build_train_dataset
    from megatron_prune.distill.offline import write_teacher_chunks
    from megatron_prune.runtime import barrier, init_distributed, is_rank0, log0
    from megatron_prune.runtime.progress import progress

    t_meta = check_teacher_logits(teacher, data, out, seq_len, top_k, samples, tokens, dtype, micro_batch_size,
                                  tp, pp, overwrite)
    out = Path(out)
    vocab = t_meta.arch.vocab_size
    num_samples = samples if samples is not None else -(-tokens // seq_len)
    tok_dir = tokenizer_dir(teacher)
    eod = 0
    if tok_dir is not None:
        import transformers

        eod = transformers.AutoTokenizer.from_pretrained(tok_dir).eos_token_id or 0
    meta = LogitsFileMeta(
        teacher=str(Path(teacher).absolute()), vocab_size=vocab, top_k=top_k, dtype=dtype,
        index_dtype=index_kind(vocab), seq_len=seq_len, seed=seed, data=blend_key(data), num_samples=num_samples,
        chunk_samples=chunk_samples or default_chunk_samples(seq_len, top_k, dtype, vocab),
        tokenizer=str(tok_dir.absolute()) if tok_dir is not None else None, eod=eod,
        teacher_arch=t_meta.arch.describe())
    partial = partial_dir(out)
    options = partial / OPTIONS_FILE
    if options.is_file() and json.loads(options.read_text()) != meta.options():
        raise inputs.InputError(f"{partial} holds an unfinished teacher-logits write with other options "
                                f"({options}); run the command with those options to finish it, or delete {partial}")

    layout = init_distributed(tp, pp, seed=seed)
    if is_rank0():
        partial.mkdir(parents=True, exist_ok=True)
        write_json_atomic(options, meta.options())
    barrier()
    model, _ = load_model(teacher, dtype=torch.bfloat16 if on_gpu() else torch.float32)
    dataset = build_train_dataset(data, seq_len, num_samples, seed, eod, cache_dir=partial / "dataset_cache")
    if len(dataset) < num_samples:
        raise ValueError(f"the data yields {len(dataset)} samples of {seq_len} tokens, fewer than {num_samples}")
    box = [[c for c in range(meta.num_chunks) if (partial / chunk_name(c)).is_file()] if is_rank0() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    done = set(box[0])
    todo = [c for c in range(meta.num_chunks) if c not in done]
    mine = todo[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
    bar = progress(num_samples, "teacher-logits", unit="seq")
    bar.update(sum(meta.chunk_range(c)[1] - meta.chunk_range(c)[0] for c in done))
    try:
        with stop_on_signals(immediate=True):  # before the log line: whoever reads it may signal at once
            log0(f"teacher-logits: top-{top_k} log-probs ({dtype}) of {teacher} ({t_meta.arch.describe()}) on "
                 f"{num_samples} x {seq_len} tokens of {' '.join(meta.data)} (seed {seed}), TP={tp} PP={pp} "
                 f"DP={layout.dp}, {meta.num_chunks} chunks" + (f", {len(done)} already written" if done else ""))
            write_teacher_chunks(model, t_meta.arch, dataset, meta, partial, mine, micro_batch_size, bar=bar)
    except StopRequested as e:  # finished chunks stay: the same command continues from them
        raise StopRequested(e.reason, saved=partial) from None
    finally:
        bar.close()
    barrier()
    meta.written_at = {"tp": tp, "pp": pp, "dp": layout.dp}
    if is_rank0():
        missing = [chunk_name(c) for c in range(meta.num_chunks) if not (partial / chunk_name(c)).is_file()]
        if missing:
            raise RuntimeError(f"chunks {missing[:3]} were not written to {partial}; run the command again")
        shutil.rmtree(partial / "dataset_cache", ignore_errors=True)
        write_json_atomic(partial / METADATA_FILE, meta.to_dict())
        options.unlink()
        if out.exists():  # --overwrite (checked above)
            shutil.rmtree(out)
        partial.rename(out)
        stored = sum(f.stat().st_size for f in out.glob("chunk_*.npz"))
        n_tokens = num_samples * seq_len
        log0(f"wrote {out}: {stored / 2**20:.1f} MiB, {stored / n_tokens:.1f} bytes/token on disk "
             f"({bytes_per_token(meta):.0f} uncompressed; full {vocab}-vocab fp16 logits: {2 * vocab} bytes/token)")
    barrier()
    return meta.to_dict()
