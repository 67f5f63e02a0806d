"""Data for calibration, distillation and evaluation: offline corpora, Megatron indexed datasets.

Core layer: imports nothing from the cli or pipeline modules.
"""

from megatron_prune.data.corpora import (
    CORPORA,
    DEFAULT_CORPUS,
    CorpusNotInstalled,
    corpus_documents,
    default_cache_dir,
    split_documents,
    split_of,
    write_corpus_jsonl,
)
from megatron_prune.data.indexed import (
    IndexedInfo,
    calibration_windows,
    count_windows,
    fixed_length_windows,
    read_indexed_info,
    read_windows,
    tokenize_jsonl,
)

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "CorpusNotInstalled",
    "IndexedInfo",
    "calibration_windows",
    "corpus_documents",
    "count_windows",
    "default_cache_dir",
    "fixed_length_windows",
    "read_indexed_info",
    "read_windows",
    "split_documents",
    "split_of",
    "tokenize_jsonl",
    "write_corpus_jsonl",
]
