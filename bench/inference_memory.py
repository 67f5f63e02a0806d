"""`megatron-prune search --memory-gib`'s count (weights + KV cache) next to the memory a model really holds when
its KV cache is full (issue 11).

    python bench/inference_memory.py            # three shapes, KV cache of 2048 tokens x batch 8
    python bench/inference_memory.py --quick    # smaller, about a minute

For each shape a rank resets its peak resident set, loads the model from a checkpoint (fp32, the CPU dtype), and
fills megatron's KV cache (``StaticInferenceContext`` through our generation engine's ``BatchRunner``) with
``seq_len`` tokens of every sequence, one position per forward as in decoding (a long prefill chunk adds its
attention scores, a working set the count leaves out on purpose); the peak resident set above the start is the
measurement.
The estimate is ``megatron_prune.prune.search_space.inference_memory`` (exact parameter count x 4 bytes
+ 2 x layers x query groups x kv_channels x tokens x batch x 4 bytes) plus the runtime's own memory (the same
run on a model of a few thousand parameters). glibc is told to return every block above 128 KiB on free, so
the resident set follows the live tensors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_bytes, reset_peak_rss, rss_bytes, run_ranks, save_random_models  # noqa: E402
from plan_vs_measured import _follow_live_tensors  # noqa: E402

MiB = 2**20
CHUNK = 1  # positions per forward


def shapes(quick: bool) -> dict:
    from megatron_prune.arch import ModelArch

    base = dict(num_attention_heads=8, vocab_size=8192 if quick else 32000)
    if quick:
        return {"runtime": ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                     num_query_groups=1, vocab_size=256),
                "6 x 256, 2 groups": ModelArch(num_layers=6, hidden_size=256, ffn_hidden_size=768, num_query_groups=2,
                                               **base),
                "4 x 256, 8 heads (MHA)": ModelArch(num_layers=4, hidden_size=256, ffn_hidden_size=512,
                                                    num_query_groups=8, **base)}
    return {"runtime": ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                 num_query_groups=1, vocab_size=256),
            "12 x 512, 2 groups": ModelArch(num_layers=12, hidden_size=512, ffn_hidden_size=1536, num_query_groups=2,
                                            **base),
            "8 x 768, 4 groups": ModelArch(num_layers=8, hidden_size=768, ffn_hidden_size=2048, num_query_groups=4,
                                           **base),
            "6 x 512, 8 heads (MHA)": ModelArch(num_layers=6, hidden_size=512, ffn_hidden_size=1024,
                                                num_query_groups=8, **base)}


def _save(root: str, quick: bool) -> None:
    save_random_models(root, {f"m{i}": arch for i, arch in enumerate(shapes(quick).values())})


def _fill_cache(ckpt: str, seq_len: int, batch: int) -> int:
    """Peak resident bytes above the start over loading ``ckpt`` and filling its KV cache."""
    import torch

    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation.engine import BatchRunner
    from megatron_prune.runtime import init_distributed

    _follow_live_tensors()
    init_distributed(1, 1)
    start = rss_bytes()
    reset_peak_rss()
    model, meta = load_model(ckpt)
    runner = BatchRunner(model, meta.arch, batch, seq_len)
    gen = torch.Generator().manual_seed(0)
    while runner.length < seq_len:
        n = min(CHUNK, seq_len - runner.length)
        runner.feed(torch.randint(0, meta.arch.vocab_size, (batch, n), generator=gen))
    return peak_rss_bytes() - start


def main(argv=None) -> list[tuple]:
    from megatron_prune.prune.search_space import inference_memory, kv_cache_bytes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    seq_len, batch = (1024, 4) if args.quick else (2048, 8)
    models = shapes(args.quick)
    print(f"KV cache of {seq_len} tokens x batch {batch}, fp32 on the CPU")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        run_ranks(_save, 1, root, args.quick)
        runtime = run_ranks(_fill_cache, 1, f"{root}/m0", seq_len, batch)[0]
        print(f"runtime (a {models['runtime'].param_count()}-parameter model): {runtime / MiB:.0f} MiB\n")
        print("| model | params | weights + KV cache MiB (KV) | + runtime | measured peak MiB | measured / estimate |\n"
              "|---|---|---|---|---|---|")
        for i, (name, arch) in enumerate(models.items()):
            if name == "runtime":
                continue
            est = inference_memory(arch, seq_len, batch, "fp32")
            measured = run_ranks(_fill_cache, 1, f"{root}/m{i}", seq_len, batch)[0]
            rows.append((name, est, runtime, measured))
            print(f"| {name} | {arch.param_count() / 1e6:.1f}M | {est / MiB:.0f} "
                  f"({kv_cache_bytes(arch, seq_len, batch, 'fp32') / MiB:.0f}) | {runtime / MiB:.0f} | "
                  f"{measured / MiB:.0f} | {measured / (est + runtime):.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
