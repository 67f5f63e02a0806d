"""megatron-prune: turn one large trained Megatron LLM into a family of smaller ones."""

__version__ = "0.1.0"
