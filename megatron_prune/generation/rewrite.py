"""Self-data distillation (arXiv 2410.09982): the unpruned model rewrites an SFT set in its own words.

For every (instruction, answer) pair the teacher sees, through its own chat template, the instruction and the
original answer as a reference and writes its own response. A rewrite replaces the original answer only when
it passes the filters: not truncated or empty, does not talk about the reference (the SDFT phrases), and, for
checkable tasks (records with an integer ``answer``), has the right final answer. Otherwise the original
answer is kept (or the example dropped, with ``on_reject="drop"``).

The work is cut into chunks of consecutive examples; each finished chunk is written atomically to
``OUT.parts/``, so an interrupted run continues at the first missing chunk and never loses or duplicates an
example. All ranks generate every chunk together (data-parallel replicas split its prompts).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from megatron_prune.data.sft import final_answer, prompt_ids, to_messages, write_jsonl
from megatron_prune.inputs import free_output

SYSTEM_PROMPT = ("Below is an instruction and a reference answer. Using the reference answer as a guide, "
                 "write your own response.")
REFERENCE_PHRASES = ("reference answer", "your response", "my response", "your own response", "now it's your turn")
RULES = ("rewritten", "truncated", "empty", "mentions_reference", "wrong_answer", "too_long")


def rewrite_messages(record: dict) -> list[dict]:
    """The teacher's prompt: the system prompt, then the (last) instruction and the original answer."""
    msgs = to_messages(record)
    instruction = next(m["content"] for m in reversed(msgs[:-1]) if m["role"] == "user") \
        if any(m["role"] == "user" for m in msgs[:-1]) else ""
    user = f"Instruction:\n{instruction}\n\nReference answer:\n{msgs[-1]['content']}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def judge(text: str, finished: bool, record: dict) -> str:
    """``"rewritten"`` when the rewrite may replace the original answer, else the name of the rule it fails."""
    if not finished:
        return "truncated"
    if not text.strip():
        return "empty"
    low = text.lower()
    if any(p in low for p in REFERENCE_PHRASES) or low.lstrip().startswith("your turn"):
        return "mentions_reference"
    if isinstance(record.get("answer"), int) and final_answer(text) != record["answer"]:
        return "wrong_answer"
    return "rewritten"


def with_answer(record: dict, text: str) -> dict:
    """A copy of ``record`` whose (last) answer is ``text``, in the record's own form."""
    out = dict(record)
    if "messages" in record:
        out["messages"] = [dict(m) for m in record["messages"]]
        out["messages"][-1]["content"] = text
    else:
        out["output"] = text
    return out


def decide(record: dict, new_tokens: Optional[list[int]], tokenizer, stop_ids: Sequence[int],
           on_reject: str = "original") -> tuple[Optional[dict], str]:
    """(record to write or None, rule) for one example from the teacher's generated tokens (None: not generated)."""
    if new_tokens is None:
        rule = "too_long"
    else:
        finished = bool(new_tokens) and new_tokens[-1] in stop_ids
        text = tokenizer.decode(new_tokens[:-1] if finished else new_tokens, skip_special_tokens=True).strip()
        rule = judge(text, finished, record)
        if rule == "rewritten":
            return with_answer(record, text), rule
    return (record if on_reject == "original" else None), rule


def _fingerprint(records: list[dict], settings: dict) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in records:
        h.update(json.dumps(r, sort_keys=True).encode())
    return h.hexdigest()


def _rewrite_chunk(model, arch, tokenizer, records: list[dict], start: int, chunk_size: int, params, stop_ids,
                   pad: int, batch_size: int, on_reject: str, parts: Path) -> None:
    """Generate the rewrites of the chunk starting at example ``start`` (every rank); rank 0 writes it atomically."""
    import dataclasses

    from megatron_prune.generation import generate
    from megatron_prune.runtime import is_rank0

    chunk = records[start: start + chunk_size]
    prompts = [prompt_ids(tokenizer, rewrite_messages(r)) for r in chunk]
    fits = [i for i, p in enumerate(prompts) if len(p) + params.max_new_tokens <= arch.max_position_embeddings]
    gen = {}
    if fits:
        outs = generate(model, arch, [prompts[i] for i in fits], dataclasses.replace(params, seed=params.seed + start),
                        stop_token_ids=stop_ids, pad_token_id=pad, batch_size=batch_size, desc=None)
        gen = dict(zip(fits, outs))
    if is_rank0():
        lines = []
        for i, rec in enumerate(chunk):
            kept, rule = decide(rec, gen.get(i), tokenizer, stop_ids, on_reject)
            lines.append({"index": start + i, "rule": rule, "record": kept})
        write_jsonl(lines, parts / f"chunk_{start:09d}.jsonl")


