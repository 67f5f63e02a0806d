"""Self-data distillation: the filters on hand-written rewrites, and a killed run that resumes to the same file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from stop_utils import CliRun

ARITH = {"instruction": "Ava has 3 apples and gets 4 more. How many?", "output": "3 + 4 = 7\n#### 7", "answer": 7}
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}


@pytest.mark.parametrize("text,finished,record,rule", [
    ("She has 3 + 4 = 7 apples.\n#### 7", True, ARITH, "rewritten"),
    ("She ends up with seven, i.e. 7.", True, ARITH, "rewritten"),  # no '####': the last number counts
    ("3 + 4 = 8\n#### 8", True, ARITH, "wrong_answer"),
    ("#### 7 is what the reference answer says", True, ARITH, "mentions_reference"),
    ("Red.", True, CHAT, "rewritten"),
    ("As in the Reference Answer, blue.", True, CHAT, "mentions_reference"),
    ("Here is my response: green.", True, CHAT, "mentions_reference"),
    ("Your response should be green.", True, CHAT, "mentions_reference"),
    ("Now it's your turn: blue.", True, CHAT, "mentions_reference"),
    ("Writing your own response: red.", True, CHAT, "mentions_reference"),
    ("  Your turn! Red.", True, CHAT, "mentions_reference"),
    ("Your turtle is green.", True, CHAT, "rewritten"),
    ("   \n", True, CHAT, "empty"),
    ("Red, green and", False, CHAT, "truncated"),
])
def test_filters(text, finished, record, rule):
    from megatron_prune.generation.rewrite import judge

    assert judge(text, finished, record) == rule


def test_decide_with_the_real_tokenizer(smol_tokenizer_dir):
    from megatron_prune.data.sft import end_of_turn_ids, load_tokenizer
    from megatron_prune.generation.rewrite import decide, rewrite_messages

    tok = load_tokenizer(smol_tokenizer_dir)
    stop = end_of_turn_ids(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rec, rule = decide(ARITH, enc("Four more: 3 + 4 = 7\n#### 7") + [im_end], tok, stop)
    assert (rule == "rewritten" and rec == {**ARITH, "output": "Four more: 3 + 4 = 7\n#### 7"}
            and ARITH["output"] != rec["output"])
    assert decide(ARITH, enc("3 + 4 = 7\n#### 7"), tok, stop) == (ARITH, "truncated")  # no end of turn
    assert decide(ARITH, enc("#### 9") + [im_end], tok, stop) == (ARITH, "wrong_answer")
    assert decide(ARITH, enc("#### 9") + [im_end], tok, stop, on_reject="drop") == (None, "wrong_answer")
    assert decide(ARITH, None, tok, stop) == (ARITH, "too_long")
    rec, rule = decide(CHAT, enc("Green.") + [im_end], tok, stop)
    assert rule == "rewritten" and rec["messages"][-1] == {"role": "assistant", "content": "Green."}
    assert CHAT["messages"][-1]["content"] == "Blue."  # the input record is not modified
    prompt = tok.apply_chat_template(rewrite_messages(ARITH), tokenize=False, add_generation_prompt=True)
    assert "Using the reference answer as a guide" in prompt and ARITH["instruction"] in prompt
    assert ARITH["output"] in prompt and prompt.endswith("<|im_start|>assistant\n")


def _cmd(ckpt, data, out):
    return [sys.executable, "-u", "-m", "megatron_prune.cli", "selfdistill", "--teacher", str(ckpt), "--data",
            str(data), "--out", str(out), "--max-new-tokens", "6", "--chunk-size", "1", "--batch-size", "4"]


ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def full_run(tiny_chat_ckpt, tmp_path_factory):
    """31 examples (one too long for the model) in chunks of 1, rewritten by an uninterrupted run."""
    from megatron_prune.data.sft import arithmetic_problems, write_jsonl

    root = tmp_path_factory.mktemp("selfdistill")
    records = arithmetic_problems(30, seed=2)
    records.insert(5, {"instruction": "word " * 400, "output": "long"})  # prompt longer than the model: kept as is
    data = write_jsonl(records, root / "data.jsonl")
    full = subprocess.run(_cmd(tiny_chat_ckpt, data, root / "full.jsonl"), capture_output=True, text=True, env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    return records, data, root / "full.jsonl"


def test_killed_run_resumes_to_the_same_file(tiny_chat_ckpt, full_run, tmp_path):
    from megatron_prune.data.sft import read_sft_jsonl

    records, data, full = full_run
    env = ENV
    out = tmp_path / "killed.jsonl"
    parts = tmp_path / "killed.jsonl.parts"
    proc = subprocess.Popen(_cmd(tiny_chat_ckpt, data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    while proc.poll() is None and len(list(parts.glob("chunk_*.jsonl"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists(), "killed before the end"
    done = len(list(parts.glob("chunk_*.jsonl")))
    assert 3 <= done < len(records)

    resumed = subprocess.run(_cmd(tiny_chat_ckpt, data, out), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} done already" in resumed.stdout
    assert out.read_bytes() == full.read_bytes()
    stats = json.loads((tmp_path / "killed.stats.json").read_text())
    assert stats == json.loads(full.with_name("full.stats.json").read_text())
    assert stats["examples"] == stats["written"] == len(records) and stats["by_rule"]["too_long"] == 1
    assert sum(stats["by_rule"].values()) == len(records)
    assert stats["rewritten"] + stats["original"] == len(records)
    written = read_sft_jsonl(out)  # every example exactly once, in order; only rewritten answers differ
    assert [r["instruction"] for r in written] == [r["instruction"] for r in records]
    assert sum(w != r for w, r in zip(written, records)) == stats["rewritten"]
    assert not parts.exists()

    again = subprocess.run(_cmd(tiny_chat_ckpt, data, out), capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_sigterm_keeps_the_finished_chunks_and_the_rerun_completes_the_same_file(tiny_chat_ckpt, full_run, tmp_path):
    """Issue 7, item 6: SIGTERM mid-run finishes the chunk in flight, keeps every finished chunk, says how to
    continue and exits 75; the rerun does the rest and writes the uninterrupted run's file byte for byte."""
    from megatron_prune.runtime.stop import EXIT_STOPPED

    records, data, full = full_run
    out, parts = tmp_path / "stopped.jsonl", tmp_path / "stopped.jsonl.parts"
    chunks = lambda: sorted(parts.glob("chunk_*.jsonl"))  # noqa: E731
    run = CliRun(_cmd(tiny_chat_ckpt, data, out), tmp_path / "logs", ENV)
    run.wait_for(lambda: len(chunks()) >= 2, "second chunk")
    code, _, stderr = run.stop(signal.SIGTERM)
    assert code == EXIT_STOPPED, stderr[-3000:]
    done = len(chunks())
    assert 2 <= done < len(records)  # stopped early, after the chunk in flight
    assert [p.name for p in chunks()] == [f"chunk_{i:09d}.jsonl" for i in range(done)]  # a prefix, none half-written
    assert f"megatron-prune selfdistill: stopped by SIGTERM after {done} of {len(records)} chunks ({done} of " \
           f"{len(records)} examples); saved to {parts}; run the same command again to continue from there" in stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not (tmp_path / "stopped.stats.json").exists()
    assert sorted(p.name for p in parts.iterdir()) == sorted(["fingerprint"] + [p.name for p in chunks()])  # no temp
    for i, chunk in enumerate(chunks()):  # each kept chunk is the uninterrupted run's example
        assert json.loads(chunk.read_text())["record"] == json.loads(full.read_text().splitlines()[i])

    resumed = subprocess.run(_cmd(tiny_chat_ckpt, data, out), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} done already" in resumed.stdout
    assert out.read_bytes() == full.read_bytes()
    assert not parts.exists()
