"""The shipped recipes: they parse, reference only earlier stages, and their prune targets give the published
model sizes when applied to the published source shapes (written out here from the model cards)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LLAMA31_8B = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
                  vocab_size=128256, kv_channels=128)
MISTRAL_NEMO_12B = dict(num_layers=40, hidden_size=5120, ffn_hidden_size=14336, num_attention_heads=32,
                        num_query_groups=8, vocab_size=131072, kv_channels=128, model_type="mistral")


@pytest.mark.parametrize("recipe,source,published", [
    ("llama31_8b_minitron.yaml", LLAMA31_8B, {"width-pruned": 4.51e9, "depth-pruned": 4.54e9}),
    ("mistral_nemo_minitron.yaml", MISTRAL_NEMO_12B, {"pruned": 8.41e9}),
])
def test_recipe_targets_give_published_sizes(recipe, source, published):
    from megatron_prune.arch import ModelArch
    from megatron_prune.prune import PruneTarget, target_arch
    from megatron_prune.recipe import load_recipe

    r = load_recipe(REPO / "examples" / recipe)
    src = ModelArch(**source)
    for name, size in published.items():
        arch = target_arch(src, PruneTarget.parse(r.stage(name).options["target"]))
        assert abs(arch.param_count() / size - 1) < 0.005, (name, arch.param_count())
        arch.check_parallel(r.stage(name).tp, r.stage(name).pp)


def test_every_shipped_recipe_loads():
    from megatron_prune.recipe import load_recipe

    recipes = sorted((REPO / "examples").glob("*.yaml"))
    for path in recipes:
        if "stages" in path.read_text():
            assert load_recipe(path).stages, path
