"""Prompts from files, rendered through a checkpoint's chat template, and the tokens that end a turn."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def read_prompt_records(path: str | os.PathLike, vocab_size: Optional[int] = None) -> list[dict]:
    """JSONL of {"prompt"}, {"messages"} or {"tokens"} records, or plain text (one prompt per line).

    SFT records are prompts too, so a held-out SFT file can be generated from as it is: {"instruction",
    "input"?} becomes the user turn, and a {"messages"} conversation that ends with the assistant's answer is
    cut before it. Errors name FILE:LINE; ``vocab_size``: token ids must lie below it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    records = []
    fix = 'one JSON object per line: {"prompt": TEXT}, {"messages": [...]}, {"tokens": [IDS]} or {"instruction": TEXT}'
    for n, ln in enumerate(path.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        if path.suffix in (".jsonl", ".json") or ln.lstrip().startswith("{"):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e}); write {fix}") from e
            if not isinstance(rec, dict) or not any(k in rec for k in ("prompt", "messages", "tokens", "instruction")):
                raise ValueError(f"{path}:{n}: has none of the keys prompt / messages / tokens / instruction; "
                                 f"write {fix}")
            if "tokens" in rec:
                tokens = rec["tokens"]
                if not isinstance(tokens, list) or not tokens or not all(type(t) is int and t >= 0 for t in tokens):
                    raise ValueError(f"{path}:{n}: 'tokens' must be a non-empty list of token ids (integers >= 0)")
                if vocab_size is not None and max(tokens) >= vocab_size:
                    raise ValueError(f"{path}:{n}: token id {max(tokens)} is outside the model's vocabulary of "
                                     f"{vocab_size}; encode the prompt with this model's tokenizer")
            elif "prompt" in rec and not (isinstance(rec["prompt"], str) and rec["prompt"]):
                raise ValueError(f"{path}:{n}: 'prompt' must be a non-empty string")
            records.append(_as_prompt(rec))
        else:
            records.append({"prompt": ln})
    if not records:
        raise ValueError(f"{path} holds no prompts; write one prompt per line (text), or {fix}")
    return records


def _as_prompt(rec: dict) -> dict:
    if "prompt" in rec or "tokens" in rec:
        return rec
    if "instruction" in rec:  # system? + user turn, as SFT renders it
        from megatron_prune.data.sft import to_messages

        return {**rec, "messages": to_messages({"output": "", **rec})[:-1]}
    messages = rec["messages"]
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        return {**rec, "messages": messages[:-1]}
    return rec


def encode_prompt(record: dict, tokenizer, chat: bool = True) -> list[int]:
    """Token ids of one record; text goes through the chat template (as a user turn) when there is one."""
    if "tokens" in record:
        return [int(t) for t in record["tokens"]]
    has_template = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    if "messages" in record:
        if not has_template:
            raise ValueError("a {'messages'} prompt needs a tokenizer with a chat template")
        messages = record["messages"]
    elif chat and has_template:
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        return tokenizer(record["prompt"])["input_ids"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS and any end-of-turn marker it knows."""
    if tokenizer is None:
        return []
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)
