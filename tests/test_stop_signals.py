"""Issue 7, item 6: the one-pass verbs (`importance`, `generate`, `teacher-logits`, and the writers `convert`,
`prune`, `merge`, `data`, `specdec`, also as `run` stages) stop cleanly on a stop signal: exit code 75, one line
saying what was (not) kept, no partial output, no temporary file; the `teacher-logits` rerun finishes the write.
Each test starts the real CLI and signals it once it is working.
(`distill`/`train`: tests/test_distill.py; `selfdistill`: tests/test_selfdistill.py.)"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
from conftest import convert_hf, write_token_dataset
from distributed_utils import run_ranks
from stop_utils import CliRun

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def root(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama (vocab 1000, 256 positions) as a checkpoint, and 150k random tokens."""
    root = tmp_path_factory.mktemp("stop")
    run_ranks(convert_hf, 1, tiny_llama_dir, root / "ckpt")
    write_token_dataset(root / "data", num_docs=600, doc_len=250, vocab=1000)
    return root


def _cli(*args):
    return [sys.executable, "-u", "-m", "megatron_prune.cli", *map(str, args)]


def _stop_when_logged(cmd, logdir, line: str, sig, env=None) -> tuple[int, str]:
    run = CliRun(cmd, logdir, env or ENV)
    run.wait_for(lambda: line in run.out_path.read_text(), repr(line))
    code, _, stderr = run.stop(sig)
    assert "Traceback" not in stderr, stderr[-3000:]
    return code, stderr


def _left_in(directory):
    return sorted(p.name for p in directory.iterdir() if p.name not in ("logs",))


def test_importance_stops_on_sigterm_and_writes_nothing(root, tmp_path):
    from megatron_prune.runtime.stop import EXIT_STOPPED

    out = tmp_path / "scores.safetensors"
    cmd = _cli("importance", root / "ckpt", "--data", root / "data", "--out", out, "--samples", 2000, "--seq-len", 64,
               "--micro-batch-size", 1, "--lm-loss-drop", 1)
    code, stderr = _stop_when_logged(cmd, tmp_path / "logs", "importance of", signal.SIGTERM)
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert ("megatron-prune importance: stopped by SIGTERM; nothing was written; run the same command again to "
            "start over") in stderr
    assert _left_in(tmp_path) == []  # no score file, no hidden temporary file


def test_generate_stops_on_sigint_and_writes_nothing(root, tmp_path):
    from megatron_prune.runtime.stop import EXIT_STOPPED

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": [5 + i, 17, 300 + i]}) + "\n" for i in range(64)))
    out = tmp_path / "completions.jsonl"
    cmd = _cli("generate", root / "ckpt", "--prompts", prompts, "--out", out, "--max-new-tokens", 240,
               "--batch-size", 1, "--no-chat")
    code, stderr = _stop_when_logged(cmd, tmp_path / "logs", "generating for 64 prompts", signal.SIGINT)
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert ("megatron-prune generate: stopped by SIGINT; nothing was written; run the same command again to "
            "start over") in stderr
    assert _left_in(tmp_path) == ["prompts.jsonl"]  # no output, no hidden temporary file


def test_teacher_logits_stops_on_sigusr1_and_the_rerun_finishes(root, tmp_path):
    from megatron_prune.distill.offline import TeacherLogitsFile
    from megatron_prune.runtime.stop import EXIT_STOPPED

    out = tmp_path / "logits"
    partial = tmp_path / ".logits.partial"
    samples = 600
    cmd = _cli("teacher-logits", root / "ckpt", "--data", root / "data", "--out", out, "--samples", samples,
               "--seq-len", 64, "--top-k", 4, "--micro-batch-size", 1)
    marker = tmp_path / "logs" / "stopped"  # the sbatch script's $MP_STOP_MARKER: a clean stop, whatever srun says
    code, stderr = _stop_when_logged(cmd, tmp_path / "logs", "teacher-logits: top-4", signal.SIGUSR1,
                                     env={**ENV, "MP_STOP_MARKER": str(marker)})
    assert code == EXIT_STOPPED, stderr[-3000:]
    message = (f"megatron-prune teacher-logits: stopped by SIGUSR1; saved to {partial}; run the same command again "
               "to continue from there")
    assert message in stderr
    assert marker.read_text() == message + "\n"
    assert _left_in(tmp_path) == [".logits.partial"]  # the output does not exist
    assert not [p.name for p in partial.iterdir() if p.name.endswith(".tmp")]  # no half-written chunk

    rerun = CliRun(cmd, tmp_path / "logs2", ENV)
    assert rerun.proc.wait(timeout=600) == 0, rerun.output()[-3000:]
    assert not partial.exists()
    assert TeacherLogitsFile(out).meta.num_samples == samples