def _assemble(records: list[dict], starts: list[int], parts: Path, out: Path, stats_path: Path,
              on_reject: str) -> dict:
    """Rank 0: the finished chunks, in example order, into ``out`` and ``stats_path``; then remove ``parts``."""
    from megatron_prune.runtime import log0

    rules: Counter = Counter()
    written = []
    for s in starts:
        for line in (parts / f"chunk_{s:09d}.jsonl").read_text().splitlines():
            item = json.loads(line)
            rules[item["rule"]] += 1
            if item["record"] is not None:
                written.append(item["record"])
    rejected = len(records) - rules["rewritten"]
    stats = {"examples": len(records), "written": len(written), "rewritten": rules["rewritten"],
             "original": rejected if on_reject == "original" else 0,
             "dropped": rejected if on_reject == "drop" else 0,
             "by_rule": {r: rules[r] for r in RULES}}
    write_jsonl(written, out)
    tmp = stats_path.with_name(f".{stats_path.name}.tmp")
    tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(tmp, stats_path)
    shutil.rmtree(parts)
    log0(f"wrote {out}: {json.dumps(stats)}")
    return stats


def self_distill(model, arch, tokenizer, records: list[dict], out: str | os.PathLike, params,
                 chunk_size: int = 64, batch_size: int = 8, on_reject: str = "original",
                 settings: Optional[dict] = None, overwrite: bool = False) -> dict:
    """Rewrite ``records`` with ``model`` (every rank calls this); writes ``out`` and ``out``.stats.json.

    Returns the statistics: examples, written, rewritten (rewrite kept), original (original answer kept),
    dropped, and the count per rule.

    On SIGTERM/SIGINT/SIGUSR1 the chunk in flight is finished and written, then every rank raises
    StopRequested (exit code 75): finishing loses nothing, while abandoning it would throw away up to a whole
    chunk of generation for no gain, since a grace period that runs out (SIGKILL) loses exactly that chunk
    anyway and its atomic write never leaves half of it. A second signal is not caught (stops at once). The
    ranks agree after every chunk (one all-reduce), so they stop after the same chunk; a signal during the last
    chunk lets the run finish.
    """
    import torch.distributed as dist

    from megatron_prune.data.sft import end_of_turn_ids
    from megatron_prune.runtime import barrier, is_rank0, log0
    from megatron_prune.runtime.progress import progress
    from megatron_prune.runtime.stop import StopRequested, stop_on_signals

    if on_reject not in ("original", "drop"):
        raise ValueError(f"on_reject must be 'original' or 'drop', got {on_reject!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out = free_output(out, overwrite=overwrite)
    stats_path = out.with_name(out.stem + ".stats.json")
    parts = out.with_name(out.name + ".parts")
    fingerprint = _fingerprint(records, {**(settings or {}), "params": vars(params), "chunk_size": chunk_size,
                                         "on_reject": on_reject, "system": SYSTEM_PROMPT})
    stamp = parts / "fingerprint"
    if stamp.is_file() and stamp.read_text() != fingerprint:  # every rank checks: all raise together
        raise ValueError(f"{parts} holds chunks of a run with other data or settings; delete it to start over")
    if is_rank0():
        parts.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)
    barrier()

    stop_ids = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = list(range(0, len(records), chunk_size))
    todo = [s for s in starts if not (parts / f"chunk_{s:09d}.jsonl").is_file()]
    log0(f"self-distillation: {len(records)} examples in {len(starts)} chunks, {len(starts) - len(todo)} done already")
    bar = progress(len(starts), "selfdistill", unit="chunk")
    bar.update(len(starts) - len(todo))
    with stop_on_signals() as stop:  # also over the assembly below: a signal then is too late to stop anything
        for s in todo:
            _rewrite_chunk(model, arch, tokenizer, records, s, chunk_size, params, stop_ids, pad, batch_size,
                           on_reject, parts)
            bar.update(1)
            signal_name = stop.agreed() if s != todo[-1] else None  # every rank, every chunk: they stop together
            if signal_name is not None:
                bar.close()
                kept = starts[:starts.index(s) + 1]  # chunks run in order: the finished ones are a prefix
                examples = sum(len(records[c: c + chunk_size]) for c in kept)
                raise StopRequested(signal_name, saved=parts, at=f"after {len(kept)} of {len(starts)} chunks "
                                                                 f"({examples} of {len(records)} examples)")
        bar.close()
        barrier()
        stats = _assemble(records, starts, parts, out, stats_path, on_reject) if is_rank0() else {}
    barrier()
    if dist.is_initialized():
        box = [stats]
        dist.broadcast_object_list(box, src=0)
        stats = box[0]
    return stats
