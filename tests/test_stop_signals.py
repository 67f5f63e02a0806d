"""Issue 7, item 6: the one-pass verbs (`importance`, `generate`, `teacher-logits`) stop cleanly on a stop
signal: exit code 75, one line saying what was (not) kept, no partial output, no temporary file; the
`teacher-logits` rerun finishes the write. Each test starts the real CLI and signals it once it is working.
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
