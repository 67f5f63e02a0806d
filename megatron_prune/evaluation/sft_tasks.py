"""Evaluation for the self-data-distillation path: task accuracy from greedy generations, and forgetting.

- arithmetic: exact match of the final integer answer (``#### N``) of a greedy generation;
- human-eval: functional correctness, each program (generated function + the task's tests) run in a separate
  Python process with a timeout, never in this process;
- forgetting: mean per-token KL(teacher || model) on held-out general-text windows (vocab-parallel logits).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.data.sft import end_of_turn_ids, final_answer, prompt_ids, to_messages

_CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def generate_answers(model, arch, tokenizer, records: list[dict], max_new_tokens: int = 256,
                     batch_size: int = 8, desc: Optional[str] = "generate") -> list[str]:
    """Greedy answers (text, without the end-of-turn token) to the prompts of SFT records."""
    from megatron_prune.generation import SamplingParams, generate

    stop = end_of_turn_ids(tokenizer)
    prompts = [prompt_ids(tokenizer, to_messages(r)[:-1]) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    outs = generate(model, arch, prompts, SamplingParams(max_new_tokens=max_new_tokens), stop_token_ids=stop,
                    pad_token_id=pad, batch_size=batch_size, desc=desc)
    return [tokenizer.decode([t for t in o if t not in stop], skip_special_tokens=True) for o in outs]


def arithmetic_accuracy(answers: list[str], records: list[dict]) -> float:
    """Share of answers whose final integer equals the record's ``answer``."""
    return sum(final_answer(a) == r["answer"] for a, r in zip(answers, records)) / max(len(records), 1)


def extract_code(answer: str, task: dict) -> str:
    """The program a response proposes: its first python code block (or the raw text), prefixed with the task's
    prompt when the block does not define the entry point itself (a bare function body)."""
    m = _CODE_BLOCK.search(answer)
    code = m.group(1) if m else answer
    if f"def {task['entry_point']}" not in code:
        code = task["prompt"] + code
    return code


def run_check(program: str, timeout: float = 10.0) -> bool:
    """True when ``program`` runs to its end within ``timeout`` seconds in a fresh Python in a temporary folder.

    "To its end": a random token printed after the program must appear, so code that exits early with
    status 0 (``sys.exit(0)`` before the tests) does not pass.
    """
    import secrets

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check.py")
        with open(path, "w") as f:
            f.write(f"{program}\nprint({token!r})\n")
        try:
            done = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, text=True)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0 and token in done.stdout


def humaneval_passed(answers: list[str], tasks: list[dict], timeout: float = 10.0) -> list[bool]:
    """Functional correctness of each answer: the task's ``check`` run against the extracted function
    (on global rank 0, in subprocesses; the result is shared with every rank)."""
    from megatron_prune.runtime import is_rank0

    result = None
    if is_rank0():
        result = [run_check(f"{extract_code(a, t)}\n\n{t['test']}\n\ncheck({t['entry_point']})\n", timeout)
                  for a, t in zip(answers, tasks)]
    if dist.is_initialized():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


@torch.no_grad()
def kl_to_teacher(model, teacher, arch, windows: torch.Tensor, micro_batch_size: int = 4) -> float:
    """Mean per-token KL(teacher || model) over ``windows`` [n, seq_len + 1] (both models at the same layout;
    data-parallel ranks split the windows). The same value on every rank."""
    from megatron.core import parallel_state as ps

    from megatron_prune.distill.losses import forward_kl
    from megatron_prune.forward import broadcast_from_last_stage, run_forward

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    device = next(model.parameters()).device
    batches = [{"tokens": w[:, :-1].contiguous().to(device)} for w in windows[dp_rank::dp].split(micro_batch_size)]
    seq = windows.shape[1] - 1
    total = torch.zeros(2, dtype=torch.float64)
    for m in (model, teacher):
        m.eval()
    for b in batches:  # one micro-batch per call: batches may differ in size at the end
        t_logits = run_forward(teacher, [b], 1, seq, len(b["tokens"]), lambda out, _b: out.float())
        kl = run_forward(model, [b], 1, seq, len(b["tokens"]),
                         lambda out, _b, t_logits=t_logits: forward_kl(out.float(), t_logits[0],
                                                                       vocab_size=arch.vocab_size))
        stats = broadcast_from_last_stage([(kl[0].sum().item(), kl[0].numel())] if kl else None)
        total += torch.tensor(stats[0], dtype=torch.float64)
    if dist.is_initialized() and dp > 1:
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    if total[1] == 0:
        raise ValueError("no windows to measure the KL on")
    return (total[0] / total[1]).item()
