"""The distillation trainer: one step is the same at every layout, and a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_token_dataset
from distributed_utils import run_ranks
from test_prune import random_plan_json


def _convert(hf_dir, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out)


def _prune(src, plan_file, out):
    from megatron_prune.prune import PrunePlan
    from megatron_prune.prune.checkpoint import prune_checkpoint
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    prune_checkpoint(src, PrunePlan.load(plan_file), out)


def build_distill_setup(tiny_llama_dir, root):
    """Teacher = the tiny Llama; student = a pruned copy (hidden 48, FFN 64, 2 layers); random-token data."""
    run_ranks(_convert, 1, tiny_llama_dir, root / "teacher")
    arch = json.loads((root / "teacher" / "megatron_prune.json").read_text())["arch"]
    (root / "plan.json").write_text(json.dumps(random_plan_json(arch)))
    run_ranks(_prune, 1, root / "teacher", root / "plan.json", root / "student")
    write_token_dataset(root / "data", num_docs=30, doc_len=50, vocab=1000)
    return root


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    return build_distill_setup(tiny_llama_dir, tmp_path_factory.mktemp("distill"))


def _one_step(root, out, tp, pp, kd_loss):
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import train

    cfg = TrainConfig(teacher=str(root / "teacher"), student=str(root / "student"), data=[str(root / "data")],
                      out=str(out), tp=tp, pp=pp, seq_len=16, micro_batch_size=1, global_batch_size=4, steps=1,
                      optimizer="sgd", lr=1.0, min_lr=1.0, warmup_steps=0, weight_decay=0.0, clip_grad=1e9,
                      kd_loss=kd_loss, kd_top_k=5 if kd_loss == "topk" else None, ce_weight=0.5, save_every=1,
                      dataset_cache=str(root / "cache"))
    history = train(cfg)
    return history[-1]


def _weights(ckpt):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, _ = load_model(ckpt)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


LAYOUTS = [(1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 1, 2)]  # (tp, pp, world); the last one is DP2


@pytest.mark.parametrize("kd_loss,layouts", [("forward", LAYOUTS), ("topk", LAYOUTS[:2])])
def test_one_step_is_the_same_at_every_layout(setup, tmp_path, kd_loss, layouts):
    (w0,) = run_ranks(_weights, 1, setup / "student")
    records, deltas = {}, {}
    for tp, pp, world in layouts:
        out = tmp_path / f"tp{tp}pp{pp}w{world}"
        records[(tp, pp, world)] = run_ranks(_one_step, world, setup, out, tp, pp, kd_loss)[0]
        (w1,) = run_ranks(_weights, 1, out / "step_0000001")
        deltas[(tp, pp, world)] = {k: w1[k] - w0[k] for k in w0}
    ref_rec, ref_delta = records[(1, 1, 1)], deltas[(1, 1, 1)]
    assert ref_rec["kd"] > 0 and ref_rec["lm"] > 0
    moved = sum(d.abs().sum().item() for d in ref_delta.values())
    assert moved > 0, "the step changed the student"
    for layout, rec in records.items():
        for key in ("loss", "kd", "lm"):
            assert rec[key] == pytest.approx(ref_rec[key], rel=1e-5), (layout, key)
        # SGD with lr 1 and no clipping: the reported gradient norm is the norm of the whole update
        update_norm = sum(float((d.double() ** 2).sum()) for d in deltas[layout].values()) ** 0.5
        assert rec["grad_norm"] == pytest.approx(update_norm, rel=1e-4), layout
        for k, d in deltas[layout].items():  # SGD with lr 1: the update is the gradient itself
            torch.testing.assert_close(d, ref_delta[k], rtol=1e-4, atol=1e-6, msg=f"{layout} {k}")


def test_teacher_is_frozen_and_not_saved(setup, tmp_path):
    from megatron_prune.checkpoint import read_meta

    run_ranks(_one_step, 1, setup, tmp_path / "run", 1, 1, "forward")
    meta = read_meta(tmp_path / "run" / "step_0000001")
    assert meta.arch == read_meta(setup / "student").arch  # the student's shape, not the teacher's
    assert meta.provenance["teacher"] == str(setup / "teacher")
    (teacher_after,) = run_ranks(_weights, 1, setup / "teacher")
    (w,) = run_ranks(_weights, 1, tmp_path / "run" / "step_0000001")
    assert all(v.shape[-1] != 64 for k, v in w.items() if "embedding" in k)  # hidden 48: the student only


def _distill_with_correction(root, out):
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import train

    cfg = TrainConfig(teacher=str(root / "teacher"), student=str(root / "student"), data=[str(root / "data")],
                      out=str(out), seq_len=16, micro_batch_size=2, global_batch_size=4, steps=1, lr=1e-3,
                      teacher_correction_steps=2, teacher_correction_lr=1e-2, save_every=1,
                      dataset_cache=str(root / "cache"))
    return train(cfg)[-1]


def test_teacher_correction_trains_the_teacher_first(setup, tmp_path):
    from megatron_prune.checkpoint import read_meta

    run_ranks(_distill_with_correction, 1, setup, tmp_path / "run")
    corrected = tmp_path / "run" / "teacher-correction" / "step_0000002"
    assert read_meta(corrected).arch == read_meta(setup / "teacher").arch
    assert read_meta(tmp_path / "run" / "step_0000001").provenance["teacher"] == str(corrected)
    (before,) = run_ranks(_weights, 1, setup / "teacher")
    (after,) = run_ranks(_weights, 1, corrected)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train
    (again,) = run_ranks(_weights, 1, setup / "teacher")
    assert all(torch.equal(before[k], again[k]) for k in before)  # and the original is untouched


def _cli_distill(setup, out, steps, save_every=2):
    return [sys.executable, "-u", "-m", "megatron_prune.cli", "distill", "--teacher", str(setup / "teacher"),
            "--student", str(setup / "student"), "--data", str(setup / "data"), "--out", str(out),
            "--steps", str(steps), "--seq-len", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "2", "--keep-last", "2"] + (
            ["--save-every", str(save_every)] if save_every is not None else [])


ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    """An uninterrupted 6-step run launched as the README does, without --save-every."""
    out = tmp_path_factory.mktemp("full") / "run"
    full = subprocess.run(_cli_distill(setup, out, 6, save_every=None), capture_output=True, text=True, env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    return out, full.stdout


def test_the_final_model_is_always_saved(full_run):
    out, stdout = full_run
    assert sorted(p.name for p in out.glob("step_*")) == ["step_0000006"]  # default interval 500: only the last
    assert f"final model (step 6): {out / 'step_0000006'}" in stdout


def _losses(out):
    from megatron.core import dist_checkpointing

    history = dist_checkpointing.load_common_state_dict(str(out / "step_0000006"))["trainer"]["history"]
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(setup, full_run, tmp_path):
    env = ENV
    proc = subprocess.Popen(_cli_distill(setup, tmp_path / "killed", 6), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    for line in proc.stdout:  # kill -9 once step 3 is logged (a checkpoint exists at step 2)
        if line.startswith("{") and json.loads(line).get("step") == 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "killed" / "step_0000002").is_dir() and not (tmp_path / "killed" / "step_0000006").exists()
    from test_faults import _processes_in_session

    time.sleep(1)
    assert _processes_in_session(proc.pid) == []  # no checkpoint-writer helper outlives the job

    resumed = subprocess.run(_cli_distill(setup, tmp_path / "killed", 6), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stdout
    assert _losses(tmp_path / "killed") == _losses(full_run[0])
    # keep-last 2
    assert sorted(p.name for p in (tmp_path / "killed").glob("step_*")) == ["step_0000004", "step_0000006"]


def test_sigterm_saves_the_step_in_flight_and_the_rerun_continues(setup, full_run, tmp_path):
    """What Slurm does at preemption: SIGTERM. The run finishes its step, saves it, exits 75; the rerun
    continues from that step and ends with the losses of the uninterrupted run."""
    from megatron_prune.runtime.stop import EXIT_STOPPED

    out = tmp_path / "stopped"
    proc = subprocess.Popen(_cli_distill(setup, out, 6, save_every=None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("step") == 2:
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate()
    assert proc.returncode == EXIT_STOPPED, stderr[-3000:]
    saved = sorted(p.name for p in out.glob("step_*"))
    assert saved in (["step_0000002"], ["step_0000003"]), saved  # at most the step in flight is lost
    assert f"stopped by SIGTERM at step {int(saved[0][5:])}; saved to {out / saved[0]}" in stderr
    assert "Traceback" not in stderr

    resumed = subprocess.run(_cli_distill(setup, out, 6, save_every=None), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {int(saved[0][5:])}" in resumed.stdout
    assert _losses(out) == _losses(full_run[0])


def _stop_on_one_rank(root, out):
    """DP2: only rank 1 gets SIGTERM (during step 2); both must stop after step 2 with one checkpoint."""
    import torch.distributed as dist

    from megatron_prune.runtime.stop import StopRequested
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import Trainer

    cfg = TrainConfig(teacher=str(root / "teacher"), student=str(root / "student"), data=[str(root / "data")],
                      out=str(out), seq_len=16, micro_batch_size=1, global_batch_size=4, steps=5, lr=1e-3,
                      dataset_cache=str(root / "cache"))
    trainer = Trainer(cfg)
    step = trainer.train_step

    def step_and_signal():
        record = step()
        if trainer.step == 2 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    trainer.train_step = step_and_signal
    try:
        trainer.run()
    except StopRequested as e:
        return e.step, str(e.saved), e.reason
    return None


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(setup, tmp_path):
    results = run_ranks(_stop_on_one_rank, 2, setup, tmp_path / "run")
    assert results[0] is not None and results[1] is not None
    assert results[0][:2] == results[1][:2] == (2, str(tmp_path / "run" / "step_0000002"))
    assert results[1][2] == "SIGTERM"
    assert sorted(p.name for p in (tmp_path / "run").glob("step_*")) == ["step_0000002"]


def _one_step_intermediate(root, out):
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import train

    cfg = TrainConfig(teacher=str(root / "teacher"), student=str(root / "student"), data=[str(root / "data")],
                      out=str(out), seq_len=16, micro_batch_size=4, global_batch_size=4, steps=1, lr=1e-3,
                      intermediate_layers=[[0, 1], [1, 3]], embedding_loss=True, intermediate_loss="cosine",
                      dataset_cache=str(root / "cache"))
    return train(cfg)[-1]


def test_intermediate_state_loss_uses_the_dynamic_weight(setup, tmp_path):
    (rec,) = run_ranks(_one_step_intermediate, 1, setup, tmp_path / "run")
    assert rec["is"] > 0
    assert rec["alpha"] == pytest.approx(rec["kd"] / rec["is"], rel=1e-5)  # alpha = L_logits / L_is
    assert rec["loss"] == pytest.approx(rec["kd"] + rec["alpha"] * rec["is"], rel=1e-5)  # = 2 L_logits, no CE


def test_yaml_recipe_and_bad_options(tmp_path):
    from pathlib import Path

    from megatron_prune.training.config import TrainConfig

    recipe = Path(__file__).parents[1] / "examples" / "distill_smollm2.yaml"
    cfg = TrainConfig.from_yaml(recipe, steps=7, tp=2)
    assert cfg.teacher and cfg.student and cfg.steps == 7 and cfg.tp == 2  # flags override the YAML
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_yaml(recipe, learning_rate=1.0)
    with pytest.raises(ValueError, match="exactly one of steps or tokens"):
        TrainConfig.from_yaml(recipe, tokens=1000)
    with pytest.raises(ValueError, match="kd_loss=topk needs kd_top_k"):
        TrainConfig.from_yaml(recipe, kd_loss="topk")


NOISE = ("pad token id", "DeprecationWarning", "FutureWarning", "UserWarning", "Warning:", "Apex is not installed",
         "apex", "Transformer Engine", "TransformerEngine", "Traceback")


def test_a_real_run_is_quiet(setup, tmp_path):
    """Issue 7, item 12: a plain `distill` with the user's own warning settings (no PYTHONWARNINGS) prints our log
    lines, the progress bar and the final model, and none of the library noise a user finds alarming."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(_cli_distill(setup, tmp_path / "run", 2, save_every=None), capture_output=True, text=True,
                          env=env, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert f"final model (step 2): {tmp_path / 'run' / 'step_0000002'}" in text
    noisy = [line for line in text.splitlines() if any(n.lower() in line.lower() for n in NOISE)]
    assert noisy == [], "\n".join(noisy)
