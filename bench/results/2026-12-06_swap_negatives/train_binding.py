"""Local diagnostic: on training batches, does the ITM head (alone, minus the cosine prior) score each caption
above its swap? argv: run dir, pretraining last.pth (for the tokenizer), batches, [config overrides].
From the repository root: PYTHONPATH=. python bench/results/2026-12-06_swap_negatives/train_binding.py ..."""
import sys
import torch
from utils.config import load_config
from engine.data import load_data, build_run_tokenizer
from engine.checkpoints import read_checkpoint_or_folder, load_for_inference
from datasets.build import build_train_loader
run, pre, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = load_config(f"{run}/config.yaml", ["data.num_workers=0", *sys.argv[4:]])
records, _ = load_data(cfg)
tok = build_run_tokenizer(cfg, records, None, init=("x", read_checkpoint_or_folder(pre)))
loader, sampler, ds = build_train_loader(cfg, records, tok)
sampler.set_epoch(3); ds.set_epoch(3)
model, *_ = load_for_inference(f"{run}/last.pth", None, [], "cpu")
model.eval()
wins, total, prior_wins = 0.0, 0, 0.0
with torch.inference_mode():
    for i, b in enumerate(loader):
        if i >= n:
            break
        B = b["pids"].shape[0]
        img, _ = model.encode_image(b["images"][:B], bmm=False)
        v = b["swap_rows"]  # the batch layout since the host-sync change (a bool swap_valid [B] when it ran)
        ct, _ = model.encode_text(b["caption_ids"][v], b["caption_mask"][v], bmm=False)
        st, _ = model.encode_text(b["swap_ids"], b["swap_mask"], bmm=False)
        lc = model.itm_logits(ct, b["caption_mask"][v], img[v])
        ls = model.itm_logits(st, b["swap_mask"], img[v])
        pc = model.cosine_prior(ct, b["caption_mask"][v], img[v])
        ps = model.cosine_prior(st, b["swap_mask"], img[v])
        mc, ms = lc[:, 1] - lc[:, 0], ls[:, 1] - ls[:, 0]
        hc, hs = mc - pc[:, 1], ms - ps[:, 1]
        wins += float((hc > hs).float().sum()); prior_wins += float((pc[:, 1] > ps[:, 1]).float().sum()); total += v.numel()
        print(i, "match prob caption / swap", torch.softmax(lc, 1)[:, 1].mean().item(), torch.softmax(ls, 1)[:, 1].mean().item())
print("train pairs", total, "head alone prefers caption", round(100 * wins / total, 1), "prior", round(100 * prior_wins / total, 1))
