"""Training samples from (blends of) Megatron indexed datasets, with megatron-core's own GPTDataset.

GPTDataset builds its document/sample/shuffle indices once (cached next to the data or in ``cache_dir``), so
sample ``i`` is the same on every run: training is resumable by counting consumed samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch


class _EodTokenizer:
    """What GPTDataset needs from a tokenizer: the end-of-document and padding ids (and a vocab size)."""

    def __init__(self, eod: int, pad: int, vocab_size: Optional[int] = None):
        self.eod, self.pad, self.vocab_size = eod, pad, vocab_size
        self.unique_identifiers = {"class": "megatron_prune.EodTokenizer", "eod": eod, "pad": pad}  # in cache keys


def parse_blend(spec: Sequence[str | float] | str) -> tuple[list[str], Optional[list[float]]]:
    """``["0.7", "a_prefix", "0.3", "b_prefix"]`` (weights + prefixes, Megatron's --data-path style) or just
    prefixes (equal weights)."""
    items = spec.split() if isinstance(spec, str) else [str(s) for s in spec]
    if not items:
        raise ValueError("no training data given")
    try:
        float(items[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        prefixes, weights = items, None
    else:
        if len(items) % 2:
            raise ValueError(f"a weighted blend needs WEIGHT PREFIX pairs, got {items}")
        weights, prefixes = [float(w) for w in items[0::2]], items[1::2]
    for p in prefixes:
        if not (Path(p + ".bin").is_file() and Path(p + ".idx").is_file()):
            raise FileNotFoundError(f"indexed dataset {p}.bin/.idx not found; build it with `megatron-prune data`")
    return prefixes, weights


def build_train_dataset(blend, seq_len: int, num_samples: int, seed: int, eod: int, pad: Optional[int] = None,
                        cache_dir: Optional[str | Path] = None):
    """A megatron GPTDataset (or BlendedDataset) of ``num_samples`` samples of ``seq_len`` tokens.

    Items are dicts with ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (each [seq_len]).
    Collective: global rank 0 builds the index caches first, the others then read them.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(blend)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=(prefixes, weights),
        split="100,0,0",
        path_to_cache=str(cache_dir) if cache_dir else None,
        # no pad id by default: samples are cut from the concatenated token stream and are never padded. -1 is
        # what megatron falls back to anyway when pad == eod, after warning on every run ("pad token id collides")
        tokenizer=_EodTokenizer(eod, -1 if pad is None else pad),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    # every rank reads samples (tokens on the first stage, labels on the last); megatron itself lets
    # global rank 0 build the index caches before the others read them
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    if train is None:
        raise RuntimeError("megatron built no training dataset; check the blend")
    return train


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("tokens", "labels", "loss_mask")}
