"""The architecture families (megatron_prune/models/): every table row is used, every parameter is covered,
and the pruning axes are the one list that --target, search spaces and score files read."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from distributed_utils import run_ranks

# (family variant, HF config overrides): every kind of parameter a family's table must cover
VARIANTS = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("mistral", {"head_dim": 12}),
    ("qwen2", {}),
    ("qwen3", {"head_dim": 12, "tie_word_embeddings": True}),
]


def _names_both_ways(variants):
    """Inside a rank: for each variant, megatron's parameter names, and the HF names our table maps them to."""
    import transformers

    from megatron_prune.checkpoint.hf import hf_tensors_for_param
    from megatron_prune.model import build_model
    from megatron_prune.models import family_of
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    out = []
    for model_type, overrides in variants:
        from megatron_prune.arch import ModelArch

        config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                      "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
        cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, sliding_window=None)
        arch = ModelArch.from_hf_config(config_cls(**{**cfg, **overrides}))
        model = build_model(arch, use_te=False)
        ours = {}
        for name, p in model.named_parameters():
            family_of(arch).param(name)  # KeyError when the table misses it
            for hf_name, value in hf_tensors_for_param(name, p.detach(), arch, 0):
                assert hf_name not in ours, f"{hf_name} written twice"
                ours[hf_name] = tuple(value.shape)
        reference = transformers.AutoModelForCausalLM.from_config(arch.to_hf_config())
        theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        if arch.tie_embeddings:
            theirs.pop("lm_head.weight")
        out.append((model_type, ours, theirs))
    return out


def test_every_hf_tensor_comes_from_exactly_one_table_row():
    for model_type, ours, theirs in run_ranks(_names_both_ways, 1, VARIANTS)[0]:
        assert ours == theirs, model_type


def test_axes_are_the_names_target_search_and_scores_use():
    from megatron_prune.arch import ModelArch
    from megatron_prune.importance.scores import AXIS_SCORES
    from megatron_prune.models import AXES
    from megatron_prune.prune.plan import TARGET_ALIASES, PruneTarget
    from megatron_prune.prune.search_space import SearchSpace

    names = {a.name for a in AXES}
    assert names == {f.name for f in dataclasses.fields(SearchSpace)}
    assert names == set(AXIS_SCORES)
    assert {a.arch_field for a in AXES} <= {f.name for f in dataclasses.fields(ModelArch)}
    assert {a.arch_field for a in AXES} <= {f.name for f in dataclasses.fields(PruneTarget)}
    for a in AXES:
        assert TARGET_ALIASES[a.name] == a.arch_field
        assert getattr(PruneTarget.parse(f"{a.name}=3"), a.arch_field) == 3


def test_every_param_dimension_has_a_known_kind_and_tp_dim_in_range():
    from megatron_prune.models import FAMILIES
    from megatron_prune.models.family import DIM_KINDS

    for family in FAMILIES:
        megatron_names = [(p.layer, p.megatron) for p in family.params]
        assert len(megatron_names) == len(set(megatron_names)), family.name
        for p in family.params:
            assert all(kind in DIM_KINDS for kind in p.dims)
            assert p.tp_dim is None or 0 <= p.tp_dim < len(p.dims), p
            assert "hidden" != (p.dims[p.tp_dim] if p.tp_dim is not None else None), p  # hidden is never TP-split


def test_files_written_before_qk_norm_existed_still_load():
    from megatron_prune.arch import ModelArch

    old = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 8,
           "num_query_groups": 4, "vocab_size": 1000, "kv_channels": 8, "max_position_embeddings": 256,
           "normalization": "RMSNorm", "norm_eps": 1e-5, "activation": "swiglu", "rope_base": 10000.0,
           "rope_scaling_factor": None, "tie_embeddings": False, "qkv_bias": False, "linear_bias": False,
           "model_type": "llama"}
    arch = ModelArch.from_dict(old)
    assert arch.qk_norm is False and arch.param_count() == ModelArch.from_dict({**old, "qk_norm": False}).param_count()


@pytest.mark.parametrize("heads,head_dim", [(8, 12), (6, 16)])
def test_qwen3_param_count_equals_transformers(heads, head_dim):
    import transformers

    from megatron_prune.arch import ModelArch

    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert ModelArch.from_hf_config(cfg).param_count() == sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
