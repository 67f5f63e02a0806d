"""Importance scores: against naive reference code on transformers' activations, and identical at every layout."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from distributed_utils import run_ranks

AGGS = list(itertools.product(("mean", "l2", "variance"), repeat=2))  # (seq, batch)
RTOL = 1e-5
N_SAMPLES, SEQ = 10, 16  # 10 samples: uneven DP splits and short last micro-batches get exercised
LOSS_DROP_SIZES = (1, 2)


def calib_tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 1000, (N_SAMPLES, SEQ), generator=g)


def importance_worker(hf_dir, layouts, tokens, micro_batch_size, aggs, loss_drop_layouts=()):
    """Inside each rank: build the GPTModel shard from HF weights at every layout and score it."""
    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.hf import load_hf_into_model, read_hf_config
    from megatron_prune.importance import compute_importance, lm_loss_drop
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    out = {}
    for tp, pp in layouts:
        init_distributed(tp, pp)
        arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
        model = build_model(arch, use_te=False)
        load_hf_into_model(model, arch, hf_dir)
        for seq_agg, batch_agg in aggs:
            out[(tp, pp, seq_agg, batch_agg)] = compute_importance(
                model, arch, tokens, micro_batch_size, seq_agg, batch_agg, desc=None)
        if (tp, pp) in loss_drop_layouts:  # windows = the same tokens: 15 inputs + next-token labels
            out[(tp, pp, "loss_drop")] = lm_loss_drop(model, arch, tokens, 2, block_sizes=LOSS_DROP_SIZES)
    return out


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """TP1 PP1 DP1 scores for every aggregation pair (micro-batches of 3: 3+3+3+1)."""
    return run_ranks(importance_worker, 1, tiny_llama_dir, [(1, 1)], calib_tokens(), 3, AGGS, [(1, 1)])[0]


@pytest.fixture(scope="module")
def hf_activations(tiny_llama_dir):
    """Activations of transformers' own Llama on the same weights: [n, s, ...] per layer."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    acts = {"fc2_in": [], "o_proj_in": [], "ln1": [], "ln2": []}
    handles = []
    for layer in model.model.layers:
        handles += [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts["fc2_in"].append(a[0])),
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: acts["o_proj_in"].append(a[0])),
            layer.input_layernorm.register_forward_hook(lambda m, a, o: acts["ln1"].append(o)),
            layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: acts["ln2"].append(o)),
        ]
    final_in = []
    handles.append(model.model.norm.register_forward_pre_hook(lambda m, a: final_in.append(a[0])))
    with torch.no_grad():
        out = model(calib_tokens(), output_hidden_states=True)
    for h in handles:
        h.remove()
    L = model.config.num_hidden_layers
    # X_0..X_{L-1}: inputs of the layers; X_L: the last layer's output, before the final norm
    acts["X"] = list(out.hidden_states[:L]) + [final_in[0]]
    acts["cfg"] = model.config
    acts["o_proj_w"] = [layer.self_attn.o_proj.weight.detach() for layer in model.model.layers]
    return acts


def naive_agg(x: torch.Tensor, seq: str, batch: str) -> torch.Tensor:
    """x [n, s, units] -> [units]: aggregate over the sequence, then over the samples (float64)."""
    x = x.double()

    def agg(t, dim, how):
        if how == "mean":
            return t.abs().mean(dim)
        if how == "l2":
            return (t ** 2).sum(dim).sqrt()
        return ((t - t.mean(dim, keepdim=True)) ** 2).mean(dim)

    return agg(agg(x, 1, seq), 0, batch)


def assert_close(got, want, what, rtol=RTOL):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = ((got - want).abs() / want.abs().clamp(min=1e-12)).max().item()
    assert err <= rtol, f"{what}: max relative error {err:.2e}"


