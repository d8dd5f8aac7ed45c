set -x
uptime
for r in pre pre_swap_itc_itm pre_swap_itm; do python -m bench.bench_word_swaps --checkpoint runs/models/$r/last.pth --root-key data.eval_root --data-root runs/parts/classic-400 --words black white gray grey red blue green yellow orange purple pink brown beige khaki navy maroon violet tan gold golden silver cream ivory olive teal turquoise burgundy crimson scarlet lavender lilac lime coral charcoal cyan magenta camel rust rose mustard peach indigo cobalt --out ws_base_classic-seed0.json --out out/word_swaps_$r.json > /dev/null; done
uptime
python -m bench.bench_pointing --checkpoint runs/models/demo/best.pth --data-root runs/parts/classic-400 --split val --out out/pointing_demo_val.json
uptime
python -m bench.bench_pointing --checkpoint runs/models/demo/best.pth --data-root runs/parts/classic-400 --split test --out out/pointing_demo_test.json
uptime
python -m bench.bench_pointing --checkpoint runs/models/ft24/best.pth --data-root runs/parts/classic-400 --split val --out out/pointing_ft24_val.json
uptime
