"""One module per `megatron-prune` verb, each named after it.

verbs.py defines every verb once (its options, the function here it calls, its output in a recipe); the CLI
builds its parsers from that table and run.py runs recipe stages through it. The pipeline functions set up the
distributed layout, call the core (runtime, arch, model, checkpoint, data, importance, prune, distill, ...) and
write their output atomically. Core modules never import from this package.

    convert     GGUF / Hugging Face / NeMo 2 / Megatron checkpoints into each other
    data        offline real-text corpora -> Megatron indexed datasets
    eval        held-out LM loss of a checkpoint
    importance  one calibration pass -> a layout-independent score file
    prune       scores + target (or a plan) -> a pruned sharded checkpoint
    search      every shape within a budget, ranked zero-shot, the best re-ranked after distillation
    distill     knowledge distillation of a student from a teacher
    train       plain LM-loss training (CE baseline, teacher correction)
    generate    completions for a file of prompts (KV-cached, batched, greedy or sampled)
    specdec     speculative decoding with a draft model: acceptance and speed-up per k
    merge       SLERP / linear / task-arithmetic merge of checkpoints of one shape
    sft         supervised fine-tuning on SFT JSONL, loss on the answer tokens only
    selfdistill the teacher rewrites an SFT set in its own words (self-data distillation)
    plan        memory per GPU of a training/distillation layout, before anything is queued
    run         a model family from a YAML recipe of stages, resumable
    demo        the whole pipeline on SmolLM2-135M, offline
"""
