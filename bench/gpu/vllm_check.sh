#!/usr/bin/env bash
# One command on a CUDA GPU machine: install the vllm extra, then check and time the vLLM generation engine.
#   bash bench/gpu/vllm_check.sh [--model PATH] [--steps 2]
# Writes bench/gpu/vllm_results.json (copy its figures into bench/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no CUDA GPU here"; exit 1; }
"$PYTHON" -m pip install -q -e '.[vllm]'
"$PYTHON" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
exec "$PYTHON" bench/gpu/vllm_check.py --json bench/gpu/vllm_results.json "$@"
