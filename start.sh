#!/usr/bin/env bash
# Launch a training or evaluation script with torchrun.
#   bash start.sh SCRIPT NUM_GPUS [args and key=value overrides ...]
#   bash start.sh train_cuhkpedes.py 4
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash start.sh train_pretrain.py 8   # on each node
# NUM_GPUS is the number of processes on this node. With NNODES > 1 every node runs the same command with its
# own NODE_RANK. PYTHON selects the interpreter; by default the first of python, python3 on PATH that has torch
# (the one the README's commands run), so a system python3 without torch is never picked by accident.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash start.sh SCRIPT NUM_GPUS [args ...]" >&2
  exit 2
fi
script=$1; nproc=$2; shift 2
cd "$(dirname "$0")"
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
      python=$candidate
      break
    fi
  done
  if [ -z "$python" ]; then
    echo "start.sh: no python with torch on PATH; install the requirements or set PYTHON=/path/to/python" >&2
    exit 2
  fi
fi
cmd=("$python" -m torch.distributed.run --nproc_per_node="$nproc" --nnodes="$nnodes" --node_rank="$node_rank"
     --master_addr="$master_addr" --master_port="$master_port" "$script" "$@")
# A run stopped by a signal exits 75 (EX_TEMPFAIL: resume it with --resume auto), but torchrun reports any
# worker's non-zero status as 1; local rank 0 also writes its status into IVT_EXIT_STATUS_FILE, which this script
# turns back into its own exit status.
status_file=$(mktemp "${TMPDIR:-/tmp}/ivt_exit_status.XXXXXX")
trap 'rm -f "$status_file"' EXIT
export IVT_EXIT_STATUS_FILE=$status_file
echo "+ ${cmd[*]}"
# In the background, and deaf to SIGTERM/SIGINT itself: a signal to the process group (scancel, Ctrl-C) reaches
# torchrun and its workers, which save last.pth and stop; this script waits for them and reports their status.
trap ':' TERM INT
"${cmd[@]}" &
child=$!
while kill -0 "$child" 2>/dev/null; do
  wait "$child" || true
done
status=0
wait "$child" || status=$?
if [ "$status" -ne 0 ] && [ "$(cat "$status_file" 2>/dev/null)" = 75 ]; then
  status=75
fi
exit "$status"
