"""Evaluate a checkpoint (ours or the authors' released one) on a split: tables, metrics_<split>.json, pictures.

    python evaluate.py --checkpoint runs/cuhkpedes/best.pth [--split test] [--save-examples 20] [--save-features]
    python evaluate.py --checkpoint ivt_cuhk.pth --config configs/cuhkpedes.yaml data.root=data/CUHK-PEDES
    torchrun --nproc_per_node 4 evaluate.py --checkpoint runs/cuhkpedes/best.pth

Our checkpoints carry their config; ``--config`` then only replaces the task, data and eval settings (a
pretraining checkpoint evaluates zero-shot on the data.eval_root it was given, or on the one you pass). The authors'
checkpoints carry none, so ``--config`` names the recipe (the architecture is read from the tensors).

Results go next to the checkpoint as metrics_<split>_<checkpoint name>.json (and examples_<split>_<checkpoint
name>/), so a training run's own metrics_<split>.json is never overwritten; --output-dir DIR writes
metrics_<split>.json there instead (still named after the checkpoint when DIR is the checkpoint's folder).

--save-features also writes the features the evaluation computed beside the metrics file, as
features_<split>[_<checkpoint name>].pt (utils.checkpoint.load_file or torch.load; tensors and lists only): texts [Q] with text_features [Q, D],
query_pids and query_image_ids; image_paths [G] with image_features [G, D], gallery_pids and gallery_image_ids;
plus checkpoint, split, epoch and protocol. The features are float32, before L2 normalisation, rows in the
protocol's order: e.g. to study the embedding or to score another ranking without encoding again.
"""
from engine.evaluate_cli import evaluate_main


def main(argv: list[str] | None = None) -> dict:
    return evaluate_main(argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
