#!/usr/bin/env bash
# Run one `megatron-prune` subcommand on this machine: plain python for 1 process, torchrun for more.
#
#   launch/local/run.sh [-n NPROC] COMMAND [ARGS...]
#
#   launch/local/run.sh demo                                        # 1 process (CPU or 1 GPU)
#   launch/local/run.sh -n 2 convert model.gguf ckpts/smol3 --tp 1  # 2 ranks: DP=2
#   launch/local/run.sh -n 8 eval ckpts/llama --data d/valid --tp 4 --pp 2   # one 8-GPU node
#   launch/local/run.sh -n gpu eval ckpts/llama --data d/valid --tp 8         # one rank per visible GPU
#
# NPROC (-n, or MP_NPROC; default 1) must be a multiple of TP*PP; the rest is data parallelism.
# Without a GPU the ranks use gloo on the CPU, so -n 2 with --tp 2 works on a laptop.
#
# Environment:
#   MP_VENV=/path/to/venv    activate this virtual environment first
#   MP_REPO=/path/to/checkout  use an uninstalled checkout (prepended to PYTHONPATH)
#   MP_PYTHON=python3        interpreter when no venv is given (default: python3)
#   MASTER_PORT=29500        rendezvous port for torchrun (default: torchrun --standalone picks a free one)
#   OMP_NUM_THREADS          default: CPU cores / NPROC
set -euo pipefail

NPROC="${MP_NPROC:-1}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n|--nproc|--nproc-per-node) NPROC="$2"; shift 2 ;;
        -n*) NPROC="${1#-n}"; shift ;;
        --nproc=*|--nproc-per-node=*) NPROC="${1#*=}"; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "usage: $0 [-n NPROC] COMMAND [ARGS...]   (see $0 --help, or megatron-prune --help)" >&2
    exit 2
fi

if [[ -n "${MP_VENV:-}" ]]; then
    [[ -f "$MP_VENV/bin/activate" ]] || { echo "error: MP_VENV=$MP_VENV has no bin/activate" >&2; exit 2; }
    # shellcheck disable=SC1091
    source "$MP_VENV/bin/activate"
    PY=python
else
    PY="${MP_PYTHON:-python3}"
fi
if [[ -n "${MP_REPO:-}" ]]; then
    export PYTHONPATH="$MP_REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import megatron_prune" 2>/dev/null || {
    echo "error: $PY cannot import megatron_prune; pip install -e <checkout>, or set MP_VENV / MP_REPO" >&2
    exit 2
}

if [[ "$NPROC" == gpu || "$NPROC" == auto ]]; then
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    NPROC="${NGPU:-0}"
    [[ "$NPROC" -ge 1 ]] || { echo "error: -n $NPROC: no GPU found (nvidia-smi -L)" >&2; exit 2; }
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, 'gpu' or 'auto' (got '$NPROC')" >&2; exit 2; }

CORES=$(nproc)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((CORES / NPROC > 0 ? CORES / NPROC : 1))}"
export TOKENIZERS_PARALLELISM=false
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

if [[ "$NPROC" -eq 1 ]]; then
    # A single process: hide the variables of an enclosing launcher (e.g. an interactive `srun --pty`
    # step) so that the runtime does not wait for ranks that will never come.
    unset RANK WORLD_SIZE LOCAL_RANK SLURM_STEP_ID
    echo "[run.sh] 1 process: $PY -m megatron_prune.cli $*" >&2
    exec "$PY" -m megatron_prune.cli "$@"
fi

unset RANK WORLD_SIZE LOCAL_RANK
if [[ -n "${MASTER_PORT:-}" ]]; then
    RDZV=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT" --nnodes=1)
else
    RDZV=(--standalone)
fi
echo "[run.sh] $NPROC processes (OMP_NUM_THREADS=$OMP_NUM_THREADS): torchrun ${RDZV[*]} --nproc-per-node=$NPROC -m megatron_prune.cli $*" >&2
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node="$NPROC" -m megatron_prune.cli "$@"