# A stop raised from the signal handler surfaces wherever the main thread is: inside library code. Two places where
# that went wrong under load (a second copy of the suite running): the signal landing in megatron's module builder,
# and in a tqdm bar's constructor. Both are provoked here by raising the stop at exactly that point.

def test_a_stop_inside_megatrons_module_builder_keeps_its_message():
    """megatron's build_module re-raises `type(e)(f"{e} when instantiating X")` for an Exception; the stop must
    pass through unchanged (it read "stopped by stopped by SIGTERM; ... when instantiating MLP; ...")."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_prune.runtime.stop import StopRequested

    class SignalledWhileBuilding:
        def __init__(self):
            raise StopRequested("SIGTERM")

    with pytest.raises(StopRequested) as stopped:
        build_module(ModuleSpec(module=SignalledWhileBuilding))
    assert str(stopped.value) == ("stopped by SIGTERM; nothing was written; run the same command again to start "
                                  "over")
    assert stopped.value.reason == "SIGTERM"


def test_a_stop_inside_a_progress_bar_constructor_prints_one_line(tmp_path):
    """The half-built tqdm bar's __del__ failed ("'tqdm' object has no attribute 'pos'") after the stop message."""
    import subprocess

    script = """
import sys
import tqdm.std
from megatron_prune import cli
from megatron_prune.runtime.stop import StopRequested

def signalled(*args, **kwargs):  # the stop lands inside tqdm's constructor, before it sets .pos
    raise StopRequested("SIGINT")

def generate(args):
    from megatron_prune.runtime.progress import progress
    tqdm.std.tqdm._get_free_pos = signalled
    progress(64, "generate", unit="prompt")

cli.run = generate
sys.exit(cli.main(["generate", "ckpt", "--prompts", "p.jsonl", "--out", "o.jsonl"]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=ENV)
    from megatron_prune.runtime.stop import EXIT_STOPPED

    assert done.returncode == EXIT_STOPPED, done.stderr[-3000:]
    assert done.stderr == ("megatron-prune generate: stopped by SIGINT; nothing was written; run the same command "
                           "again to start over\n")


# The verbs that write one output and have nothing to resume (`convert`, `prune`, `merge`, `data`; `run`'s stages of
# those verbs) stop like `importance`: exit 75, one line, and neither the output nor its hidden temporary directory
# stays. Each run pauses right after a real partial write (the shards are in the temporary directory) and is
# signalled there, so the signal lands at the worst point on every machine, loaded or not.

PAUSED_CLI = """
import importlib, pathlib, sys, time
from megatron_prune import cli

owner = importlib.import_module({module!r})
for attr in {owner_path!r}:
    owner = getattr(owner, attr)
original = getattr(owner, {name!r})

calls = 0

def write_then_pause(*args, **kwargs):
    global calls
    result = original(*args, **kwargs)
    calls += 1
    if calls == {pause_at_call}:
        pathlib.Path({marker!r}).touch()
        time.sleep(600)  # the signal lands here
    return result

