#!/usr/bin/env bash
# CPU figures for issue 15 (2 shared cores); commands as recorded in the results folder.
set -uo pipefail
cd "$(dirname "$0")/../../.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
R=$1; mkdir -p $R
F='^(USDT|ERROR:.*gpuGetDeviceCount|W[0-9]{4} |INFO)'
{ date -u; echo "nproc $(nproc)"; cat /proc/loadavg; uname -a; lscpu | grep -E "Model name|^CPU\(s\)|Thread"; python -c "import torch, torchvision, timm, transformers, PIL; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'pillow', PIL.__version__)"; git rev-parse HEAD; } > $R/env.txt 2>&1
echo "A $(cat /proc/loadavg)" >> $R/load.txt
python bench/bench_train.py --device cpu --sizes tiny --threads 1 --batch 8 --steps 5 --warmup 3 --profile-steps 2 --variants baseline,foreach,fused,pad16,device_aug --json $R/step_eager.json 2>&1 | grep -vE "$F" > $R/step_eager.txt
echo "A2 $(cat /proc/loadavg)" >> $R/load.txt
python bench/bench_train.py --device cpu --sizes tiny --threads 1 --batch 8 --steps 5 --warmup 6 --profile-steps 2 --variants baseline,compile,after --json $R/step_compiled.json 2>&1 | grep -vE "$F" > $R/step_compiled.txt
echo "B $(cat /proc/loadavg)" >> $R/load.txt
python bench/bench_train.py --device cpu --sizes small --threads 1 --batch 8 --steps 3 --warmup 2 --profile-steps 1 --variants baseline,foreach,pad16,device_aug --json $R/step_small.json 2>&1 | grep -vE "$F" > $R/step_small.txt
echo "C $(cat /proc/loadavg)" >> $R/load.txt
python bench/bench_train.py --device cpu --sizes base --threads 2 --batch 2 --steps 2 --warmup 1 --profile-steps 1 --json $R/step_base.json 2>&1 | grep -vE "$F" > $R/step_base.txt
echo "D $(cat /proc/loadavg)" >> $R/load.txt
COUNTS="--train-ids 300 --train-images 1000 --train-captions 2000 --eval-ids 40 --eval-images 100 --eval-captions 200"
python bench/bench_train.py --device cpu --sizes tiny --threads 1 --end-to-end --data-dir <tmp>/ivt_e2e_cpu $COUNTS --data-workers 2 --batch 8 --max-steps 30 --warmup 5 --set "input.image_size=[384,128]" --set data.num_workers=2 --json $R/e2e_cpu_augment.json 2>&1 | grep -vE "$F" > $R/e2e_cpu_augment.txt
echo "D2 $(cat /proc/loadavg)" >> $R/load.txt
python bench/bench_train.py --device cpu --sizes tiny --threads 1 --end-to-end --data-dir <tmp>/ivt_e2e_cpu $COUNTS --data-workers 2 --batch 8 --max-steps 30 --warmup 5 --set "input.image_size=[384,128]" --set data.num_workers=2 --set data.augment_on=device --set data.image_cache=<tmp>/ivt_e2e_cpu.cache --json $R/e2e_device_augment.json 2>&1 | grep -vE "$F" > $R/e2e_device_augment.txt
echo "E $(cat /proc/loadavg)" >> $R/load.txt
python bench/bench_data.py --data-dir <tmp>/ivt_e2e_cpu --images 300 --threads 1 > $R/data_path.txt 2>&1
echo "end $(cat /proc/loadavg)" >> $R/load.txt
python bench/summarize.py $R > /dev/null
date -u >> $R/env.txt
