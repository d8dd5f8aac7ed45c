#!/usr/bin/env bash
# Every search-at-scale figure of docs/scale.md in one run on this CPU machine (~20 minutes on 2 cores; the feature
# stores, 17 GB for 1M and 10M at width 768, are written on the first run and reused after):
#   1. exact vs faiss at 100k, 1M and 10M images, width 768 (python -m bench.bench_search --scale);
#   2. recall and latency per number of candidates re-scored exactly (search.rescore_candidates) at 1M and 10M;
#   3. the web page (serve.py) on a 1M-image index: seconds from start to its first answer, then step by step.
# Run it from a clean checkout of the commit the results should name; the machine's load is recorded in each file.
#   bash bench/search_checks.sh                  # RESULTS defaults to bench/results/search_<date>
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results/search_$(date +%Y%m%d)}
WORK=${WORK:-runs/bench_search_scale}
mkdir -p "$RESULTS"
uptime > "$RESULTS/load_before.txt"
$PY -m bench.bench_search --scale --sizes 100000,1000000,10000000 --dims 768 --work "$WORK" \
    --scale-out "$RESULTS/scale_768" --threads 2 | tee "$RESULTS/scale_768.log"
for size in 1000000 10000000; do
    $PY -m bench.bench_search --nprobe-sweep 1 --rescore-sweep 100,200,500,1000,2000 --sizes $size --dims 768 \
        --work "$WORK" --scale-out "$RESULTS/rescore_${size}_768" --threads 2 > /dev/null
done
$PY -m bench.bench_search --serve-check 1000000 --work "$WORK" --scale-out "$RESULTS/serve_check_1m" --threads 2 \
    > /dev/null
$PY -m bench.bench_search --serve-breakdown 1000000 --work "$WORK" --scale-out "$RESULTS/serve_breakdown_1m" \
    --threads 2 > /dev/null
uptime > "$RESULTS/load_after.txt"
git rev-parse HEAD > "$RESULTS/commit.txt"
