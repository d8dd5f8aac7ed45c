#!/usr/bin/env bash
# The latency figures of docs/scale.md again, on stores and indexes bench/search_checks.sh built: faiss query phases
# at 1M and 10M x 768, exact at 1M, the re-scoring sweep at 1M, the web page's start on the 1M index (~1 minute).
# Run it with nothing else on the machine (the committed run paused the machine's trainings with SIGSTOP by hand).
#   bash bench/search_quiet_checks.sh            # RESULTS defaults to bench/results/search_<date>_quiet
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
R=${RESULTS:-bench/results/search_$(date +%Y%m%d)_quiet}; W=${WORK:-runs/bench_search_scale}
mkdir -p $R
{ echo "commit $(git rev-parse HEAD)"; uptime; } > $R/load_before.txt
for size in 1000000 10000000; do
  python -m bench.bench_search --scale-phase query $W $size 768 faiss '{"memory_budget_gib": 4.0}' --threads 2 | tail -1 > $R/query_faiss_${size}_768.json
done
python -m bench.bench_search --scale-phase query $W 1000000 768 exact '{"memory_budget_gib": 4.0}' --threads 2 | tail -1 > $R/query_exact_1000000_768.json
python -m bench.bench_search --nprobe-sweep 1 --rescore-sweep 100,200,500,1000,2000 --sizes 1000000 --dims 768 --work $W --scale-out $R/rescore_1000000_768 --threads 2 > /dev/null
python -m bench.bench_search --serve-check 1000000 --work $W --scale-out $R/serve_check_1m --threads 2 > /dev/null
python -m bench.bench_search --serve-breakdown 1000000 --work $W --scale-out $R/serve_breakdown_1m --threads 2 > /dev/null
uptime > $R/load_after.txt
