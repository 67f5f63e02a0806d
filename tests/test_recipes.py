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
    from megatron_prune.pipelines.recipe import load_recipe
    from megatron_prune.prune import PruneTarget, target_arch

    r = load_recipe(REPO / "examples" / recipe)
    src = ModelArch(**source)
    for name, size in published.items():
        arch = target_arch(src, PruneTarget.parse(r.stage(name).options["target"]))
        assert abs(arch.param_count() / size - 1) < 0.005, (name, arch.param_count())
        arch.check_parallel(r.stage(name).tp, r.stage(name).pp)


def test_every_shipped_recipe_loads():
    from megatron_prune.pipelines.recipe import load_recipe

    recipes = sorted((REPO / "examples").glob("*.yaml"))
    for path in recipes:
        if "stages" in path.read_text():
            assert load_recipe(path).stages, path


LLAMA31_70B = dict(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, num_query_groups=8,
                   vocab_size=128256, kv_channels=128)


def test_70b_family_shapes_and_layouts_fit():
    """70B -> 34B -> 8B: the 8B has Llama-3.1-8B's published size (8.03B), and every distillation stage's layout
    (with the data parallelism of the node counts in the recipe's header) fits an 80 GiB H100 by the planner."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.pipelines.memory_plan import plan
    from megatron_prune.pipelines.recipe import load_recipe
    from megatron_prune.prune import PruneTarget, target_arch

    r = load_recipe(REPO / "examples" / "llama31_70b_family.yaml")
    teacher = ModelArch(**LLAMA31_70B)
    mid = target_arch(teacher, PruneTarget.parse(r.stage("pruned-34b").options["target"]))
    small = target_arch(mid, PruneTarget.parse(r.stage("pruned-8b").options["target"]))
    assert abs(mid.param_count() / 34.3e9 - 1) < 0.01, mid.param_count()
    assert abs(small.param_count() / 8.03e9 - 1) < 0.005, small.param_count()

    def shape(a):
        return (f"layers={a.num_layers},hidden={a.hidden_size},ffn={a.ffn_hidden_size},heads={a.num_attention_heads},"
                f"groups={a.num_query_groups},vocab={a.vocab_size}")

    for stage, student, nodes in (("distill-34b", mid, 16), ("distill-8b", small, 16)):
        s = r.stage(stage)
        o = s.options
        result = plan(shape(student), teacher=shape(teacher), tp=s.tp, pp=s.pp, vpp=o["vpp"],
                      dp=nodes * 8 // (s.tp * s.pp), micro_batch_size=o["micro_batch_size"],
                      global_batch_size=o["global_batch_size"], seq_len=o["seq_len"], recompute="selective")
        layout, estimate = result["asked"]
        assert estimate.total <= 80 * 1024 ** 3, (stage, estimate)
        student.check_parallel(s.tp, s.pp)
        assert student.num_layers % (s.pp * o["vpp"]) == 0 and teacher.num_layers % (s.pp * o["vpp"]) == 0
