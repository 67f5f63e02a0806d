"""ModelArch: exact parameter counts (against transformers' own models) and config mappings."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_prune.arch import ArchError, ModelArch


def hf_param_count(config) -> int:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


CONFIGS = [
    transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),  # SmolLM2-135M
    transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),  # Llama-3.1-8B
    transformers.Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    transformers.MistralConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=None),
    transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    transformers.Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),  # Qwen3-4B
    transformers.Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}),  # Qwen3-8B
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.model_type}-{c.hidden_size}")
def test_param_count_equals_transformers(config):
    arch = ModelArch.from_hf_config(config)
    assert arch.param_count() == hf_param_count(config)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.model_type}-{c.hidden_size}")
def test_hf_config_roundtrip(config):
    arch = ModelArch.from_hf_config(config)
    again = ModelArch.from_hf_config(arch.to_hf_config())
    assert again == arch
    assert ModelArch.from_dict(arch.to_dict()) == arch


def test_llama31_rope_scaling_maps_to_megatron():
    cfg = transformers.LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
    arch = ModelArch.from_hf_config(cfg)
    assert arch.rope_scaling_factor == 8.0 and arch.rope_base == 500000.0


def test_megatron_config_and_parallel_checks():
    arch = ModelArch(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8, num_query_groups=4,
                     vocab_size=1000)
    cfg = arch.to_transformer_config(tp=2, pp=2)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size) == (4, 8, 96)
    assert arch.padded_vocab_size == 1024
    with pytest.raises(ArchError, match="num_query_groups=4 is not divisible by TP=8"):
        arch.check_parallel(8, 1)
    arch.check_parallel(1, 3)  # stages of unequal depth ([1, 2, 1]: runtime/stages.py)
    with pytest.raises(ArchError, match="PP=5 is more than num_layers=4"):
        arch.check_parallel(1, 5)


@pytest.mark.parametrize("bad,match", [
    (transformers.GPT2Config(), "unsupported Hugging Face model_type 'gpt2'"),
    (transformers.LlamaConfig(hidden_act="gelu"), "hidden_act='gelu'"),
    (transformers.MistralConfig(sliding_window=4096), "sliding-window attention"),
    (transformers.LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "yarn"),
])
def test_unsupported_configs_are_rejected(bad, match):
    with pytest.raises(ArchError, match=match):
        ModelArch.from_hf_config(bad)


def test_heads_must_divide_into_groups():
    with pytest.raises(ArchError, match="multiple of num_query_groups"):
        ModelArch(num_layers=1, hidden_size=64, ffn_hidden_size=64, num_attention_heads=6, num_query_groups=4,
                  vocab_size=10)
