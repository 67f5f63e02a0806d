"""The generation-side verbs as a user runs them (`megatron-prune generate / specdec / merge`, real processes,
multi-rank through torch.distributed.run), checked against independent references: transformers' greedy
generate, the arithmetic of a draft identical to its target, and tensors merged by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

NEW = 8
QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Say hello to the world in three languages."]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args, ranks: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    out = subprocess.run([*launcher, "-m", "megatron_prune.cli", *map(str, args)], capture_output=True, text=True,
                         env=ENV)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    return f


def _reference(hf_dir, new=NEW):
    """transformers' greedy continuation of each chat-rendered question, and the tokenizer's stop ids."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(model.generate(ids, max_new_tokens=new, do_sample=False)[0, ids.shape[1]:].tolist())
    return tok, out


def test_generate_at_pp2_equals_transformers(tiny_chat_ckpt, prompts_file, tmp_path):
    """Two pipeline stages, chat template applied by the verb; each completion equals transformers' greedy one
    (cut after a stop token when the model emits one), and its text is the decoded tokens."""
    out = tmp_path / "out.jsonl"
    _cli("generate", tiny_chat_ckpt, "--prompts", prompts_file, "--out", out, "--max-new-tokens", NEW, "--pp", 2,
         "--batch-size", 2, ranks=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok, ref = _reference(tiny_chat_ckpt.parent / "hf")
    assert [r["prompt"] for r in rows] == QUESTIONS
    for row, want in zip(rows, ref):
        got = row["tokens"]
        assert got == want[:len(got)]
        assert len(got) == NEW or row["finished"]
        assert row["completion"] == tok.decode(got[:-1] if row["finished"] else got, skip_special_tokens=True)
    assert not list(tmp_path.glob(".*tmp*"))  # the output was renamed into place


def test_specdec_with_the_target_as_its_own_draft(tiny_chat_ckpt, prompts_file, tmp_path):
    """A draft identical to the target is always accepted: acceptance 1 and k+1 tokens per target step (NEW is a
    multiple of k+1 for every k tried), and the output is the target's greedy output."""
    report_file = tmp_path / "specdec.json"
    _cli("specdec", "--target", tiny_chat_ckpt, "--draft", tiny_chat_ckpt, "--prompts", prompts_file,
         "--k", "1,3", "--max-new-tokens", NEW, "--out", report_file)
    report = json.loads(report_file.read_text())
    assert sorted(report["k"]) == ["1", "3"]
    for k, row in report["k"].items():
        assert row["equals_target_greedy"] is True
        assert row["acceptance_rate"] == 1.0
        if row["new_tokens"] == NEW * len(QUESTIONS):  # no early stop token
            assert row["mean_accepted_length"] == int(k) + 1
    assert report["target_alone"]["new_tokens"] == report["k"]["1"]["new_tokens"]


def _halved_copy(tiny_chat_ckpt, tmp_path):
    """A second checkpoint of the same shape: every weight of the tiny model times 0.5."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_chat_ckpt.parent / "hf"
    hf2 = tmp_path / "hf_half"
    shutil.copytree(src, hf2)
    for f in hf2.glob("*.safetensors"):
        save_file({k: v * 0.5 for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    _cli("convert", hf2, tmp_path / "half")
    return load_file(next(src.glob("*.safetensors"))), tmp_path / "half"


def _exported(ckpt, out):
    from safetensors.torch import load_file

    _cli("convert", ckpt, out)
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def test_merge_written_at_tp2_equals_merging_by_hand(tiny_chat_ckpt, tmp_path):
    """Linear merge (weights 0.25, 0.75) of the model and its halved copy, written at TP2 by two ranks, then
    exported: every tensor is 0.25 w + 0.75 (w / 2). SLERP of the model with itself is the model."""
    original, half = _halved_copy(tiny_chat_ckpt, tmp_path)
    _cli("merge", tiny_chat_ckpt, half, "--method", "linear", "--weights", "0.25,0.75", "--out", tmp_path / "lin",
         "--tp", 2, ranks=2)
    merged = _exported(tmp_path / "lin", tmp_path / "lin_hf")
    for name, w in original.items():
        torch.testing.assert_close(merged[name], 0.25 * w + 0.75 * (0.5 * w), rtol=1e-6, atol=1e-7)

    _cli("merge", tiny_chat_ckpt, tiny_chat_ckpt, "--t", "0.3", "--out", tmp_path / "self")
    same = _exported(tmp_path / "self", tmp_path / "self_hf")
    for name, w in original.items():
        torch.testing.assert_close(same[name], w, rtol=1e-6, atol=1e-7)
