"""Self-distillation rewrite throughput: the engine call `megatron-prune selfdistill` makes, with two versions of
the code side by side (e.g. before/after a change), same teacher, same examples, identical outputs asserted.

The teacher is SmolLM2-135M-Instruct (converted once into --work, as bench_generate_vs_hf.py does); the examples
are the arithmetic word problems of `megatron-prune data --corpus sft`, each rendered as selfdistill renders it
(system prompt, instruction, reference answer) and generated greedily with selfdistill's stop tokens, batch
--batch-size, at most --max-new-tokens, exactly as megatron_prune/generation/rewrite.py calls
``megatron_prune.generation.generate``. Each code version runs in its own process (PYTHONPATH=that folder),
--repeats times, alternating.

    git archive <base-commit> | (mkdir -p /tmp/base && tar -x -C /tmp/base)      # the code before
    PYTHONPATH=. python bench/bench_rewrite.py --code /tmp/base --code . --examples 16 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(ckpt: str, examples: int, max_new_tokens: int, batch_size: int) -> dict:
    import time

    import torch

    from megatron_prune.checkpoint import load_model, tokenizer_dir
    from megatron_prune.data.sft import arithmetic_problems, end_of_turn_ids, load_tokenizer
    from megatron_prune.generation import SamplingParams, generate
    try:
        from megatron_prune.generation.rewrite import prompt_ids, rewrite_messages
    except ModuleNotFoundError:  # a checkout from before the core was grouped by concern
        from megatron_prune.selfdistill import prompt_ids, rewrite_messages
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    tok = load_tokenizer(tokenizer_dir(ckpt))
    model, meta = load_model(ckpt)  # as pipelines/selfdistill.py loads the teacher
    records = arithmetic_problems(examples, seed=0)
    prompts = [prompt_ids(tok, rewrite_messages(r)) for r in records]
    stops = end_of_turn_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    params = SamplingParams(max_new_tokens=max_new_tokens)
    generate(model, meta.arch, prompts[:1], SamplingParams(max_new_tokens=2), desc=None)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    outs = generate(model, meta.arch, prompts, params, stop_token_ids=stops, pad_token_id=pad, batch_size=batch_size,
                    desc=None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"examples": len(prompts), "prompt_tokens": sum(map(len, prompts)), "new_tokens": sum(map(len, outs)),
            "seconds": wall, "cpu_seconds": cpu, "outputs": outs, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", action="append", required=True, help="a checkout of megatron-prune (repeat: 2 or more)")
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="selfdistill's --batch-size (default 8, as the CLI)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", help="folder for the converted SmolLM2 (kept; default: a temporary folder)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        ckpt, n, new, bs = a.worker
        print("RESULT " + json.dumps(worker(ckpt, int(n), int(new), int(bs))))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_generate_vs_hf import prepare

    from megatron_prune.runtime import init_distributed

    print(f"1-min load average {os.getloadavg()[0]:.2f} at start; SmolLM2-135M-Instruct teacher, {a.examples} "
          f"arithmetic examples, greedy, at most {a.max_new_tokens} new tokens, batch {a.batch_size}, TP1 CPU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / "smollm2_ckpt"
        if not ckpt.exists():
            init_distributed(1, 1)
            prepare(work, "smollm2")
        # each code version reads a checkpoint it wrote itself (an older one may not read a newer metadata file)
        ckpts = {}
        for i, code in enumerate(a.code):
            env = {**os.environ, "PYTHONPATH": str(Path(code).absolute())}
            ckpts[code] = work / f"smollm2_ckpt_{i}"
            if not ckpts[code].exists():
                subprocess.run([sys.executable, "-m", "megatron_prune.cli", "convert", str(work / "smollm2_hf"),
                                str(ckpts[code])], env=env, check=True, capture_output=True, cwd=tmp)
        runs: dict[str, list[dict]] = {c: [] for c in a.code}
        for r in range(a.repeats):
            for code in (a.code if r % 2 == 0 else a.code[::-1]):
                env = {**os.environ, "PYTHONPATH": str(Path(code).absolute())}
                p = subprocess.run([sys.executable, __file__, "--code", code, "--worker", str(ckpts[code]),
                                    str(a.examples), str(a.max_new_tokens), str(a.batch_size)], env=env,
                                   capture_output=True, text=True,
                                   cwd=tmp)
                line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{code} failed:\n{p.stderr[-3000:]}")
                runs[code].append(json.loads(line[len("RESULT "):]))
    first = runs[a.code[0]][0]
    for code, rs in runs.items():
        best = min(rs, key=lambda x: x["seconds"])
        print(f"{code}: {best['new_tokens']} new tokens for {best['examples']} examples in {best['seconds']:.1f} s "
              f"-> {best['new_tokens'] / best['seconds']:.1f} tok/s, {best['examples'] / best['seconds'] * 3600:.0f} "
              f"examples/hour (CPU time {best['cpu_seconds']:.1f} s; {best['threads']} threads)")
        assert all(x["outputs"] == first["outputs"] for x in rs), f"{code}: outputs differ from {a.code[0]}'s"
    if len(a.code) > 1:
        base = statistics.median(x["seconds"] for x in runs[a.code[0]])
        for code in a.code[1:]:
            print(f"speed-up of {code} over {a.code[0]}: "
                  f"{base / statistics.median(x['seconds'] for x in runs[code]):.2f}x (median wall time), "
                  f"identical rewrites: yes")
    print(f"1-min load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
