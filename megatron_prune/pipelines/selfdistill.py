"""`megatron-prune selfdistill`: the teacher rewrites an SFT JSONL set in its own words (resumable)."""

from __future__ import annotations

from pathlib import Path

from megatron_prune import inputs


def check_selfdistill(teacher, data, out, batch_size: int, chunk_size: int, tp: int, pp: int,
                      overwrite: bool) -> list[dict]:
    """Every input of `selfdistill`, before any process group, tokenizer or weight; returns the SFT records."""
    from megatron_prune.checkpoint.outputs import check_output_path
    from megatron_prune.pipelines.sft import sft_records

    out = Path(out)
    for path, flag in ((out, "--out"), (out.with_name(out.name + ".parts"), "--out (its chunk directory)"),
                       (out.with_name(out.stem + ".stats.json"), "--out (its statistics file)")):
        check_output_path(path, {"teacher checkpoint": teacher, "SFT data": data}, flag)
    inputs.layout(tp, pp)
    inputs.positive("--batch-size", batch_size)
    inputs.positive("--chunk-size", chunk_size)
    meta = inputs.checkpoint(teacher, "--teacher")
    inputs.checkpoint_fits(meta, tp, pp, "--teacher")
    inputs.chat_tokenizer(teacher, "--teacher")
    records = sft_records(data)
    inputs.output(out, "--out", overwrite=overwrite, kind="file")
    return records


def selfdistill(teacher: str | Path, data: str | Path, out: str | Path, max_new_tokens: int = 512,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 8,
                chunk_size: int = 64, on_reject: str = "original", tp: int = 1, pp: int = 1,
                overwrite: bool = False) -> dict:
    """Load ``teacher`` at ``tp`` x ``pp`` (remaining ranks: data-parallel) and write the distilled JSONL."""
    from megatron_prune.checkpoint import load_model, tokenizer_dir
    from megatron_prune.data.sft import load_tokenizer
    from megatron_prune.generation import SamplingParams
    from megatron_prune.generation.rewrite import self_distill
    from megatron_prune.runtime import init_distributed, log0

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
    records = check_selfdistill(teacher, data, out, batch_size, chunk_size, tp, pp, overwrite)
    tokenizer = load_tokenizer(tokenizer_dir(teacher))
    init_distributed(tp, pp)
    model, meta = load_model(teacher)
    log0(f"self-distillation with {teacher} ({meta.arch.describe()}) of {data} -> {out}")
    return self_distill(model, meta.arch, tokenizer, records, out, params, chunk_size=chunk_size,
                        batch_size=batch_size, on_reject=on_reject, overwrite=overwrite,
                        settings={"teacher": str(Path(teacher).absolute()), "data": str(Path(data).absolute())})
