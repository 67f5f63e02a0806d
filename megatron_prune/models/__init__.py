"""Architecture families, one folder each (``models/<family>/``: config.py, params.py, and the Family in
``__init__``). Adding a family = a new folder plus one line in FAMILIES (docs/architectures.md)."""

from __future__ import annotations

from megatron_prune.arch import ArchError
from megatron_prune.models import llama, mixtral, qwen3, qwen3_moe
from megatron_prune.models.axes import AXES, Axis
from megatron_prune.models.family import Family, Param

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen3.FAMILY, mixtral.FAMILY, qwen3_moe.FAMILY)

SUPPORTED_HF_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def supported_text() -> str:
    """``llama, mistral, qwen2 (models/llama); qwen3 (models/qwen3)`` for messages and docs."""
    return "; ".join(f"{', '.join(f.model_types)} (megatron_prune/models/{f.name})" for f in FAMILIES)


def family_for(model_type: str) -> Family:
    """The family that converts Hugging Face ``model_type``; one clear ArchError for anything else."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    raise ArchError(
        f"unsupported Hugging Face model_type {model_type!r}: megatron-prune converts {supported_text()}. "
        "A new family goes in its own folder megatron_prune/models/<family>/ (docs/architectures.md says how)"
    )


def family_of(arch) -> Family:
    """The family of a ModelArch (by its ``model_type``)."""
    return family_for(arch.model_type)


__all__ = ["AXES", "Axis", "FAMILIES", "Family", "Param", "SUPPORTED_HF_MODEL_TYPES", "family_for",
           "family_of", "supported_text"]
