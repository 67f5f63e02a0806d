#!/usr/bin/env bash
# A separate virtual environment with NeMo 2's LLM collection (nemo-toolkit 2.7.3: it pins numpy<2 and
# transformers 4.57, so it cannot share megatron-prune's). Used by nemo2_check.py. Idempotent.
#   bash launch/real_tools/install_nemo.sh          # -> .venv-nemo
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${NEMO_VENV:-.venv-nemo}
PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import nemo.collections.llm" 2>/dev/null; then
  echo "[nemo] $VENV ready"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
# NeMo 2.7.3's core extra; its megatron-core (0.15: NeMo imports strategies.tensorstore, gone in 0.16); the rest
# pinned to what NeMo 2.7.3's LLM collection imports cleanly with (found by importing it)
pip install -q "nemo-toolkit[core]==2.7.3" "megatron-core==0.15.2" "numpy<2" "pyarrow<19" "pandas<2.3" \
  "datasets<3.3" "fsspec==2024.12.0" "protobuf~=5.29.5" "tiktoken==0.7.0" "nvidia-modelopt==0.37.0" \
  "leptonai==0.26.9" nemo_run rich einops sentencepiece "tensorstore<0.1.72" "zarr>=2.18.2,<3" nvtx
"$VENV/bin/python" -c "import nemo.collections.llm, nemo.lightning.io" 2>&1 | tail -n 3
echo "[nemo] $VENV ready: $("$VENV/bin/python" -c 'import nemo, megatron.core, transformers; print("nemo", nemo.__version__, "| megatron-core", megatron.core.__version__, "| transformers", transformers.__version__)' 2>/dev/null | tail -n 1)"
