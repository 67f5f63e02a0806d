"""The trainer that `train`, `sft` and `distill` share (trainer.py) and its configuration (config.py); the
distillation losses it calls live in megatron_prune.distill."""
