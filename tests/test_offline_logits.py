"""Offline logit distillation: the teacher-logits file equals a naive top-K of the teacher's log-softmax, the KD
loss and gradients from it equal the online top-K ones, a run from it has the online run's loss history, and
files that do not match a run are refused with the fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from distributed_utils import run_ranks
from test_distill import build_distill_setup

SEQ, K, STEPS, GBS = 16, 5, 3, 4


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    return build_distill_setup(tiny_llama_dir, tmp_path_factory.mktemp("offline"))


def _write(root, out, tp, pp, dtype, samples, chunk_samples=None, data=None):
    from megatron_prune.pipelines.teacher_logits import teacher_logits

    return teacher_logits(root / "teacher", [str(data or root / "data")], out, seq_len=SEQ, top_k=K, samples=samples,
                          dtype=dtype, micro_batch_size=2, tp=tp, pp=pp, chunk_samples=chunk_samples)


@pytest.fixture(scope="module")
def files(setup, tmp_path_factory):
    """fp32 at TP1 in 3 chunks (the last one short); fp16 at TP2; bf16 at PP2 (a pipelined teacher)."""
    d = tmp_path_factory.mktemp("files")
    run_ranks(_write, 1, setup, d / "fp32", 1, 1, "float32", STEPS * GBS, 5)
    run_ranks(_write, 2, setup, d / "tp2", 2, 1, "float16", STEPS * GBS)
    run_ranks(_write, 2, setup, d / "pp2", 1, 2, "bfloat16", STEPS * GBS, 4)
    return d


def _reference(tiny_llama_dir, tokens):
    """Naive top-K of log_softmax of the transformers model's full logits."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.double(), -1)
    return logp.topk(K + 1, dim=-1)


def _dataset_tokens(root, n, cache):
    from megatron_prune.data.blend import build_train_dataset, collate

    ds = build_train_dataset([str(root / "data")], SEQ, n, 1234, 0, cache_dir=cache)
    return collate([ds[i] for i in range(n)])["tokens"]


@pytest.mark.parametrize("name,rtol", [("fp32", 1e-5), ("tp2", 1e-3), ("pp2", 8e-3)])
def test_file_is_the_top_k_of_the_teachers_log_softmax(setup, files, tiny_llama_dir, tmp_path, name, rtol):
    from megatron_prune.distill.offline import TeacherLogitsFile

    f = TeacherLogitsFile(files / name)
    meta = json.loads((files / name / "metadata.json").read_text())
    assert meta["num_samples"] == STEPS * GBS and meta["top_k"] == K and meta["vocab_size"] == 1000
    assert meta["index_dtype"] == "uint16" and meta["seq_len"] == SEQ and meta["data"] == [str(setup / "data")]
    assert not list(files.glob(".*partial")) and not (files / name / "dataset_cache").exists()
    idx = list(range(STEPS * GBS))
    tokens = f.tokens(idx)
    assert torch.equal(tokens, _dataset_tokens(setup, len(idx), tmp_path))  # the trainer's samples, in order
    logprobs, ids = f.topk(idx)
    ref_vals, ref_ids = _reference(tiny_llama_dir, tokens)
    torch.testing.assert_close(logprobs.double(), ref_vals[..., :K], rtol=rtol, atol=1e-4)
    clear = (ref_vals[..., :K] - ref_vals[..., 1:]).min(-1).values > 1e-4  # no near-tie within the top K + 1
    assert clear.float().mean() > 0.9
    assert torch.equal(ids[clear], ref_ids[..., :K][clear])
    tail = 1 - logprobs.double().exp().sum(-1)  # the mass outside the top K is what the reference leaves
    torch.testing.assert_close(tail, 1 - ref_vals[..., :K].exp().sum(-1), rtol=0, atol=K * rtol)
    assert f.topk(idx[:3], 2)[1].equal(ids[:3, :, :2])  # a smaller K is the prefix


