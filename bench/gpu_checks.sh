#!/usr/bin/env bash
# The GPU checks in one go (what the README's performance section reports): training-step throughput at tiny and
# base size in bf16, evaluation ranking speed at the three test sets' sizes, and a short end-to-end demo run on CUDA.
#   OUT=results bash bench/gpu_checks.sh
set -uo pipefail
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-bench_results}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/bench_train.py --device cuda --sizes tiny,base --batch 28 --steps 15 2>&1 | tee "$OUT/bench_train_cuda.txt"
timeout 90 python3 bench/bench_eval.py --device cuda 2>&1 | tee "$OUT/bench_eval_cuda.txt"
timeout 120 python3 train_cuhkpedes.py --config configs/demo.yaml --output-dir /tmp/demo_gpu data.root=/tmp/demo_data \
    train.epochs=6 train.amp=bf16 data.num_workers=6 2>&1 | grep -vE "it/s|s/it" | tail -25 | tee "$OUT/demo_cuda.txt"
