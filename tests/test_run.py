"""`megatron-prune run`: a family build from a recipe, killed mid-stage and resumed without redoing stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def recipe_setup(tiny_llama_dir, tmp_path_factory):
    """A recipe over the tiny Llama (HF directory) and random-token data: teacher -> mid -> small."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(0)
    for split, docs in (("train", 40), ("valid", 12)):
        builder = IndexedDatasetBuilder(str(root / f"{split}.bin"), dtype=np.int32)
        for _ in range(docs):
            builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=40, dtype=np.int32)), [40])
        builder.finalize(str(root / f"{split}.idx"))
    train = dict(steps=4, seq_len=16, micro_batch_size=2, global_batch_size=4, lr=1.0e-3, save_every=2, log_every=1)
    stages = {
        "teacher": {"verb": "convert", "src": str(tiny_llama_dir)},
        "scores": {"verb": "importance", "ckpt": "teacher", "data": str(root / "train"), "out": "teacher.scores",
                   "samples": 8, "seq_len": 16, "micro_batch_size": 4},
        "mid-pruned": {"verb": "prune", "ckpt": "teacher", "scores": "scores", "target": "hidden=56,ffn=80"},
        "mid": {"verb": "distill", "teacher": "teacher", "student": "mid-pruned", "data": [str(root / "train")],
                **train},
        "mid-scores": {"verb": "importance", "ckpt": "mid", "data": str(root / "train"), "out": "mid.scores",
                       "samples": 8, "seq_len": 16, "micro_batch_size": 4},
        "small-pruned": {"verb": "prune", "ckpt": "mid", "scores": "mid-scores",
                         "target": "hidden=48,ffn=64,layers=3,depth_metric=angular"},
        # longer than the first distillation so a kill after its first checkpoint lands mid-stage on a fast machine
        "small": {"verb": "distill", "teacher": "teacher", "student": "small-pruned", "data": [str(root / "train")],
                  **{**train, "steps": SMALL_STEPS}},
        "eval": {"verb": "eval", "models": ["teacher", "mid", "small"], "data": str(root / "valid"), "seq_len": 16,
                 "micro_batch_size": 4, "max_sequences": 8},
    }
    import yaml

    (root / "family.yaml").write_text(yaml.safe_dump({"workdir": str(root / "unused"), "stages": stages},
                                                     sort_keys=False))
    return root


SMALL_STEPS = 32


def _run(recipe, workdir, *extra):
    return [sys.executable, "-u", "-m", "megatron_prune.cli", "run", str(recipe), "--workdir", str(workdir), *extra]


def _log(workdir):
    return [json.loads(line) for line in (workdir / "run_log.jsonl").read_text().splitlines()]


