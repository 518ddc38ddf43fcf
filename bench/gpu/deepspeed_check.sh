#!/usr/bin/env bash
# One command on a GPU machine: installs preftune's `deepspeed` extra, then trains SmolLM2-135M-Instruct
#   1. DPO under ZeRO-2 (live reference model),
#   2. DPO under ZeRO-3 with precomputed reference log-probs,
#   3. DPO under ZeRO-3 with a live reference model,
#   4. SFT under ZeRO-3,
#   5. DPO under FSDP2 (the same run as 3, for comparison),
# each through `accelerate launch --config_file configs/<engine>.yaml` on every GPU of the machine; prints each
# run's engine, first and last loss and throughput (pairs/s or examples/s, tokens/s), and checks that the final
# model (gathered from the shards) loads with transformers. On one GPU each engine runs one process: nothing
# is saved by sharding then, but every code path (gathering, sharded checkpoints, final save) still runs.
#
#   bash bench/gpu/deepspeed_check.sh              # all GPUs; MODEL=/path/to/checkpoint to use another model
#   GPUS=2 STEPS=40 bash bench/gpu/deepspeed_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-30}
OUT=${OUT:-runs/deepspeed-check}
mkdir -p "$OUT"

"$PY" -c "import deepspeed" 2>/dev/null || "$PY" -m pip install -q -e ".[deepspeed]"
MODEL=${MODEL:-$("$PY" -c "from preftune.realmodel import obtain_checkpoint; print(obtain_checkpoint())")}
"$PY" - "$OUT" <<'PYTHON'
import json, sys
sys.path.insert(0, "tests")
from toydata import make_toy_preferences
out = sys.argv[1]
pairs = make_toy_preferences(512, seed=1, conversational=True)
with open(f"{out}/pairs.jsonl", "w") as handle:
    handle.writelines(json.dumps(row) + "\n" for row in pairs)
with open(f"{out}/sft.jsonl", "w") as handle:
    handle.writelines(json.dumps({"prompt": row["prompt"], "completion": row["chosen"]}) + "\n" for row in pairs)
PYTHON

common=(--model_name_or_path "$MODEL" --max_steps "$STEPS" --per_device_batch_size 8 --gradient_accumulation_steps 2
        --logging_steps 5 --warmup_ratio 0 --max_length 256 --overwrite_output_dir --cache_dir "$OUT/ref-cache")
run() {  # run NAME CONFIG COMMAND ARGS...
  local name=$1 config=$2; shift 2
  echo "== $name: accelerate launch --config_file configs/$config --num_processes $GPUS $*"
  accelerate launch --config_file "configs/$config" --num_processes "$GPUS" --num_machines 1 \
    -m preftune.cli "$@" "${common[@]}" --output_dir "$OUT/$name"
}
run dpo-zero2 zero2.yaml dpo --dataset "$OUT/pairs.jsonl" --learning_rate 5e-7
run dpo-zero3-precomputed zero3.yaml dpo --dataset "$OUT/pairs.jsonl" --learning_rate 5e-7 --precompute_ref
run dpo-zero3-live zero3.yaml dpo --dataset "$OUT/pairs.jsonl" --learning_rate 5e-7
run sft-zero3 zero3.yaml sft --dataset "$OUT/sft.jsonl" --learning_rate 1e-5
run dpo-fsdp2-live fsdp2.yaml dpo --dataset "$OUT/pairs.jsonl" --learning_rate 5e-7

"$PY" - "$OUT" <<'PYTHON'
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
out = Path(sys.argv[1])
print(f"{'run':24} {'engine':>9} {'procs':>5} {'loss first':>10} {'loss last':>10} {'units/s':>9} {'tokens/s':>9}")
for name in ("dpo-zero2", "dpo-zero3-precomputed", "dpo-zero3-live", "sft-zero3", "dpo-fsdp2-live"):
    run = out / name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    summary = json.loads((run / "summary.json").read_text())
    rate = [v for k, v in records[-1].items() if k.endswith("/s") and k != "tokens/s"][0]
    AutoModelForCausalLM.from_pretrained(run / "model")  # the gathered final model is an ordinary checkpoint
    print(f"{name:24} {summary['distributed']['engine']:>9} {summary['distributed']['processes']:>5} "
          f"{records[0]['loss']:>10.4f} {records[-1]['loss']:>10.4f} {rate:>9.1f} {records[-1]['tokens/s']:>9.0f}")
PYTHON