setattr(owner, {name!r}, write_then_pause)
sys.exit(cli.main({argv!r}))
"""


@pytest.fixture(scope="module")
def scores(root):
    run_ranks(_score, 1, root / "ckpt", root / "data", root / "ckpt.scores")
    return root / "ckpt.scores"


def _score(ckpt, prefix, out):
    from megatron_prune.pipelines.importance import score_checkpoint

    score_checkpoint(ckpt, prefix, out, num_samples=8, seq_len=32, micro_batch_size=4)


def _stop_while_writing(logdir, target: str, argv: list, pause_at_call: int = 1) -> tuple[int, str]:
    """Run the CLI with ``target`` ("module:Owner.function") pausing after its ``pause_at_call``-th call; SIGTERM it
    there."""
    module, path = target.split(":")
    *owner_path, name = path.split(".")
    marker = logdir / "paused"
    script = PAUSED_CLI.format(module=module, owner_path=owner_path, name=name, marker=str(marker),
                               argv=[str(a) for a in argv], pause_at_call=pause_at_call)
    run = CliRun([sys.executable, "-c", script], logdir, ENV)
    run.wait_for(marker.exists, "a partial write")
    code, _, stderr = run.stop(signal.SIGTERM)
    assert "Traceback" not in stderr, stderr[-3000:]
    return code, stderr


STOPPED = "stopped by SIGTERM; nothing was written; run the same command again to start over"
SHARDS = "megatron_prune.checkpoint.writer:write_sharded"


@pytest.mark.parametrize("case", ["hf-to-megatron", "megatron-to-hf", "megatron-to-nemo"])
def test_convert_stops_on_sigterm_and_leaves_nothing(root, tiny_llama_dir, tmp_path, case):
    from megatron_prune.runtime.stop import EXIT_STOPPED

    out = tmp_path / "out"
    argv, target = {
        "hf-to-megatron": (["convert", tiny_llama_dir, out], SHARDS),
        "megatron-to-hf": (["convert", root / "ckpt", out], "safetensors.torch:save_file"),
        "megatron-to-nemo": (["convert", root / "ckpt", out, "--to", "nemo"], SHARDS),
    }[case]
    code, stderr = _stop_while_writing(tmp_path / "logs", target, argv)
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"megatron-prune convert: {STOPPED}"
    assert _left_in(tmp_path) == []  # no output, no hidden .out.tmp holding the shards written so far


def test_prune_stopped_while_overwriting_keeps_the_previous_output(root, scores, tmp_path):
    """--overwrite replaces an output only once the new one is complete: a stop before that keeps the old one."""
    import shutil

    from megatron_prune.runtime.stop import EXIT_STOPPED

    out = tmp_path / "pruned"
    shutil.copytree(root / "ckpt", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, stderr = _stop_while_writing(tmp_path / "logs", SHARDS, ["prune", root / "ckpt", "--scores", scores,
                                                                    "--target", "ffn=32", "--out", out, "--overwrite"])
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"megatron-prune prune: {STOPPED}"
    assert _left_in(tmp_path) == ["pruned"]  # no .pruned.tmp, no .pruned.old
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_merge_data_and_specdec_stop_on_sigterm_and_leave_nothing(root, smol_tokenizer_dir, tmp_path):
    from megatron_prune.runtime.stop import EXIT_STOPPED

    merged = tmp_path / "merged"
    merged.mkdir()
    code, stderr = _stop_while_writing(tmp_path / "logs", SHARDS, ["merge", root / "ckpt", root / "ckpt", "--method",
                                                                   "linear", "--out", merged / "out"])
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"megatron-prune merge: {STOPPED}"
    assert _left_in(merged) == []

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(200)))
    out = tmp_path / "data"
    code, stderr = _stop_while_writing(tmp_path / "logs-data",
                                       "megatron.core.datasets.indexed_dataset:IndexedDatasetBuilder.add_document",
                                       ["data", "--jsonl", docs, "--tokenizer", smol_tokenizer_dir, "--out", out])
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"megatron-prune data: {STOPPED}"
    assert _left_in(out) == []  # no .bin/.idx, no hidden .tmpPID files

    measured = tmp_path / "specdec"
    measured.mkdir()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"tokens": [5 + i, 17, 300 + i]}) + "\n" for i in range(4)))
    code, stderr = _stop_while_writing(tmp_path / "logs-specdec", "megatron_prune.generation.speculative:target_alone",
                                       ["specdec", "--target", root / "ckpt", "--draft", root / "ckpt", "--prompts",
                                        prompts, "--k", "1", "--max-new-tokens", 8, "--no-chat", "--out",
                                        measured / "report.json"])
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"megatron-prune specdec: {STOPPED}"
    assert _left_in(measured) == []


def test_search_stopped_in_the_zero_shot_ranking_keeps_the_finished_candidates(root, scores, tmp_path):
    from megatron_prune.runtime.stop import EXIT_STOPPED

    out = tmp_path / "search"
    argv = ["search", root / "ckpt", "--scores", scores, "--out", out, "--valid-data", root / "data", "--params",
            "200000", "--tolerance", "0.2", "--hidden", "48,64", "--ffn", "64,96", "--heads", "4,8", "--stage",
            "zero-shot", "--seq-len", 16, "--eval-windows", 8]
    code, stderr = _stop_while_writing(tmp_path / "logs", "megatron_prune.evaluation.lm_loss:lm_loss", argv,
                                       pause_at_call=2)
    assert code == EXIT_STOPPED, stderr[-3000:]
    candidates = len(json.loads((out / "search.json").read_text())["candidates"])
    assert candidates > 2
    assert stderr.strip().splitlines()[-1] == (
        f"megatron-prune search: stopped by SIGTERM after 1 of {candidates} zero-shot candidates; saved to "
        f"{out / 'zero_shot'}; run the same command again to continue from there")
    kept = {p.name: p.read_text() for p in (out / "zero_shot").iterdir()}
    assert len(kept) == 1 and not list(kept)[0].startswith(".")

    rerun = CliRun(_cli(*argv), tmp_path / "logs2", ENV)
    assert rerun.proc.wait(timeout=600) == 0, rerun.output()[-3000:]
    after = {p.name: p.read_text() for p in (out / "zero_shot").iterdir()}
    assert len(after) == candidates and all(after[name] == text for name, text in kept.items())  # not redone


def test_a_stopped_run_stage_is_logged_and_the_rerun_finishes(tiny_llama_dir, tmp_path):
    """`run` stopped in a convert stage: exit 75, a "stopped" event in run_log.jsonl, nothing half-written; the
    same command then builds the stage."""
    import yaml

    from megatron_prune.checkpoint import read_meta
    from megatron_prune.runtime.stop import EXIT_STOPPED

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"stages": {"teacher": {"verb": "convert", "src": str(tiny_llama_dir)}}}))
    work = tmp_path / "work"
    argv = ["run", recipe, "--workdir", work]
    code, stderr = _stop_while_writing(tmp_path / "logs", SHARDS, argv)
    assert code == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"megatron-prune run: {STOPPED}"
    events = [json.loads(line) for line in (work / "run_log.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["event"]) for e in events] == [("teacher", "start"), ("teacher", "stopped")]
    assert _left_in(work) == ["run_log.jsonl"]

    rerun = CliRun(_cli(*argv), tmp_path / "logs2", ENV)
    assert rerun.proc.wait(timeout=600) == 0, rerun.output()[-3000:]
    teacher = [p for p in work.iterdir() if p.is_dir()]
    assert len(teacher) == 1 and read_meta(teacher[0]).arch.num_layers > 0


def test_a_stop_between_the_renames_of_an_overwrite_puts_the_previous_output_back(tmp_path, monkeypatch):
    from pathlib import Path

    from megatron_prune.checkpoint.outputs import replace_dir
    from megatron_prune.runtime.stop import StopRequested

    out, tmp = tmp_path / "out", tmp_path / ".out.tmp"
    for directory, text in ((out, "old"), (tmp, "new")):
        directory.mkdir()
        (directory / "weights").write_text(text)
    real_rename = Path.rename

    def signalled_after_the_first_rename(self, target):
        if self == tmp:  # the previous output is already at .out.old
            raise StopRequested("SIGTERM")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", signalled_after_the_first_rename)
    with pytest.raises(StopRequested):
        replace_dir(tmp, out)
    monkeypatch.undo()
    assert (out / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp", "out"]
    replace_dir(tmp, out)
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
