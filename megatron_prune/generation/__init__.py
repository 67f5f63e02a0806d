"""Text generation on megatron-core GPTModels: KV-cached, batched, greedy or sampled, at any TP/PP/DP."""

from megatron_prune.generation.engine import BatchRunner, generate, share_from_last_stage
from megatron_prune.generation.sampling import SamplingParams, filter_logits, sampling_probs

__all__ = ["BatchRunner", "SamplingParams", "filter_logits", "generate", "sampling_probs", "share_from_last_stage"]
