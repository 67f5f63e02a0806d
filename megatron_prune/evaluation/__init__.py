"""Evaluation of checkpoints: LM loss (lm_loss), the self-distillation tasks (sft_tasks), and
lm-evaluation-harness (lm_eval_model: our checkpoint as an lm-eval model; lm_eval_tasks: task lookup)."""