def _loss_and_grads(root, file_dir, tp):
    """Online top-K KD (the teacher model) and offline (the file), loss and d loss / d student logits shard."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.distill.losses import topk_kl
    from megatron_prune.distill.offline import TeacherLogitsFile, offline_topk_kl
    from megatron_prune.forward import position_ids_like
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, 1)
    student, s_meta = load_model(root / "student")
    teacher, _ = load_model(root / "teacher")
    f = TeacherLogitsFile(file_dir)
    idx = [4, 5, 11]
    tokens = f.tokens(idx)
    with torch.no_grad():
        t_logits = teacher(tokens, position_ids_like(tokens), None)
        s_logits = student(tokens, position_ids_like(tokens), None)
    weights = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(0))
    out = []
    for tau, k in ((1.0, K), (2.0, K), (1.0, 3)):
        results = []
        for offline in (False, True):
            s = s_logits.detach().clone().requires_grad_(True)
            if offline:
                logprobs, ids = f.topk(idx, k)
                loss = offline_topk_kl(s, logprobs, ids, tau)
            else:
                loss = topk_kl(s, t_logits, k, tau, vocab_size=s_meta.arch.vocab_size)
            (grad,) = torch.autograd.grad((loss * weights).sum(), s)
            results.append((loss.detach(), grad))
        out.append(results)
    return out


def test_offline_loss_and_gradients_equal_the_online_top_k_at_tp2(setup, files):
    """Student and teacher logits split over 2 TP ranks (TP1 is the run below)."""
    for rank_out in run_ranks(_loss_and_grads, 2, setup, files / "fp32", 2):
        for (online_loss, online_grad), (offline_loss, offline_grad) in rank_out:
            assert online_loss.abs().min() > 0 and online_grad.abs().sum() > 0
            torch.testing.assert_close(offline_loss, online_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(offline_grad, online_grad, rtol=1e-5, atol=1e-7)


def _train(root, out, tp, teacher_logits=None, steps=STEPS, **kw):
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import train

    cfg = TrainConfig(teacher=None if teacher_logits else str(root / "teacher"), teacher_logits=teacher_logits,
                      student=str(root / "student"), data=[str(root / "data")], out=str(out), tp=tp, seq_len=SEQ,
                      micro_batch_size=2, global_batch_size=GBS, steps=steps, lr=1e-2, min_lr=1e-3, warmup_steps=0,
                      kd_loss="topk", kd_top_k=K, ce_weight=0.5, save_every=0, dataset_cache=str(root / "cache"), **kw)
    return [(r["step"], r["loss"], r["kd"]) for r in train(cfg) if "loss" in r]


def test_a_run_from_the_file_has_the_online_loss_history(setup, files, tmp_path):
    (online,) = run_ranks(_train, 1, setup, tmp_path / "online", 1)
    (offline,) = run_ranks(_train, 1, setup, tmp_path / "offline", 1, str(files / "fp32"))
    student_tp2 = run_ranks(_train, 2, setup, tmp_path / "offline_tp2", 2, str(files / "fp32"))[0]
    assert len(online) == STEPS and len({loss for _, loss, _ in online}) == STEPS and all(kd > 0 for _, _, kd in online)
    for run in (offline, student_tp2):
        assert [s for s, _, _ in run] == [s for s, _, _ in online]
        np.testing.assert_allclose([(loss, kd) for _, loss, kd in run], [(loss, kd) for _, loss, kd in online],
                                   rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad inputs
def _distill_kw(setup, files, **kw):
    base = dict(student=str(setup / "student"), data=[str(setup / "data")], out=str(setup.parent / "never"),
                teacher_logits=str(files / "fp32"), seq_len=SEQ, global_batch_size=GBS, micro_batch_size=2,
                steps=STEPS, kd_loss="topk")
    base.update(kw)
    return base


def test_a_file_that_does_not_match_the_run_is_refused_with_the_fix(setup, files, tmp_path):
    from megatron_prune.pipelines.distill import distill

    other = tmp_path / "other"
    for suffix in (".bin", ".idx"):
        shutil.copy(str(setup / "data") + suffix, str(other) + suffix)
    bad_vocab = tmp_path / "vocab"
    shutil.copytree(files / "fp32", bad_vocab)
    meta = json.loads((bad_vocab / "metadata.json").read_text())
    (bad_vocab / "metadata.json").write_text(json.dumps({**meta, "vocab_size": 2000}))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "options.json").write_text("{}")
    cases = [
        (dict(teacher_logits=str(tmp_path / "missing")),
         r"does not exist; write it first with `megatron-prune teacher-logits"),
        (dict(teacher_logits=str(unfinished)), r"unfinished write: run the same `teacher-logits` command again"),
        (dict(teacher_logits=str(bad_vocab)), r"vocabulary of 2000 tokens, the student has 1000"),
        (dict(seq_len=32), r"--seq-len 16, the run uses 32; pass --seq-len 16"),
        (dict(data=[str(other)]), r"written on --data .*/data, the run uses --data .*/other"),
        (dict(seed=7), r"--seed 1234 .* the run uses 7; pass --seed 1234"),
        (dict(steps=STEPS + 1), r"holds 12 samples, the run needs 16 .* \(--samples 16\)"),
        (dict(kd_top_k=K + 1), r"--kd-top-k 6 is more than the 5 tokens"),
        (dict(kd_loss="forward"), r"top-K only: pass --kd-loss topk"),
        (dict(teacher=str(setup / "teacher")), r"--teacher .* or --teacher-logits .*, not both"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            distill(None, **_distill_kw(setup, files, **overrides))
    assert not (setup.parent / "never").exists()


def test_a_file_written_on_other_tokens_is_refused_before_training(setup, files, tmp_path):
    """Same names but other content: the stored input tokens catch it at start-up."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "data.bin"), dtype=np.int32)
    rng = np.random.default_rng(1)
    for _ in range(30):
        builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=50, dtype=np.int32)), [50])
    builder.finalize(str(tmp_path / "data.idx"))
    shutil.copytree(files / "fp32", tmp_path / "file")
    meta = json.loads((tmp_path / "file" / "metadata.json").read_text())
    (tmp_path / "file" / "metadata.json").write_text(json.dumps({**meta, "data": [str(tmp_path / "data")]}))
    root = tmp_path  # the run's data is tmp_path/data; the checkpoints come from setup
    for name in ("teacher", "student"):
        (root / name).symlink_to(setup / name)
    with pytest.raises(RuntimeError, match=r"training sample 0 holds other tokens .* rewrite it"):
        run_ranks(_train, 1, root, tmp_path / "run", 1, str(tmp_path / "file"))


