"""`megatron-prune eval`: held-out LM loss and perplexity of a checkpoint at any TP/PP."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.evaluate import EvalResult, lm_loss
from megatron_prune.runtime.stop import stop_on_signals


def check_eval(ckpt, data_prefix, seq_len: int, micro_batch_size: int, max_sequences: Optional[int], tp: int,
               pp: int, out=None) -> None:
    """Every input of `eval`, before any process group or weight."""
    inputs.layout(tp, pp)
    for name, value in (("--seq-len", seq_len), ("--micro-batch-size", micro_batch_size),
                        ("--max-sequences", max_sequences)):
        inputs.positive(name, value)
    inputs.checkpoint_fits(inputs.checkpoint(ckpt), tp, pp)
    inputs.enough_windows(inputs.indexed_data(data_prefix), seq_len, 1, "--data", "lower --seq-len or use more data")
    if out is not None:
        inputs.output(out, "--out", overwrite=None, kind="file")


@stop_on_signals(immediate=True)  # a measurement has nothing to resume: a stop ends it, nothing is written
def evaluate_checkpoint(ckpt: str | Path, data_prefix: str | Path, seq_len: int = 512, micro_batch_size: int = 4,
                        max_sequences: Optional[int] = None, tp: int = 1, pp: int = 1,
                        out: Optional[str | Path] = None) -> EvalResult:
    """Load ``ckpt`` at ``tp`` x ``pp`` and report its LM loss on the indexed data set ``data_prefix``
    (also written as JSON to ``out`` when given)."""
    import json

    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.runtime import init_distributed, is_rank0, log0

    check_eval(ckpt, data_prefix, seq_len, micro_batch_size, max_sequences, tp, pp, out)
    init_distributed(tp, pp)
    model, meta = load_model(ckpt)
    windows = fixed_length_windows(data_prefix, seq_len, max_windows=max_sequences)
    log0(f"evaluating {ckpt} ({meta.arch.describe()}) on {len(windows)} x {seq_len} tokens of {data_prefix}")
    result = lm_loss(model, meta.arch, windows, micro_batch_size, desc="eval")
    if out is not None and is_rank0():
        Path(out).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


@stop_on_signals(immediate=True)  # a measurement has nothing to resume: a stop ends it, nothing is written
def evaluate_tasks(ckpt: str | Path, sft_data: Optional[str | Path] = None, arithmetic: int = 0, humaneval: int = 0,
                   kl_teacher: Optional[str | Path] = None, data_prefix: Optional[str | Path] = None,
                   seq_len: int = 512, max_sequences: Optional[int] = None, micro_batch_size: int = 4,
                   max_new_tokens: int = 256, batch_size: int = 8, tp: int = 1, pp: int = 1) -> dict:
    """Task accuracy (greedy) on held-out SFT records and the forgetting KL(teacher || ckpt) on text windows.

    ``arithmetic`` / ``humaneval``: how many records of each task in ``sft_data`` to evaluate (-1: all).
    """
    from megatron_prune.checkpoint import load_model, tokenizer_dir
    from megatron_prune.data.sft import humaneval_tasks, load_tokenizer, read_sft_jsonl
    from megatron_prune.evaluate_sft import arithmetic_accuracy, generate_answers, humaneval_passed, kl_to_teacher
    from megatron_prune.runtime import init_distributed, log0

    records = read_sft_jsonl(sft_data) if sft_data else []
    if (arithmetic or humaneval) and not records:
        raise ValueError("--arithmetic/--humaneval evaluate records of --sft-data (e.g. sft_heldout.jsonl from "
                         "`megatron-prune data --corpus sft`)")
    if kl_teacher and not data_prefix:
        raise ValueError("--kl-teacher needs --data (an indexed dataset prefix of held-out general text)")
    inputs.checkpoint_fits(inputs.checkpoint(ckpt), tp, pp)
    pick = lambda task, n: [r for r in records if r.get("task") == task][: None if n < 0 else n]  # noqa: E731
    arith, he = pick("arithmetic", arithmetic) if arithmetic else [], pick("humaneval", humaneval) if humaneval else []
    init_distributed(tp, pp)
    model, meta = load_model(ckpt)
    result: dict = {"checkpoint": str(ckpt)}
    if arith or he:
        tok = load_tokenizer(tokenizer_dir(ckpt))
        if arith:
            answers = generate_answers(model, meta.arch, tok, arith, max_new_tokens, batch_size, desc="arithmetic")
            result["arithmetic_accuracy"] = arithmetic_accuracy(answers, arith)
            result["arithmetic_n"] = len(arith)
        if he:
            by_id = {t["task_id"]: t for t in humaneval_tasks()}
            answers = generate_answers(model, meta.arch, tok, he, max_new_tokens, batch_size, desc="humaneval")
            passed = humaneval_passed(answers, [by_id[r["task_id"]] for r in he])
            result["humaneval_pass"] = sum(passed) / len(passed)
            result["humaneval_n"] = len(passed)
    if data_prefix:
        from megatron_prune.data import fixed_length_windows

        windows = fixed_length_windows(data_prefix, seq_len, max_windows=max_sequences)
        result["lm_loss"] = lm_loss(model, meta.arch, windows, micro_batch_size, desc="eval").lm_loss
        if kl_teacher:
            teacher, t_meta = load_model(kl_teacher)
            if t_meta.arch.vocab_size != meta.arch.vocab_size:
                raise ValueError(f"--kl-teacher vocab {t_meta.arch.vocab_size} != model vocab {meta.arch.vocab_size}")
            result["kl_to_teacher"] = kl_to_teacher(model, teacher, meta.arch, windows, micro_batch_size)
    log0(f"evaluated {ckpt}: {result}")
    return result


@stop_on_signals(immediate=True)  # a measurement has nothing to resume: a stop ends it, nothing is written
def evaluate_lm_eval(ckpt: str | Path, tasks, include_path=None, num_fewshot: Optional[int] = None,
                     limit: Optional[float] = None, batch_size: int = 8, max_length: Optional[int] = None,
                     apply_chat_template: bool = False, data_prefix: Optional[str | Path] = None, seq_len: int = 512,
                     max_sequences: Optional[int] = None, micro_batch_size: int = 4, tp: int = 1, pp: int = 1,
                     out: Optional[str | Path] = None) -> Optional[dict]:
    """lm-evaluation-harness tasks (and, with ``data_prefix``, the held-out LM loss) of ``ckpt`` at ``tp`` x ``pp``.

    Task names, the include path and every task's data are checked before the model is loaded. Writes the
    full lm-eval results (plus ``lm_loss``) to ``out`` as JSON and logs a table; returns a compact summary
    on rank 0 (None elsewhere).
    """
    from megatron_prune import lm_eval_tasks as lt
    from megatron_prune.checkpoint import tokenizer_dir
    from megatron_prune.checkpoint.outputs import write_json_atomic
    from megatron_prune.lm_eval_adapter import MegatronLM
    from megatron_prune.runtime import is_rank0, log0

    names = lt.parse_task_names(tasks)
    inputs.layout(tp, pp)
    for name, value in (("--batch-size", batch_size), ("--num-fewshot", num_fewshot), ("--limit", limit),
                        ("--max-length", max_length)):
        inputs.positive(name, value, allow_zero=name == "--num-fewshot")
    inputs.checkpoint_fits(inputs.checkpoint(ckpt), tp, pp)
    if tokenizer_dir(ckpt) is None:
        raise ValueError(f"{ckpt} has no tokenizer/ folder: lm-eval tasks are text and need the checkpoint's tokenizer")
    if data_prefix is not None:
        check_eval(ckpt, data_prefix, seq_len, micro_batch_size, max_sequences, tp, pp)
    if out is not None:
        inputs.output(out, "--out", overwrite=None, kind="file")
    tm = lt.task_manager(names, include_path)
    task_objs = lt.load_tasks(tm, names)

    lm = MegatronLM(str(ckpt), tp=tp, pp=pp, batch_size=batch_size, max_length=max_length)
    log0(f"lm-eval {', '.join(names)} on {ckpt} ({lm.arch.describe()}) at TP{tp} PP{pp}")
    results = lt.run_tasks(lm, task_objs, tm, num_fewshot=num_fewshot, limit=limit,
                           apply_chat_template=apply_chat_template)
    loss = None
    if data_prefix is not None:
        from megatron_prune.data import fixed_length_windows

        windows = fixed_length_windows(data_prefix, seq_len, max_windows=max_sequences)
        loss = lm_loss(lm.model, lm.arch, windows, micro_batch_size, desc="eval").to_dict()
    if not is_rank0():
        return None
    result = {"checkpoint": str(ckpt), "tp": tp, "pp": pp, "tasks": lt.summary(results)}
    if loss is not None:
        result["lm_loss"], result["perplexity"] = loss["lm_loss"], loss["perplexity"]
    log0(lt.table(results))
    if out is not None:
        write_json_atomic(out, {**result, "lm_loss_detail": loss, "lm_eval": results})
    return result
