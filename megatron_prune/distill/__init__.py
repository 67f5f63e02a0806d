"""Knowledge distillation of pruned students (Minitron): the losses, teacher-student pairs and offline teacher
logits; the trainer that runs them is megatron_prune.training."""

from megatron_prune.distill.losses import (
    combine_losses,
    cosine_hidden_loss,
    dynamic_alpha,
    forward_kl,
    gather_vocab_columns,
    hidden_projection,
    intermediate_state_loss,
    kd_logits_loss,
    masked_token_mean,
    mse_hidden_loss,
    reverse_kl,
    teacher_topk,
    topk_kl,
)

__all__ = [
    "combine_losses",
    "cosine_hidden_loss",
    "dynamic_alpha",
    "forward_kl",
    "gather_vocab_columns",
    "hidden_projection",
    "intermediate_state_loss",
    "kd_logits_loss",
    "masked_token_mean",
    "mse_hidden_loss",
    "reverse_kl",
    "teacher_topk",
    "topk_kl",
]
