"""Copy a bench checkpoint of commit db76361 without ``sampler.neighbour_from_epoch`` in its config (0 in every
one of them, a key removed since whose 0 is today's behaviour), so that today's loader reads it. A measurement aid
for this folder, from the repository root:
PYTHONPATH=. python bench/results/2026-12-06_swap_negatives/strip_key.py SRC DST"""
import sys

from utils.checkpoint import atomic_save, load_file

checkpoint = load_file(sys.argv[1])
assert checkpoint["config"]["sampler"].pop("neighbour_from_epoch") == 0
atomic_save(checkpoint, sys.argv[2])
