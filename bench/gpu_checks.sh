#!/usr/bin/env bash
# Every GPU figure of the throughput issue in one run, ~8 minutes on an H100/H200-class GPU with 16 CPU cores
# (each stage has its own time limit, 570 s in all,
# so the whole script fits a 600 s command; expected ~7 min):
#   1. the training step at the recipe's size (28 records x 3 views, 384x128, stride 12, bf16): time, model FLOPs,
#      TFLOP/s, MFU and phase breakdown before (defaults) and after each switch: foreach / fused SGD, texts padded to
#      multiples of 16, device augmentation, train.compile (the whole objective), and all together ("after");
#   2. one epoch end to end with the loader on a synthetic dataset of CUHK-PEDES's counts and image sizes (34,054
#      train JPEGs, 68,126 captions): CPU augmentation with data.num_workers workers, then device augmentation from
#      the decoded-image cache; evaluation of the test split at full size; the projected 120-epoch time;
#   3. the fastest setting that fits 12, 16, 24, 40 and 80 GB (torch.cuda.set_per_process_memory_fraction);
#   4. ranking speed at the three test sets' sizes (python -m bench.bench_eval, as before).
# Writes console logs, JSON rows, env.txt and SUMMARY.md (python -m bench.summarize) into RESULTS.
#   bash bench/gpu_checks.sh                      # RESULTS defaults to bench/results/gpu_<date>_<time>
#   RESULTS=$OUT/gpu bash bench/gpu_checks.sh     # on the lent machine: $OUT comes back
#   bash bench/gpu_checks.sh --cpu-smoke          # the same stages on CPU with tiny sizes: checks that it runs
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
STAMP=$(date +%Y%m%d_%H%M)
if [[ $SMOKE == 1 ]]; then
    RESULTS=${RESULTS:-bench/results/cpu_smoke_$STAMP}
    DEV="--device cpu --sizes tiny --threads 1"
    STEP="--batch 4 --steps 1 --warmup 1 --profile-steps 1"
    VARIANTS_EAGER=baseline,foreach,pad16,device_aug
    VARIANTS_COMPILED=${SMOKE_COMPILED:-}   # CPU compilation takes minutes: opt in with SMOKE_COMPILED=compile
    DATA=${DATA:-runs/e2e_smoke}
    COUNTS="--train-ids 24 --train-images 60 --train-captions 120 --eval-ids 8 --eval-images 16 --eval-captions 32"
    E2E="--batch 8 --max-steps 3 --warmup 1"
    WORKERS=2
    MEM="--batch 4 --steps 1"
    RANK="--device cpu --sizes rstp --repeats 1 --chunk-size 256"
    T_DATA=300 T_EAGER=300 T_COMPILED=600 T_E2E=300 T_MEM=300 T_RANK=120
else
    RESULTS=${RESULTS:-bench/results/gpu_$STAMP}
    DEV="--device cuda --sizes base"
    STEP="--batch 28 --steps 15 --warmup 3 --profile-steps 3"
    VARIANTS_EAGER=baseline,foreach,fused,pad16,device_aug
    VARIANTS_COMPILED=compile,after
    DATA=${DATA:-runs/e2e_cuhk}
    COUNTS=""   # bench/e2e_data.py's defaults: CUHK-PEDES's counts
    E2E="--batch 28 --max-steps 150 --warmup 10"
    WORKERS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
    MEM="--batch 28 --steps 4"
    RANK="--device cuda"
    T_DATA=60 T_EAGER=80 T_COMPILED=140 T_E2E=190 T_MEM=70 T_RANK=30   # 570 s at most
fi
mkdir -p "$RESULTS"
START=$SECONDS
stage() { echo "=== $1 (t=$((SECONDS - START)) s) ===" | tee -a "$RESULTS/stages.txt"; }

stage "environment"
{
    date -u; echo "nproc $(nproc)"; cat /proc/loadavg; uname -a
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    $PY -c "import torch, torchvision, timm, transformers, PIL; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'pillow', PIL.__version__)"
    git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} 2>&1 | tee "$RESULTS/env.txt"

stage "1a. training step, eager variants: $VARIANTS_EAGER"
timeout $T_EAGER $PY -m bench.train_step $DEV $STEP --variants $VARIANTS_EAGER --json "$RESULTS/step_eager.json" \
    2>&1 | grep -vE "^(USDT|ERROR:.*gpuGetDeviceCount)" | tee "$RESULTS/step_eager.txt"

if [[ -n "$VARIANTS_COMPILED" ]]; then
    stage "1b. training step, compiled variants: $VARIANTS_COMPILED"
    timeout $T_COMPILED $PY -m bench.train_step $DEV $STEP --warmup 8 --variants $VARIANTS_COMPILED \
        --json "$RESULTS/step_compiled.json" 2>&1 | grep -vE "^(USDT|ERROR:.*gpuGetDeviceCount)" \
        | tee "$RESULTS/step_compiled.txt"
fi

stage "2. one epoch end to end with the loader, evaluation at full size, 120-epoch projection"
timeout $T_DATA $PY -m bench.e2e_data --out "$DATA" $COUNTS --workers $WORKERS 2>&1 | tee "$RESULTS/e2e_data.txt"
timeout $((T_E2E / 2)) $PY -m bench.train_epoch $DEV $E2E $COUNTS --data-dir "$DATA" \
    --set data.num_workers=$WORKERS --json "$RESULTS/e2e_cpu_augment.json" 2>&1 \
    | grep -vE "^(USDT|ERROR:.*gpuGetDeviceCount|INFO)" | tee "$RESULTS/e2e_cpu_augment.txt"
timeout $((T_E2E / 2)) $PY -m bench.train_epoch $DEV $E2E $COUNTS --data-dir "$DATA" \
    --set data.num_workers=$WORKERS --set data.augment_on=device --set "data.image_cache=$DATA.cache" \
    --json "$RESULTS/e2e_device_augment.json" 2>&1 | grep -vE "^(USDT|ERROR:.*gpuGetDeviceCount|INFO)" \
    | tee "$RESULTS/e2e_device_augment.txt"

stage "3. memory budgets"
timeout $T_MEM $PY -m bench.train_memory $DEV $MEM --memory-budgets 12,16,24,40,80 --json "$RESULTS/memory.json" \
    2>&1 | grep -vE "^(USDT|ERROR:.*gpuGetDeviceCount)" | tee "$RESULTS/memory.txt"

stage "4. ranking speed at the three test sets' sizes (random features)"
timeout $T_RANK $PY -m bench.bench_eval $RANK 2>&1 | tee "$RESULTS/bench_eval.txt"

stage "summary"
$PY -m bench.summarize "$RESULTS" > /dev/null && echo "wrote $RESULTS/SUMMARY.md"
echo "total $((SECONDS - START)) s" | tee -a "$RESULTS/stages.txt"
