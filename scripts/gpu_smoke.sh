#!/usr/bin/env bash
# GPU smoke runs: the tiny dense -> upcycle -> mixture chain on one GPU in bf16-mixed and with FSDP
# on one device, bf16-true, PESC as QLoRA on CUDA and PESC under FSDP. Prints one line per run (wall time, exit code)
# and writes $OUT/gpu_smoke.md. Run it whenever a GPU is available:  bash scripts/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-smoke}
STEPS=${STEPS:-60}
MOE_APP=${MOE_APP:-moe-app}
ACCEL=${ACCEL:-gpu}   # ACCEL=cpu STEPS=2 BENCH=0 checks the script itself on a CPU machine
BENCH=${BENCH:-1}
mkdir -p "$OUT"
report="$OUT/gpu_smoke.md"
{
  echo "# GPU smoke ($(date -u +%Y-%m-%dT%H:%MZ))"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  echo
  echo "| run | precision | strategy | exit | seconds |"
  echo "|---|---|---|---|---|"
} > "$report"

run() {  # name precision strategy args...
  local name=$1 precision=$2 strategy=$3; shift 3
  local t0=$(date +%s)
  "$MOE_APP" fit "$@" --trainer.accelerator "$ACCEL" --trainer.devices 1 --trainer.precision "$precision" \
    --trainer.max_steps "$STEPS" --trainer.limit_val_batches 2 --trainer.enable_progress_bar false \
    $strategy > "$OUT/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  echo "[gpu-smoke] $name: exit $rc in ${dt}s (log: $OUT/$name.log)"
  echo "| $name | $precision | ${strategy:-single device} | $rc | $dt |" >> "$report"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return 0
}

failed=0
FSDP="-c configs/presets/fsdp.yaml"
run dense bf16-mixed "" -c configs/tiny/dense.yaml --trainer.default_root_dir "$OUT/dense"
run dense-bf16-true bf16-true "" -c configs/tiny/dense.yaml --trainer.default_root_dir "$OUT/dense-bf16-true"
for mode in bf16 fsdp; do
  strat=""; [ "$mode" = fsdp ] && strat="$FSDP"
  run "upcycle-$mode" bf16-mixed "$strat" -c configs/tiny/upcycle.yaml \
    --trainer.default_root_dir "$OUT/upcycle-$mode" --model.init_args.source.pretrained "$OUT/dense/model"
  run "mixture-$mode" bf16-mixed "$strat" -c configs/tiny/mixture.yaml \
    --trainer.default_root_dir "$OUT/mixture-$mode" --model.init_args.source.pretrained "$OUT/upcycle-$mode/model"
done
# PESC: QLoRA (4-bit NF4 base on CUDA) on one device; under FSDP a 16-bit base (4-bit cannot be sharded).
run pesc-qlora bf16-mixed "" -c configs/tiny/pesc.yaml --trainer.default_root_dir "$OUT/pesc-qlora" \
  --model.init_args.source.pretrained "$OUT/dense/model" --model.init_args.pesc.quantize_4bit true
run pesc-fsdp bf16-mixed "$FSDP" -c configs/tiny/pesc.yaml --trainer.default_root_dir "$OUT/pesc-fsdp" \
  --model.init_args.source.pretrained "$OUT/dense/model"
[ "$BENCH" = 1 ] || { echo "[gpu-smoke] report: $report ($failed failed)"; exit $(( failed > 0 )); }
python benchmarks/moe_block.py --json "$OUT/moe_block.json" > "$OUT/moe_block.txt" 2>&1 && cat "$OUT/moe_block.txt"
python benchmarks/pesc_step.py --json "$OUT/pesc_step.json" > "$OUT/pesc_step.txt" 2>&1 && cat "$OUT/pesc_step.txt"
echo "[gpu-smoke] report: $report ($failed failed)"
exit $(( failed > 0 ))
