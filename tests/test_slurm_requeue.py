"""The Slurm path end to end on the real (local) Slurm, 2 tasks per job over gloo: importance -> prune ->
distill as three chained sbatch jobs of the unmodified script, and a distillation preempted mid-run (SIGUSR1,
what Slurm sends before a time limit) that saves, requeues itself and finishes with the same losses as an
uninterrupted job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_token_dataset
from test_slurm import REPO, _job_env, _sbatch_wait, slurm  # noqa: F401  (slurm: the session fixture)

SBATCH = REPO / "launch" / "slurm" / "megatron_prune.sbatch"
STEPS = 40  # long enough that the signal, sent once step 1 is logged, lands while the job is still training


@pytest.fixture(scope="module")
def requeue_setup(tiny_llama_dir, tmp_path_factory):
    from distributed_utils import run_ranks
    from test_distill import _convert

    root = tmp_path_factory.mktemp("requeue")
    run_ranks(_convert, 1, tiny_llama_dir, root / "teacher")
    write_token_dataset(root / "data", num_docs=30, doc_len=50, vocab=1000)
    return root


def _distill_args(setup, student, out):
    return ["distill", "--teacher", setup / "teacher", "--student", student, "--data", setup / "data", "--out", out,
            "--steps", str(STEPS), "--seq-len", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "2", "--save-every", "10", "--tp", "2"]


def _job_args(tmp_path, log, *cmd, after=None):
    dependency = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
    return ["--nodes=1", "--ntasks-per-node=2", "--time=00:30:00", f"--chdir={tmp_path}", f"--output={log}",
            *dependency, SBATCH, *cmd]


def _submit(args, env) -> str:
    return subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True, env=env,
                          check=True).stdout.strip().split(";")[0]


def _history(step_dir: Path) -> list:
    from megatron.core import dist_checkpointing

    history = dist_checkpointing.load_common_state_dict(str(step_dir))["trainer"]["history"]
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def test_importance_prune_distill_chain_with_a_requeue(slurm, requeue_setup, tmp_path):  # noqa: F811
    env = _job_env(MP_VENV=str(Path(sys.executable).parent.parent), MP_REPO=str(REPO), OMP_NUM_THREADS="1")
    setup = requeue_setup
    # importance at PP2, prune writing TP2, distill at TP2: each job reads whatever layout the last one wrote
    scores_job = _submit(_job_args(tmp_path, tmp_path / "importance.log", "importance", setup / "teacher",
                                   "--data", setup / "data", "--out", tmp_path / "teacher.scores", "--samples", "8",
                                   "--seq-len", "16", "--micro-batch-size", "2", "--pp", "2"), env)
    prune_job = _submit(_job_args(tmp_path, tmp_path / "prune.log", "prune", setup / "teacher",
                                  "--scores", tmp_path / "teacher.scores", "--target", "hidden=48,ffn=64,layers=3",
                                  "--out", tmp_path / "student", "--tp", "2", after=scores_job), env)
    full_log = tmp_path / "full.log"
    _sbatch_wait(_job_args(tmp_path, full_log, *_distill_args(setup, tmp_path / "student", tmp_path / "full"),
                           after=prune_job), env, full_log)
    student = json.loads((tmp_path / "student" / "megatron_prune.json").read_text())
    assert (student["arch"]["hidden_size"], student["arch"]["ffn_hidden_size"], student["arch"]["num_layers"]) == \
        (48, 64, 3), student["arch"]
    last = f"step_{STEPS:07d}"
    want = _history(tmp_path / "full" / last)

    out, log = tmp_path / "preempted", tmp_path / "preempted.log"
    job = _submit(_job_args(tmp_path, log, *_distill_args(setup, tmp_path / "student", out)), env)
    deadline = time.time() + 1800  # a hang guard only
    # Signal as soon as the first step is logged (the stop handler is installed by then). Waiting for a
    # checkpoint instead raced a fast machine: the whole job could finish between two polls.
    while not (log.exists() and b'"step": 1,' in log.read_bytes()):  # bytes: a tqdm bar may be half written
        assert time.time() < deadline and _job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_bytes().decode(errors="replace") if log.exists() else job
        time.sleep(0.05)
    # what Slurm sends before a time limit (--signal=USR1@120) and what preemption looks like to the tasks
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    pending_since = None
    while (state := _job_state(job)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        assert time.time() < deadline, log.read_bytes().decode(errors="replace")
        # Slurm holds a requeued job for about two minutes; the test need not wait that long. But not less than
        # a few seconds either: slurmd revokes the first allocation's credential with a 1 s resolution, and an
        # allocation in the same second is killed ("Job credential revoked"; seen once).
        pending_since = (pending_since or time.time()) if state == "PENDING" else None
        if pending_since and time.time() - pending_since >= 3:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    text = log.read_bytes().decode(errors="replace")
    assert _job_state(job) in ("COMPLETED", "GONE"), text
    assert "stopped by SIGUSR1" in text and "requeueing job" in text, text
    assert text.count("[megatron_prune.sbatch] job") == 2, text  # two allocations, one log (--open-mode=append)
    assert "2 task(s)" in text and ", resuming at step " in text, text  # the second allocation resumed
    got = _history(out / last)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    for (_, g), (_, w) in zip(got, want):
        assert abs(g - w) <= 1e-6 * abs(w), (got, want)
    assert json.loads((out / last / "megatron_prune.json").read_text())["arch"]["num_layers"] == 3
