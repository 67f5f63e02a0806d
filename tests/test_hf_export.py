"""Every pruned shape exports to a Hugging Face directory that transformers loads (in a fresh process) and that
gives our logits; failed exports leave nothing behind; outputs follow the umask and never overlap inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from distributed_utils import run_ranks
from test_conversion import TOL, megatron_logits, sample_tokens
from test_prune import fake_scores

VOCAB = 256
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=2)
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# (name, source model_type, source overrides, prune target, model_type expected in the export)
CASES = [
    ("llama-hidden", "llama", {}, "hidden=40", "llama"),  # 40 % 8 == 0 but head_dim 8 != 40 / 8
    ("llama-hidden-indivisible", "llama", {}, "hidden=36", "mistral"),  # 36 % 8 != 0
    ("llama-ffn", "llama", {}, "ffn=48", "llama"),
    ("llama-heads", "llama", {}, "heads=4", "llama"),  # head_dim 8 != 64 / 4
    ("llama-heads-groups-indivisible", "llama", {}, "heads=6,query_groups=3", "mistral"),  # 64 % 6 != 0
    ("llama-groups", "llama", {}, "query_groups=2", "llama"),
    # the demo's width target on SmolLM2 (576 = 9 x 64 -> hidden=448, 9 heads, 3 groups, ffn 1536 -> 1024), scaled down
    ("demo-width-standin", "llama", dict(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                                         tie_word_embeddings=True), "hidden=56,ffn=64", "mistral"),
    ("mistral-explicit-head-dim", "mistral", dict(head_dim=16, sliding_window=None),
     "hidden=40,heads=6,groups=3,ffn=64", "mistral"),
    ("qwen2-biases-tied", "qwen2", dict(tie_word_embeddings=True), "hidden=36,heads=4,query_groups=2,ffn=64", "qwen2"),
    ("llama31-rope-scaling", "llama", dict(rope_parameters=LLAMA31_ROPE, max_position_embeddings=16384),
     "hidden=42,query_groups=2,ffn=80", "mistral"),
]

HF_LOGITS_SCRIPT = """
import json, sys, torch, transformers
dirs, tokens_file, out_file = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
tokens = torch.load(tokens_file)
out = {}
for name, d in dirs.items():
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    except Exception as e:  # reported by the test of this directory
        out[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        continue
    with torch.no_grad():
        out[name] = {"logits": model(tokens).logits, "class": type(model).__name__}
torch.save(out, out_file)
"""


def hf_logits_fresh_process(dirs: dict, tokens: torch.Tensor, tmp: Path, python: str = sys.executable) -> dict:
    """Load every directory with AutoModelForCausalLM in a new interpreter (nothing of ours imported there)."""
    torch.save(tokens, tmp / "tokens.pt")
    run = subprocess.run([python, "-c", HF_LOGITS_SCRIPT, json.dumps({k: str(v) for k, v in dirs.items()}),
                          str(tmp / "tokens.pt"), str(tmp / "hf_logits.pt")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp / "hf_logits.pt")


def _prune_export_all(root: Path, cases, tokens) -> dict:
    """In one rank: import each source, prune it by a plan from random scores, export it; our logits per case."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint import read_meta
    from megatron_prune.pipelines.convert import hf_to_megatron, megatron_to_hf
    from megatron_prune.pipelines.prune import prune
    from megatron_prune.prune import PruneTarget, make_plan

    logits = {}
    for name, _, _, target, _ in cases:
        src = hf_to_megatron(root / name / "hf", root / name / "ckpt")
        arch: ModelArch = read_meta(src).arch
        make_plan(fake_scores(arch), arch, PruneTarget.parse(target)).save(root / name / "plan.json")
        prune(src, root / name / "pruned", plan_file=root / name / "plan.json")
        logits[name] = megatron_logits(root / name / "pruned", 1, 1, tokens)
        try:  # one case failing to export must not hide the others
            megatron_to_hf(root / name / "pruned", root / name / "export")
        except Exception as e:
            logits[name] = f"export failed: {e}"
    return logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case pruned and exported once; our fp32 logits and transformers' (fresh process) for each."""
    root = tmp_path_factory.mktemp("hf_export")
    for name, model_type, overrides, _, _ in CASES:
        make_hf_model(root / name / "hf", model_type, **{**SMALL, **overrides})
    tokens = sample_tokens(VOCAB)
    ours = run_ranks(_prune_export_all, 1, root, CASES, tokens)[0]
    theirs = hf_logits_fresh_process({name: root / name / "export" for name, *_ in CASES
                                      if isinstance(ours[name], torch.Tensor)}, tokens, root)
    return root, ours, theirs


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pruned_model_exports_and_transformers_gives_our_logits(exported, case):
    root, ours, theirs = exported
    name, _, _, _, model_type = case
    assert isinstance(ours[name], torch.Tensor), ours[name]
    assert "logits" in theirs[name], f"transformers cannot load the export: {theirs[name]['error']}"
    cfg = json.loads((root / name / "export" / "config.json").read_text())
    meta = json.loads((root / name / "pruned" / "megatron_prune.json").read_text())["arch"]
    assert cfg["model_type"] == model_type
    assert cfg["architectures"] == [theirs[name]["class"]]
    assert cfg["head_dim"] == meta["kv_channels"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == \
        (meta["hidden_size"], meta["num_attention_heads"], meta["num_query_groups"], meta["ffn_hidden_size"])
    diff = (ours[name] - theirs[name]["logits"]).abs().max().item()
    assert diff <= TOL, f"{name}: max |logits diff| {diff}"


def test_exported_files_follow_the_umask(exported):
    root, _, _ = exported
    umask = os.umask(0o022)
    os.umask(umask)
    files = [f for f in (root / "llama-ffn" / "export").iterdir() if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_score_file_follows_the_umask(tmp_path):
    from megatron_prune.arch import ModelArch

    umask = os.umask(0o022)
    os.umask(umask)
    arch = ModelArch(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     vocab_size=64)
    path = fake_scores(arch).save(tmp_path / "x.scores")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------- configs of pruned shapes, no weights
def test_indivisible_llama_shape_gets_a_loadable_config_with_explicit_head_dim(tmp_path):
    import transformers

    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import write_hf_config

    # Minitron-8B (hidden 4096, 48 heads, kv 128) and the demo's pruned SmolLM2 (448, 9 heads, kv 64)
    for hidden, heads, groups, kv in ((4096, 48, 8, 128), (448, 9, 3, 64), (512, 6, 2, 64)):
        arch = ModelArch(num_layers=2, hidden_size=hidden, ffn_hidden_size=64, num_attention_heads=heads,
                         num_query_groups=groups, kv_channels=kv, vocab_size=128, rope_base=500000.0)
        write_hf_config(arch.to_hf_config(), tmp_path, arch)
        back = transformers.AutoConfig.from_pretrained(tmp_path)
        assert (back.hidden_size, back.num_attention_heads, back.head_dim) == (hidden, heads, kv)
        assert back.sliding_window is None and back.architectures == ["MistralForCausalLM"]
        assert ModelArch.from_hf_config(back.to_dict()).replace(model_type="llama") == arch


def test_qwen2_config_always_has_head_dim():
    from megatron_prune.arch import ModelArch

    arch = ModelArch(num_layers=2, hidden_size=36, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     kv_channels=8, vocab_size=128, qkv_bias=True, model_type="qwen2")
    cfg = arch.to_hf_config().to_dict()
    assert cfg["head_dim"] == 8 and cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]


def test_prune_refuses_a_target_no_hf_config_can_hold_before_any_work(tmp_path):
    """Llama with biases on every linear layer has no Mistral fallback: hidden % heads != 0 cannot be exported."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.pipelines.prune import prune
    from megatron_prune.prune import PlanError, PruneTarget, make_plan

    arch = ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                     vocab_size=256, qkv_bias=True, linear_bias=True)
    make_plan(fake_scores(arch), arch, PruneTarget.parse("hidden=36")).save(tmp_path / "plan.json")
    src = tmp_path / "src"  # only what the checks before any work read: our metadata and the dist-checkpoint markers
    src.mkdir()
    (src / "megatron_prune.json").write_text(json.dumps({"format_version": 1, "arch": arch.to_dict()}))
    (src / "metadata.json").write_text("{}")
    (src / ".metadata").write_text("")
    with pytest.raises(PlanError, match="could not be exported to Hugging Face.*hidden % heads == 0"):
        prune(src, tmp_path / "out", plan_file=tmp_path / "plan.json")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- a failing export cleans up
def _export_failing_at_the_end(ckpt, out):
    import megatron_prune.checkpoint.hf as hf
    from megatron_prune.pipelines.convert import megatron_to_hf

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    hf.copy_tokenizer_files = disk_full  # after the weights are written: the costly part of a partial export
    hf.write_hf_config = disk_full
    try:
        megatron_to_hf(ckpt, out)
    except OSError as e:
        return str(e)
    return None


def test_failed_export_leaves_no_temporary_directory(exported, tmp_path):
    root, _, _ = exported
    (error,) = run_ranks(_export_failing_at_the_end, 1, root / "llama-ffn" / "pruned", tmp_path / "export")
    assert error is not None and "No space left" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------- outputs never overlap inputs
def test_check_output_path(tmp_path):
    from megatron_prune.checkpoint.outputs import OutputPathError, check_output_path

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "link").symlink_to(ckpt)
    for out, relation in [(ckpt, "is"), (tmp_path / "link", "is"), (tmp_path, "contains"), (ckpt / "sub", "is inside"),
                          (tmp_path / "link" / "sub", "is inside")]:
        with pytest.raises(OutputPathError, match=f"{relation} the input checkpoint"):
            check_output_path(out, {"input checkpoint": ckpt, "score file": None})
    check_output_path(tmp_path / "ckpt-pruned", {"input checkpoint": ckpt})  # a sibling with a common prefix is fine


def test_verbs_refuse_an_output_that_overlaps_an_input(exported, tmp_path):
    from megatron_prune.checkpoint.outputs import OutputPathError
    from megatron_prune.pipelines.convert import convert
    from megatron_prune.pipelines.distill import distill
    from megatron_prune.pipelines.importance import score_checkpoint
    from megatron_prune.pipelines.prune import prune

    root, _, _ = exported
    ckpt = root / "llama-ffn" / "ckpt"
    plan = root / "llama-ffn" / "plan.json"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    with pytest.raises(OutputPathError, match="--out .* is the input checkpoint"):
        prune(ckpt, ckpt, plan_file=plan, overwrite=True)
    with pytest.raises(OutputPathError, match="contains the input checkpoint"):
        prune(ckpt, ckpt.parent, plan_file=plan, overwrite=True)
    with pytest.raises(OutputPathError, match="is the plan file"):
        prune(ckpt, tmp_path / "out", plan_file=plan, plan_out=plan)
    with pytest.raises(OutputPathError, match="is inside the source"):
        convert(ckpt, ckpt / "hf", overwrite=True)
    with pytest.raises(OutputPathError, match="is inside the input checkpoint"):
        score_checkpoint(ckpt, tmp_path / "data", ckpt / "x.scores")
    with pytest.raises(OutputPathError, match="is the student checkpoint"):
        distill(student=str(ckpt), teacher=str(root / "llama-groups" / "ckpt"), data=str(tmp_path / "data"),
                out=str(ckpt), steps=1)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before


def test_prune_onto_its_own_input_from_the_command_line(exported):
    root, _, _ = exported
    ckpt = root / "llama-ffn" / "ckpt"
    run = subprocess.run([sys.executable, "-m", "megatron_prune.cli", "prune", str(ckpt), "--plan",
                          str(root / "llama-ffn" / "plan.json"), "--out", str(ckpt), "--overwrite"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert "is the input checkpoint" in run.stderr and "Choose an output path outside the inputs" in run.stderr
    assert json.loads((ckpt / "megatron_prune.json").read_text())["arch"]["ffn_hidden_size"] == 96
