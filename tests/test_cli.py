"""The `megatron-prune` command as a user meets it: help, clear errors, and the offline demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "megatron_prune.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, **kw)


def test_help_lists_subcommands():
    out = cli("--help")
    assert out.returncode == 0
    for cmd in ("convert", "data", "eval", "demo"):
        assert cmd in out.stdout
    for cmd in ("convert", "data", "eval", "demo"):
        sub = cli(cmd, "--help")
        assert sub.returncode == 0 and "--" in sub.stdout, cmd


def test_missing_input_is_a_one_line_error(tmp_path):
    out = cli("convert", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_tp_that_does_not_fit_the_world_says_how_to_launch(tiny_llama_dir, tmp_path):
    out = cli("convert", str(tiny_llama_dir), str(tmp_path / "out"), "--tp", "2")
    assert out.returncode == 2
    assert "torchrun --nproc-per-node 2" in out.stderr


def test_tp_that_does_not_divide_the_heads(tiny_llama_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
                          "megatron_prune.cli",
                          "convert", str(tiny_llama_dir), str(tmp_path / "out"), "--tp", "3"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode != 0
    assert "num_query_groups=4 is not divisible by TP=3" in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_is_the_family_recipe_end_to_end(tmp_path):
    """`demo` runs examples/smollm2_family.yaml on the real SmolLM2-135M, here with small settings through `--set`:
    search (zero-shot rank of every 104M shape, two distilled), the winner distilled, pruned to 84M and distilled
    from the original, all evaluated; a second run skips every stage."""
    work = tmp_path / "demo"
    small = ["scores.samples=8", "scores.seq_len=64", "search.top_k=2", "search.eval_windows=2",
             "search.eval_seq_len=64", "search.distill.steps=2", "search.distill.seq_len=32",
             "search.distill.micro_batch_size=2", "search.distill.global_batch_size=2", "mid.steps=2",
             "mid.seq_len=32", "mid.micro_batch_size=2", "mid.global_batch_size=2", "mid-scores.samples=8",
             "mid-scores.seq_len=64", "small.steps=2", "small.seq_len=32", "small.micro_batch_size=2",
             "small.global_batch_size=2", "eval.seq_len=128", "eval.max_sequences=8"]
    args = ["demo", "--workdir", str(work)] + [a for kv in small for a in ("--set", kv)]
    out = cli(*args, timeout=3600)  # a hang guard only
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["model"]: r for r in json.loads((work / "eval.json").read_text())["rows"]}
    assert list(rows) == ["teacher", "search", "mid", "small-pruned", "small"]
    # SmolLM2-135M on Shakespeare: far better than uniform guessing over 49152 tokens (ln = 10.8)
    assert 2.0 < rows["teacher"]["lm_loss"] < 6.0
    assert all(rows["teacher"]["lm_loss"] < r["lm_loss"] < 10.8 for name, r in rows.items() if name != "teacher")
    assert rows["teacher"]["params"] > rows["search"]["params"] == rows["mid"]["params"] > rows["small"]["params"]
    assert abs(rows["search"]["params"] - 104e6) <= 0.05 * 104e6  # the search budget
    import csv

    with open(work / "search" / "report.csv") as f:
        cands = list(csv.DictReader(f))
    assert len(cands) >= 6 and all(c["zero_shot_loss"] for c in cands)  # every shape within the budget
    distilled = [c for c in cands if c["distilled_loss"]]
    assert sorted(int(c["zero_shot_rank"]) for c in distilled) == [1, 2]  # the zero-shot top 2
    assert (work / "report.md").is_file() and (work / "report.png").stat().st_size > 1000
    assert (work / "search" / "report.md").is_file()
    again = cli(*args, timeout=3600)
    assert again.returncode == 0 and again.stdout.count("(complete, skipping)") == 9, again.stdout

    # the width-pruned model (hidden 448 with 9 heads: not a multiple) exports to a directory transformers loads,
    # in a fresh interpreter, with our logits. Eager attention (the same math as ours). The reference is
    # transformers in float64: ours (float32) must lie in the float32 noise band of transformers' own float32
    # forward (3x its distance to float64, floor 1e-4). Measured with one thread per process: ours 1.0e-3,
    # transformers' float32 4.8e-4 from float64 (summation order alone, on ~20-sized logits; with two threads ours
    # was within 1e-4 of transformers' float32); a wrong export (a permuted head or channel) is off by O(1).
    from distributed_utils import run_ranks
    from test_conversion import megatron_logits

    pruned = json.loads((work / "small-pruned" / "megatron_prune.json").read_text())["arch"]
    assert (pruned["hidden_size"], pruned["num_attention_heads"]) == (448, 9)
    export = cli("convert", str(work / "small-pruned"), str(tmp_path / "small_hf"), timeout=3600)
    assert export.returncode == 0, export.stderr[-3000:]
    tokens = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = run_ranks(megatron_logits, 1, work / "small-pruned", 1, 1, tokens)[0][..., :49152]
    torch.save(tokens, tmp_path / "tokens.pt")
    script = ("import sys, torch, transformers\n"
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, "
              "attn_implementation='eager')\n"
              "t = torch.load(sys.argv[2])\n"
              "with torch.no_grad(): f32 = m(t).logits; f64 = m.double()(t).logits\n"
              "torch.save({'f32': f32, 'f64': f64}, sys.argv[3])\n")
    hf = subprocess.run([sys.executable, "-c", script, str(tmp_path / "small_hf"), str(tmp_path / "tokens.pt"),
                         str(tmp_path / "hf_logits.pt")], capture_output=True, text=True,
                        env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert hf.returncode == 0, hf.stderr[-3000:]
    hf_logits = torch.load(tmp_path / "hf_logits.pt")
    ours_err = (ours.double() - hf_logits["f64"]).abs().max().item()
    hf32_err = (hf_logits["f32"].double() - hf_logits["f64"]).abs().max().item()
    assert ours_err <= max(1e-4, 3 * hf32_err), (ours_err, hf32_err)
