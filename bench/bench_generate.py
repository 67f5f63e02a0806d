"""Generation throughput with and without the KV cache, and the speculative-decoding speed-up, in one run.

A synthetic Llama (random weights) as the target and, as the draft, the same model cut to its first layers
(a depth-pruned target, as in the self-data-distillation recipe; the layers past the draft's make small
residual updates, as trained layers do, so the draft agrees with the target often). Greedy, TP1 on the CPU; a few
minutes.

    PYTHONPATH=. python bench/bench_generate.py [--layers 8 --hidden 256 --draft-layers 2 --new 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_ranks  # noqa: E402


def make_models(d: Path, layers: int, hidden: int, draft_layers: int) -> tuple[Path, Path]:
    import transformers

    from megatron_prune.pipelines.convert import hf_to_megatron

    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 3,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 32,
                                   num_key_value_heads=hidden // 64, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # small residual updates per layer, as in trained LLMs (why depth pruning works)
        for layer in model.model.layers[draft_layers:]:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
    model.save_pretrained(d / "target_hf")
    model.model.layers = model.model.layers[:draft_layers]  # depth-pruned draft: the first layers
    model.config.num_hidden_layers = draft_layers
    model.save_pretrained(d / "draft_hf")
    hf_to_megatron(d / "target_hf", d / "target")
    hf_to_megatron(d / "draft_hf", d / "draft")
    return d / "target", d / "draft"


def bench(tmp: str, layers: int, hidden: int, draft_layers: int, new: int, prompt_len: int, batch: int,
          ks: list[int]) -> dict:
    import time

    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.generation.speculative import SpecStats, speculative_generate, target_alone
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    target_ckpt, draft_ckpt = make_models(Path(tmp), layers, hidden, draft_layers)
    target, tm = load_model(target_ckpt, use_te=False)
    draft, dm = load_model(draft_ckpt, use_te=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new)
    generate(target, tm.arch, prompts[:1], SamplingParams(max_new_tokens=4), desc=None)  # warm-up
    res = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        out = generate(target, tm.arch, prompts, params, batch_size=batch, use_cache=use_cache, desc=None)
        res["cache" if use_cache else "no_cache"] = sum(map(len, out)) / (time.perf_counter() - t0)
    assert res and out == generate(target, tm.arch, prompts, params, batch_size=batch, desc=None)
    alone_s, alone_n, ref = 0.0, 0, []
    for i, p in enumerate(prompts):
        o, s = target_alone(target, tm.arch, p, params, index=i)
        alone_s, alone_n = alone_s + s, alone_n + len(o)
        ref.append(o)
    res["alone"] = alone_n / alone_s
    res["k"] = {}
    for k in ks:
        total = SpecStats(k=k)
        for i, p in enumerate(prompts):
            o, st = speculative_generate(target, tm.arch, draft, dm.arch, p, k, params, index=i)
            assert o == ref[i], "speculative greedy output differs from the target's"
            total.add(st)
        res["k"][k] = total.summary()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--new", type=int, default=48, help="new tokens per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", default="1,2,4")
    a = ap.parse_args()
    ks = [int(k) for k in a.k.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        r = run_ranks(bench, 1, tmp, a.layers, a.hidden, a.draft_layers, a.new, a.prompt_len, a.batch, ks)[0]
    print(f"target: {a.layers} layers, hidden {a.hidden}; draft: its first {a.draft_layers} layers; greedy, "
          f"{a.batch} prompts x {a.prompt_len} tokens, {a.new} new tokens, TP1 CPU")
    print(f"batched generation ({a.batch} per batch): KV cache {r['cache']:.1f} tok/s, full recompute "
          f"{r['no_cache']:.1f} tok/s -> cache speed-up {r['cache'] / r['no_cache']:.2f}x")
    print(f"one sequence at a time, target alone: {r['alone']:.1f} tok/s")
    print("k  acceptance  tokens/target-step  tok/s   speed-up vs target alone")
    for k, s in r["k"].items():
        print(f"{k:<2} {s['acceptance_rate']:10.3f}  {s['mean_accepted_length']:18.2f}  {s['tokens_per_s']:6.1f}  "
              f"{s['tokens_per_s'] / r['alone']:.2f}x")


if __name__ == "__main__":
    main()