def test_writer_refuses_bad_options_and_resumes_an_interrupted_write(setup, files, tmp_path):
    from megatron_prune.distill.offline import TeacherLogitsFile
    from megatron_prune.pipelines.teacher_logits import teacher_logits

    base = dict(teacher=setup / "teacher", data=[str(setup / "data")], out=tmp_path / "out", seq_len=SEQ, top_k=K,
                samples=4)
    for overrides, message in [
        (dict(top_k=1001), r"--top-k 1001 is more than the teacher's vocabulary \(1000\)"),
        (dict(tokens=64), r"exactly one of --samples N or --tokens N"),
        (dict(dtype="int8"), r"--dtype 'int8': choose one of float16, bfloat16, float32"),
        (dict(out=files / "fp32"), r"already exists; choose another path or pass --overwrite"),
        (dict(data=[str(tmp_path / "nodata")]), r"no indexed dataset"),
    ]:
        with pytest.raises(ValueError, match=message):
            teacher_logits(**{**base, **overrides})
    # an interrupted write: chunk 1 of 3 and the metadata missing, the options file in place
    partial = tmp_path / ".resumed.partial"
    shutil.copytree(files / "fp32", partial)
    meta = json.loads((partial / "metadata.json").read_text())
    (partial / "metadata.json").unlink()
    (partial / "chunk_000001.npz").unlink()
    from megatron_prune.distill.offline import LogitsFileMeta

    (partial / "options.json").write_text(json.dumps(LogitsFileMeta.from_dict(meta).options()))
    with pytest.raises(ValueError, match="unfinished teacher-logits write with other options"):
        teacher_logits(**{**base, "out": tmp_path / "resumed", "samples": STEPS * GBS, "chunk_samples": 5})
    run_ranks(_write, 1, setup, tmp_path / "resumed", 1, 1, "float32", STEPS * GBS, 5)
    assert not partial.exists()
    a, b = TeacherLogitsFile(tmp_path / "resumed"), TeacherLogitsFile(files / "fp32")
    idx = list(range(STEPS * GBS))
    assert torch.equal(a.tokens(idx), b.tokens(idx))
    for x, y in zip(a.topk(idx), b.topk(idx)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_cli_one_line_errors(setup, tmp_path):
    import os
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "megatron_prune.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})

    out = cli("distill", "--teacher-logits", str(tmp_path / "none"), "--kd-loss", "topk", "--student",
              str(setup / "student"), "--data", str(setup / "data"), "--out", str(tmp_path / "run"), "--steps", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--teacher-logits {tmp_path / 'none'} does not exist; write it first" in out.stderr
    assert not (tmp_path / "run").exists()
