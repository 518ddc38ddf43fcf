#!/usr/bin/env bash
# One command on a GPU machine: DPO on SmolLM2-135M-Instruct in bf16, preftune against TRL 1.16 with and
# without Liger kernels (TRL's use_liger_kernel), full fine-tuning and LoRA r16, same pairs and settings as the
# CPU comparison (bench/smollm2_dpo_vs_trl.py). Writes the table and ${OUT:-bench/gpu}/smollm2_bf16_results.json.
#
#   bash bench/gpu/smollm2_bf16.sh            # STEPS=10 BATCH=4 by default
#
# The Liger rows need the liger-kernel package (Triton, so a GPU); when it cannot be installed they are left out
# and the script says so.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT:-bench/gpu}
STEPS=${STEPS:-10}
BATCH=${BATCH:-4}
$PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')"
$PYTHON -m pip install -q -e ".[bench]" || echo "note: could not install the bench extra; using what is installed"
runs="preftune trl trl-live preftune-lora trl-lora"
if $PYTHON -c "import liger_kernel" 2>/dev/null || $PYTHON -m pip install -q liger-kernel; then
  runs="$runs trl-liger trl-lora-liger"
else
  echo "note: liger-kernel is not installable here; the TRL + Liger rows are left out"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# shellcheck disable=SC2086
$PYTHON bench/smollm2_dpo_vs_trl.py --device cuda --precisions bf16 --steps "$STEPS" --batch "$BATCH" \
  --runs $runs --json "$OUT_DIR/smollm2_bf16_results.json"
