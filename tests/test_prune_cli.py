"""`megatron-prune importance` and `prune` as a user runs them, single process and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from distributed_utils import run_ranks


def cli(*args, nproc: int = 1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    out = subprocess.run([*launcher, "-m", "megatron_prune.cli", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    return out


def _convert(hf_dir, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    """The tiny model as a checkpoint, and an indexed dataset of random tokens written with megatron's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = tmp_path_factory.mktemp("prune_cli")
    run_ranks(_convert, 1, tiny_llama_dir, root / "ckpt")
    builder = IndexedDatasetBuilder(str(root / "data.bin"), dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=60, dtype=np.int32)), [60])
    builder.finalize(str(root / "data.idx"))
    return root


def test_importance_then_prune_from_the_command_line(tiny, tmp_path):
    from megatron_prune.importance import ImportanceScores

    common = ["--data", tiny / "data", "--samples", "12", "--seq-len", "16", "--micro-batch-size", "2"]
    one = cli("importance", tiny / "ckpt", *common, "--out", tmp_path / "tp1.scores")
    assert one.returncode == 0, one.stderr[-2000:]
    two = cli("importance", tiny / "ckpt", *common, "--out", tmp_path / "tp2.scores", "--tp", "2", nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ImportanceScores.load(tmp_path / "tp1.scores"), ImportanceScores.load(tmp_path / "tp2.scores")
    for field in ("mlp", "heads", "query_groups", "embedding", "block_influence"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=0)

    dry = cli("prune", tiny / "ckpt", "--scores", tmp_path / "tp1.scores", "--target", "hidden=48,ffn=64,layers=2",
              "--plan-out", tmp_path / "plan.json")
    assert dry.returncode == 0 and "hidden 48, FFN 64" in dry.stdout, dry.stderr[-2000:]
    assert not (tmp_path / "pruned").exists()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["kept_layers"]) == 2 and len(plan["kept_hidden"]) == 48

    out = cli("prune", tiny / "ckpt", "--plan", tmp_path / "plan.json", "--out", tmp_path / "pruned", "--pp", "2",
              nproc=2)
    assert out.returncode == 0, out.stderr[-2000:]
    ev = cli("eval", tmp_path / "pruned", "--data", tiny / "data", "--seq-len", "16", "--micro-batch-size", "2")
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["tokens"] > 0


def test_prune_errors_are_clear_and_early(tiny, tmp_path):
    bad = cli("prune", tiny / "ckpt", "--scores", tmp_path / "missing.scores", "--target", "hidden=32",
              "--out", tmp_path / "x")
    assert bad.returncode == 2 and "compute it with `megatron-prune importance`" in bad.stderr
    both = cli("prune", tiny / "ckpt", "--target", "hidden=32", "--out", tmp_path / "x")
    assert both.returncode == 2 and "either --plan" in both.stderr
    assert not (tmp_path / "x").exists()
