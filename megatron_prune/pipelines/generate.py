"""`megatron-prune generate`: completions for a file of prompts, at any TP/PP (DP splits the prompts)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.runtime.stop import stop_on_signals


def load_tokenizer(ckpt):
    from transformers import AutoTokenizer

    from megatron_prune.checkpoint import tokenizer_dir

    tok_dir = tokenizer_dir(ckpt)
    return AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir is not None else None


def encode_file(prompts_file, tokenizer, chat: bool = True) -> tuple[list[dict], list[list[int]]]:
    from megatron_prune.generation.prompts import encode_prompt, read_prompt_records

    records = read_prompt_records(prompts_file)
    if tokenizer is None and any("tokens" not in r for r in records):
        raise ValueError("the checkpoint carries no tokenizer: give prompts as {\"tokens\": [...]} records")
    return records, [encode_prompt(r, tokenizer, chat) for r in records]


def write_jsonl_atomic(rows: list[dict], out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.rename(out)
    except BaseException:  # also a stop signal (StopRequested) in the middle: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return out


def check_generate(ckpt, prompts_file, out, tp: int, pp: int, batch_size: int, chat: bool = True) -> None:
    """Every input of `generate`, before any process group, tokenizer or weight."""
    from megatron_prune.checkpoint import tokenizer_dir

    inputs.layout(tp, pp)
    inputs.positive("--batch-size", batch_size)
    meta = inputs.checkpoint(ckpt)
    inputs.checkpoint_fits(meta, tp, pp)
    inputs.prompts(prompts_file, "--prompts", meta.arch.vocab_size, tokenizer_dir(ckpt), chat)
    check_output_path(out, {"checkpoint": ckpt, "prompts file": prompts_file})
    inputs.output(out, "--out", overwrite=False, kind="file")


@stop_on_signals(immediate=True)  # nothing worth resuming: a stop signal ends it, the output is never half-written
def generate_file(ckpt, prompts_file, out, params, tp: int = 1, pp: int = 1, batch_size: int = 8,
                  use_cache: bool = True, chat: bool = True, stop: Optional[list[int]] = None) -> dict:
    import time

    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import generate
    from megatron_prune.generation.prompts import stop_token_ids
    from megatron_prune.runtime import init_distributed, is_rank0, log0

    check_generate(ckpt, prompts_file, out, tp, pp, batch_size, chat)
    tokenizer = load_tokenizer(ckpt)
    records, prompts = encode_file(prompts_file, tokenizer, chat)
    stops = stop if stop is not None else stop_token_ids(tokenizer)
    init_distributed(tp, pp)
    model, meta = load_model(ckpt, use_te=False)
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    log0(f"generating for {len(prompts)} prompts with {ckpt} ({meta.arch.describe()}), stop tokens {stops}")
    start = time.time()
    outs = generate(model, meta.arch, prompts, params, stops, pad_token_id=pad, batch_size=batch_size,
                    use_cache=use_cache)
    seconds = time.time() - start
    rows = []
    for i, (rec, p, o) in enumerate(zip(records, prompts, outs, strict=True)):
        finished = bool(o) and o[-1] in stops
        text = tokenizer.decode(o[:-1] if finished else o, skip_special_tokens=True) if tokenizer else None
        rows.append({"index": i, **{k: v for k, v in rec.items() if k != "tokens"}, "prompt_tokens": len(p),
                     "completion": text, "tokens": o, "finished": finished})
    if is_rank0():
        write_jsonl_atomic(rows, out)
    n = sum(len(o) for o in outs)
    return {"written": str(out), "prompts": len(prompts), "new_tokens": n, "seconds": round(seconds, 2),
            "tokens_per_s": round(n / max(seconds, 1e-9), 1)}
