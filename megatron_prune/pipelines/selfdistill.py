"""`megatron-prune selfdistill`: the teacher rewrites an SFT JSONL set in its own words (resumable)."""

from __future__ import annotations

from pathlib import Path


def selfdistill(teacher: str | Path, data: str | Path, out: str | Path, max_new_tokens: int = 512,
                temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 8,
                chunk_size: int = 64, on_reject: str = "original", tp: int = 1, pp: int = 1,
                overwrite: bool = False) -> dict:
    """Load ``teacher`` at ``tp`` x ``pp`` (remaining ranks: data-parallel) and write the distilled JSONL."""
    from megatron_prune.checkpoint import load_model, tokenizer_dir
    from megatron_prune.data.sft import load_tokenizer, read_sft_jsonl
    from megatron_prune.generation import SamplingParams
    from megatron_prune.runtime import init_distributed, log0
    from megatron_prune.selfdistill import self_distill

    records = read_sft_jsonl(data)  # bad input fails before the model is loaded
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; choose another path or pass --overwrite")
    tok_dir = tokenizer_dir(teacher)
    if tok_dir is None:
        raise ValueError(f"teacher {teacher} carries no tokenizer (needed for its chat template)")
    tokenizer = load_tokenizer(tok_dir)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
    init_distributed(tp, pp)
    model, meta = load_model(teacher)
    log0(f"self-distillation with {teacher} ({meta.arch.describe()}) of {data} -> {out}")
    return self_distill(model, meta.arch, tokenizer, records, out, params, chunk_size=chunk_size,
                        batch_size=batch_size, on_reject=on_reject, overwrite=overwrite,
                        settings={"teacher": str(Path(teacher).absolute()), "data": str(Path(data).absolute())})