def test_width_scores_match_naive_transformers(reference, hf_activations):
    cfg = hf_activations["cfg"]
    L, H, G, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for seq, batch in AGGS:
        s = reference[(1, 1, seq, batch)]
        assert s.num_samples == N_SAMPLES and s.seq_len == SEQ and (s.seq_agg, s.batch_agg) == (seq, batch)
        mlp = torch.stack([naive_agg(a, seq, batch) for a in hf_activations["fc2_in"]])
        heads = torch.stack([naive_agg(a.reshape(*a.shape[:2], H, kv).norm(dim=-1), seq, batch)
                             for a in hf_activations["o_proj_in"]])
        groups = heads.reshape(L, G, H // G).pow(2).sum(-1).sqrt()
        emb_layers = torch.stack([torch.stack([naive_agg(a, seq, batch), naive_agg(b, seq, batch)])
                                  for a, b in zip(hf_activations["ln1"], hf_activations["ln2"])])
        tag = f"seq={seq} batch={batch}"
        assert_close(s.mlp, mlp, f"mlp {tag}")
        minitron = s.with_head_metric("activation")  # the default is "residual", tested below
        assert_close(minitron.heads, heads, f"heads {tag}")
        assert_close(minitron.query_groups, groups, f"query groups {tag}")
        assert_close(s.embedding_layers, emb_layers, f"embedding per layer {tag}")
        assert_close(s.embedding, emb_layers.sum((0, 1)), f"embedding {tag}")


def test_head_metrics_match_naive_transformers(reference, hf_activations):
    """The other head scores: per-channel aggregation first, and each head's contribution to the residual."""
    cfg = hf_activations["cfg"]
    L, H, G, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for seq, batch in AGGS:
        s = reference[(1, 1, seq, batch)]
        assert s.head_metric == "residual" and torch.equal(s.head_variants["residual"], s.heads)
        channel = torch.stack([naive_agg(a, seq, batch).reshape(H, kv).norm(dim=-1)
                               for a in hf_activations["o_proj_in"]])
        residual = []
        for a, w in zip(hf_activations["o_proj_in"], hf_activations["o_proj_w"]):
            a = a.double().reshape(*a.shape[:2], H, kv)
            w = w.double().reshape(-1, H, kv)  # o_proj: hidden x (heads * kv)
            contrib = torch.stack([(a[:, :, h] @ w[:, h].T).norm(dim=-1) for h in range(H)], dim=-1)
            residual.append(naive_agg(contrib, seq, batch))
        residual = torch.stack(residual)
        tag = f"seq={seq} batch={batch}"
        assert_close(s.head_variants["channel"], channel, f"channel head metric {tag}")
        assert_close(s.head_variants["residual"], residual, f"residual head metric {tag}")
        r = s.with_head_metric("residual")
        assert_close(r.heads, residual, f"with_head_metric {tag}")
        assert_close(r.query_groups, residual.reshape(L, G, H // G).pow(2).sum(-1).sqrt(), f"residual groups {tag}")
    with pytest.raises(ValueError, match="head metric 'max' is not in these scores"):
        reference[(1, 1, "mean", "l2")].with_head_metric("max")


def test_depth_scores_match_naive_transformers(reference, hf_activations):
    X = [x.double() for x in hf_activations["X"]]  # [n, s, h] each, L + 1 of them
    L = len(X) - 1
    bi = torch.stack([1 - torch.nn.functional.cosine_similarity(X[i], X[i + 1], dim=-1).mean() for i in range(L)])

    def d(layer, n):
        a, b = X[layer][:, -1], X[layer + n][:, -1]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        return (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()

    for key, s in reference.items():  # depth scores do not depend on the width aggregation
        if key[-1] == "loss_drop":
            continue
        assert_close(s.block_influence, bi, f"block influence {key}")
        assert sorted(s.angular) == list(range(1, L))
        for n in range(1, L + 1):
            want = torch.stack([d(layer, n) for layer in range(L - n + 1)])
            assert_close(s.angular_distance(n), want, f"angular n={n} {key}")
            if n in s.angular:
                assert_close(s.angular[n], want, f"angular dict n={n}")


def test_same_scores_at_every_layout(tiny_llama_dir, reference):
    """One 4-rank world: DP4, TP2xDP2, PP2xDP2, TP2xPP2, TP4, PP4, with micro-batches of 2 (uneven splits)."""
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]
    aggs = [("mean", "l2"), ("variance", "variance")]
    results = run_ranks(importance_worker, 4, tiny_llama_dir, layouts, calib_tokens(), 2, aggs, [(2, 2), (1, 4)])
    ref_base, ref_drop = reference[(1, 1, "loss_drop")]
    for rank, res in enumerate(results):
        for layout in ((2, 2), (1, 4)):  # PP4: dropping one layer empties a whole stage
            base, drop = res.pop((*layout, "loss_drop"))
            assert abs(base - ref_base) <= 1e-5 * ref_base, layout
            for n in LOSS_DROP_SIZES:
                assert (drop[n] - ref_drop[n]).abs().max().item() <= 1e-5 * ref_base, (layout, n)
        for (tp, pp, seq, batch), s in res.items():
            ref = reference[(1, 1, seq, batch)]
            tag = f"rank {rank} TP{tp} PP{pp} seq={seq} batch={batch}"
            assert s.num_samples == N_SAMPLES
            for name in ("mlp", "heads", "query_groups", "embedding", "embedding_layers", "block_influence",
                         "angle_matrix"):
                got, want = getattr(s, name), getattr(ref, name)
                if name == "angle_matrix":  # zero diagonal: compare off-diagonal entries
                    off = ~torch.eye(len(want), dtype=torch.bool)
                    got, want = got[off], want[off]
                assert_close(got, want, f"{name} {tag}")
            for metric, want in ref.head_variants.items():
                assert_close(s.head_variants[metric], want, f"head metric {metric} {tag}")


def test_loss_drop_matches_transformers_with_layers_removed(reference, tiny_llama_dir):
    import transformers

    tokens = calib_tokens()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    all_layers = model.model.layers
    L = len(all_layers)

    def loss(keep):
        model.model.layers = torch.nn.ModuleList([all_layers[i] for i in keep])
        with torch.no_grad():
            logits = model(tokens[:, :-1], use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten()).item()

    want_base = loss(range(L))
    base, drop = reference[(1, 1, "loss_drop")]
    assert abs(base - want_base) <= 1e-5 * want_base
    for n in LOSS_DROP_SIZES:
        want = torch.tensor([loss([i for i in range(L) if not start <= i < start + n]) - want_base
                             for start in range(L - n + 1)], dtype=torch.float64)
        assert (drop[n] - want).abs().max().item() <= 1e-5 * want_base, (n, drop[n], want)
    model.model.layers = all_layers


def test_save_load_roundtrip(reference, tmp_path):
    from megatron_prune.importance import ImportanceScores

    base, drop = reference[(1, 1, "loss_drop")]
    s = dataclasses.replace(reference[(1, 1, "mean", "l2")], base_lm_loss=base, loss_drop=drop)
    path = s.save(tmp_path / "scores.safetensors")
    back = ImportanceScores.load(path)
    for name in ("mlp", "heads", "query_groups", "embedding", "embedding_layers", "block_influence", "angle_matrix"):
        assert torch.equal(getattr(back, name), getattr(s, name)), name
    assert back.angular.keys() == s.angular.keys()
    assert all(torch.equal(back.angular[n], s.angular[n]) for n in s.angular)
    assert back.base_lm_loss == s.base_lm_loss and back.loss_drop.keys() == s.loss_drop.keys()
    assert all(torch.allclose(back.loss_drop[n], s.loss_drop[n].float()) for n in s.loss_drop)
    assert (back.arch, back.seq_agg, back.batch_agg, back.num_samples, back.seq_len, back.extra) == (
        s.arch, s.seq_agg, s.batch_agg, s.num_samples, s.seq_len, s.extra)
    assert back.mlp.shape == (4, 96) and back.heads.shape == (4, 8) and back.query_groups.shape == (4, 4)
    assert back.embedding.shape == (64,) and back.block_influence.shape == (4,)
    assert back.head_metric == s.head_metric and back.head_variants.keys() == {"activation", "channel", "residual"}
    assert all(torch.equal(back.head_variants[m], s.head_variants[m].float()) for m in s.head_variants)


@pytest.mark.parametrize("seq,batch", AGGS)
def test_batch_accumulator_is_exact_across_splits(seq, batch):
    """Any split of the samples into micro-batches (and DP ranks, whose sums add) gives the same score."""
    from megatron_prune.importance import BatchAccumulator, reduce_seq

    x = torch.randn(12, 7, 5, generator=torch.Generator().manual_seed(0))  # [s, n, units] like megatron's [s, b, ...]
    whole = naive_agg(x.transpose(0, 1), seq, batch)
    for sizes in ([7], [3, 4], [1, 2, 4]):
        acc = BatchAccumulator((1, 5), torch.device("cpu"))
        for part in torch.split(x, sizes, dim=1):
            acc.add(0, reduce_seq(part, seq))
        assert_close(acc.finalize(batch)[0], whole, f"{seq}/{batch} split {sizes}")


def test_bad_aggregation_is_rejected():
    from megatron_prune.importance.width import check_aggregation

    with pytest.raises(ValueError, match="unknown batch aggregation 'max'"):
        check_aggregation("max", "batch")
