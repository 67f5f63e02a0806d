"""Checkpoint safety: clear errors, atomic writes, inputs never modified."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from distributed_utils import run_ranks


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _convert(hf_dir, out, tp):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, tp=tp)


def _load(ckpt, arch_dict=None):
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint import load_into, load_model
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    if arch_dict is None:
        load_model(ckpt)
    else:
        arch = ModelArch.from_dict(arch_dict)
        load_into(build_model(arch), ckpt, arch)


@pytest.fixture(scope="module")
def ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "tiny"
    before = tree_digest(tiny_llama_dir)
    run_ranks(_convert, 2, tiny_llama_dir, out, 2)
    assert tree_digest(tiny_llama_dir) == before  # the input was only read
    return out


def test_written_atomically_with_metadata_and_tokenizer_slot(ckpt):
    assert not (ckpt.parent / f".{ckpt.name}.tmp").exists()
    meta = json.loads((ckpt / "megatron_prune.json").read_text())
    assert meta["arch"]["num_query_groups"] == 4 and meta["provenance"]["source_format"] == "huggingface"


def test_loading_never_modifies_the_checkpoint(ckpt):
    before = tree_digest(ckpt)
    run_ranks(_load, 1, ckpt)
    assert tree_digest(ckpt) == before


def test_refuses_to_overwrite(ckpt, tiny_llama_dir):
    with pytest.raises(RuntimeError, match="already exists"):
        run_ranks(_convert, 1, tiny_llama_dir, ckpt, 1)


@pytest.mark.parametrize("case", ["missing", "hf_dir", "no_meta", "bad_meta", "no_dist_files", "other_arch"])
def test_clear_errors(case, ckpt, tiny_llama_dir, tmp_path):
    from megatron_prune.checkpoint import CheckpointError, read_meta

    arch = json.loads((ckpt / "megatron_prune.json").read_text())["arch"]
    target = tmp_path / "broken"
    if case == "missing":
        target, match = tmp_path / "nope", "does not exist"
    elif case == "hf_dir":
        target, match = tiny_llama_dir, "Hugging Face model: convert it first"
    elif case == "no_meta":
        target.mkdir()
        match = "megatron_prune.json is missing"
    elif case == "bad_meta":
        target.mkdir()
        (target / "megatron_prune.json").write_text("{not json")
        match = "is corrupt"
    elif case == "no_dist_files":
        target.mkdir()
        (target / "megatron_prune.json").write_text((ckpt / "megatron_prune.json").read_text())
        match = "no megatron distributed-checkpoint files"
    else:
        arch = dict(arch, ffn_hidden_size=64)
        with pytest.raises(RuntimeError, match="different architecture"):
            run_ranks(_load, 1, ckpt, arch)
        return
    with pytest.raises(CheckpointError, match=match):
        read_meta(target)


def test_interrupted_write_leaves_no_valid_looking_checkpoint(tmp_path):
    """A crash between the dist-checkpoint write and the rename leaves only the hidden .tmp directory."""
    from megatron_prune.checkpoint import CheckpointError, read_meta

    out = tmp_path / "model"
    tmp = tmp_path / ".model.tmp"
    tmp.mkdir()
    (tmp / "metadata.json").write_text("{}")
    assert not out.exists()
    with pytest.raises(CheckpointError, match="unfinished write"):
        read_meta(tmp)


def test_common_state_missing_names_the_megatron_release(ckpt, tmp_path):
    """megatron-core 0.16/0.17 write the common state to common.pt (and 'common_backend' to metadata.json);
    0.19 keeps it in the shards and writes neither, which 0.16 cannot read. A copy without common.pt is a damaged
    0.16 checkpoint (named as corrupt) unless its metadata says it is a 0.19 one (then the message says so).
    Under 0.19 (CI's second leg) the checkpoint has no common.pt and loads."""
    import shutil

    if not (ckpt / "common.pt").exists():  # this megatron-core keeps the common state in the shards
        assert "common_backend" not in json.loads((ckpt / "metadata.json").read_text())
        run_ranks(_load, 1, ckpt)
        return
    damaged, newer = tmp_path / "damaged", tmp_path / "newer"
    for copy in (damaged, newer):
        shutil.copytree(ckpt, copy)
        (copy / "common.pt").unlink()
    meta = json.loads((newer / "metadata.json").read_text())
    (newer / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("common_")}))
    with pytest.raises(RuntimeError, match=r"is corrupt.*common\.pt"):
        run_ranks(_load, 1, damaged)
    with pytest.raises(RuntimeError,
                       match=r"written by megatron-core 0\.19 or later.*read it with megatron-core >= 0\.19"):
        run_ranks(_load, 1, newer)