def test_family_build_resumes_after_a_kill(recipe_setup, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    recipe = recipe_setup / "family.yaml"
    full = subprocess.run(_run(recipe, tmp_path / "full"), capture_output=True, text=True, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    want = json.loads((tmp_path / "full" / "eval.json").read_text())["rows"]
    assert [r["model"] for r in want] == ["teacher", "mid", "small"]
    assert want[0]["params"] > want[1]["params"] > want[2]["params"]
    assert want[2]["train_tokens"] == (4 + SMALL_STEPS) * 4 * 16
    assert (tmp_path / "full" / "report.md").is_file() and (tmp_path / "full" / "report.png").is_file()

    dry = subprocess.run(_run(recipe, tmp_path / "full", "--dry-run"), capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and dry.stdout.count("(complete, skipping)") == 8, dry.stdout

    # kill -9 while the second distillation runs (everything before it is complete), then re-run
    work = tmp_path / "killed"
    proc = subprocess.Popen(_run(recipe, work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if (work / "small-run").is_dir() and any((work / "small-run").glob("step_*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    done_before = [e["stage"] for e in _log(work) if e["event"] == "done"]
    assert done_before == ["teacher", "scores", "mid-pruned", "mid", "mid-scores", "small-pruned"]
    again = subprocess.run(_run(recipe, work), capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    second = _log(work)[2 * len(done_before) + 1:]  # the first run: a start and a done per stage, then a start
    assert [e["stage"] for e in second if e["event"] == "skipped"] == done_before
    assert [e["stage"] for e in second if e["event"] == "done"] == ["small", "eval"]
    got = json.loads((work / "eval.json").read_text())["rows"]
    for g, w in zip(got, want):
        assert g["model"] == w["model"] and abs(g["lm_loss"] - w["lm_loss"]) <= 1e-6 * w["lm_loss"], (g, w)

    # SIGTERM in the eval stage once a model is measured: exit 75 with a message, a "stopped" event, and the
    # measured rows kept; the next run evaluates only the rest and gives the same table
    from stop_utils import CliRun

    (work / "eval.json").unlink()
    partial = work / "eval.partial.jsonl"
    stopped = CliRun(_run(recipe, work, "--stages", "eval"), tmp_path / "stop-log", env)
    stopped.wait_for(lambda: partial.is_file() and partial.read_text().count("\n") >= 1, "a measured model")
    code, out, err = stopped.stop(signal.SIGTERM)
    assert code == 75, (code, out[-2000:], err[-2000:])
    kept = partial.read_text().count("\n")
    assert 1 <= kept < 3 and f"stopped by SIGTERM after {kept} of 3 models" in err and str(partial) in err, err[-2000:]
    assert not (work / "eval.json").exists()
    assert _log(work)[-1]["event"] == "stopped" and _log(work)[-1]["stage"] == "eval"
    resumed = subprocess.run(_run(recipe, work, "--stages", "eval"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (resumed.stdout + resumed.stderr).count("measured before, kept") == kept
    assert not partial.exists()
    got = json.loads((work / "eval.json").read_text())["rows"]
    assert [g["model"] for g in got] == [w["model"] for w in want]
    for g, w in zip(got, want):
        assert abs(g["lm_loss"] - w["lm_loss"]) <= 1e-6 * w["lm_loss"], (g, w)


def test_recipe_errors(tmp_path):
    from megatron_prune.pipelines.recipe import RecipeError, load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  a: {verb: prune, ckpt: b, scores: s, target: 'ffn=8'}\n  b: {verb: convert, src: x}\n")
    with pytest.raises(RecipeError, match="stage 'a' uses 'b', which runs later"):
        load_recipe(bad)
    bad.write_text("stages:\n  a: {verb: quantize}\n")
    with pytest.raises(RecipeError, match="stage 'a' needs `verb:` one of"):
        load_recipe(bad)
    bad.write_text("stagez: {}\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping with `stages:`"):
        load_recipe(bad)
    with pytest.raises(FileNotFoundError, match="recipe .* not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_set_overrides_change_the_recipe_as_written(tmp_path):
    from megatron_prune.pipelines.recipe import RecipeError, load_recipe

    f = tmp_path / "r.yaml"
    f.write_text("tp: 1\nstages:\n  t: {verb: convert, src: x}\n"
                 "  s: {verb: search, ckpt: t, scores: sc, params: 90M, valid_data: v, "
                 "distill: {data: [d], steps: 20}}\n")
    r = load_recipe(f, overrides=["s.distill.steps=2", "s.top_k=6", "s.params=1.5B", "tp=2", "t.src=other dir"])
    t, s = r.stages
    assert s.options["distill"] == {"data": ["d"], "steps": 2} and s.options["top_k"] == 6
    assert s.options["params"] == "1.5B" and t.options["src"] == "other dir" and (t.tp, s.tp) == (2, 2)
    assert s.options["out"] == "s"  # a search stage writes into a directory named after it by default
    for bad, message in (("s.top_k", "STAGE.KEY=VALUE"), ("=3", "STAGE.KEY=VALUE"), ("x.steps=1", "no stage 'x'"),
                         ("s.params.deeper=1", "'params' of stage 's' is not a mapping")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(f, overrides=[bad])


def test_selfdistill_pipeline_as_a_recipe(tiny_chat_ckpt, tmp_path):
    """The self-data distillation path as recipe stages: rewrite, SFT on both sets, SLERP merge, task eval,
    speculative decoding; a second run skips every stage."""
    import yaml
    from conftest import write_token_dataset

    from megatron_prune.data.sft import arithmetic_problems, write_jsonl

    problems = arithmetic_problems(12, seed=3)
    write_jsonl(problems[:8], tmp_path / "train.jsonl")
    write_jsonl(problems[8:], tmp_path / "heldout.jsonl")
    write_token_dataset(tmp_path / "valid", num_docs=6, doc_len=40, vocab=49152)
    sft = dict(steps=2, seq_len=256, micro_batch_size=2, global_batch_size=2, lr=1.0e-3, log_every=1)
    stages = {
        "rewrites": {"verb": "selfdistill", "teacher": str(tiny_chat_ckpt), "data": str(tmp_path / "train.jsonl"),
                     "max_new_tokens": 6, "batch_size": 4, "chunk_size": 4},
        "sft": {"verb": "sft", "student": str(tiny_chat_ckpt), "data": [str(tmp_path / "train.jsonl")], **sft},
        "sdd": {"verb": "sft", "student": str(tiny_chat_ckpt), "data": ["rewrites"], **sft},
        "merged": {"verb": "merge", "ckpts": ["sft", "sdd"], "t": 0.5},
        "eval": {"verb": "eval", "models": [str(tiny_chat_ckpt), "sdd", "merged"], "data": str(tmp_path / "valid"),
                 "seq_len": 32, "max_sequences": 4, "kl_teacher": str(tiny_chat_ckpt),
                 "sft_data": str(tmp_path / "heldout.jsonl"), "arithmetic": 2, "max_new_tokens": 4},
        "specdec": {"verb": "specdec", "target": str(tiny_chat_ckpt), "draft": "merged",
                    "prompts": str(tmp_path / "heldout.jsonl"), "k": [1, 2], "limit": 2, "max_new_tokens": 5},
    }
    recipe = tmp_path / "sdd.yaml"
    recipe.write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    work = tmp_path / "work"
    first = subprocess.run(_run(recipe, work), capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [e["stage"] for e in _log(work) if e["event"] == "done"] == list(stages)

    stats = json.loads((work / "rewrites.stats.json").read_text())
    assert stats["examples"] == stats["written"] == 8
    assert str(work / "rewrites.jsonl") in (work / "sdd-run" / "config.yaml").read_text()  # SFT on the rewrites
    rows = json.loads((work / "eval.json").read_text())["rows"]
    assert abs(rows[0]["kl_to_teacher"]) < 1e-6 < rows[1]["kl_to_teacher"]  # the teacher against itself: 0
    assert all(r["arithmetic_n"] == 2 and 0 <= r["arithmetic_accuracy"] <= 1 for r in rows)
    assert "KL to teacher" in (work / "report.md").read_text()
    report = json.loads((work / "specdec.json").read_text())
    assert sorted(report["k"]) == ["1", "2"] and all(r["equals_target_greedy"] for r in report["k"].values())

    again = subprocess.run(_run(recipe, work), capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [e["stage"] for e in _log(work)[-len(stages):]] == list(stages)
    assert all(e["event"] == "skipped" for e in _log(work)[-len(stages):])
