set -x
uptime
for m in rr24 rerank--swaps-in-itc-and-itm-pretrained-classic-seed0 demo--128x64-scratch-classic-seed2; do python -m bench.bench_pointing --checkpoint runs/models/$m/best.pth --data-root runs/parts/classic-400 --split val --out out/pointing_${m}_val.json; uptime; done
