"""Can a fusion stack learn which part wears which colour at all, at this data size? A fresh 2-layer fusion stack
and a logit head read the frozen encoder's tokens after its first LAYERS blocks (text and image) and are trained
on one task only: a training caption on its own image scores above the same caption with two colours exchanged
(datasets.collate.swap_two_words, the pairs of loss.itm_swap_words). Reported: the training pairs it orders right
as it goes, and at the end the share of val captions it scores above their swap (50% is a coin). A measurement
aid for this folder, from the repository root:
PYTHONPATH=. python bench/results/2026-12-06_binding_capacity/fit_binding.py CHECKPOINT DATA_ROOT STEPS LAYERS LR"""
import sys
import time

import torch
import torch.nn.functional as F

from datasets.build import build_train_loader
from datasets.collate import swap_two_words
from datasets.text_levels import sentence_level
from datasets.train_data import EvalImageDataset
from datasets.transforms import build_test_transform
from engine.checkpoints import load_for_inference
from engine.data import load_data
from models.encoder import TEXT, VISION
from models.fusion import FusionStack
from utils.errors import user_errors_as_one_line

COLOURS = "bench/results/2026-12-06_swap_negatives/colours.txt"


class FrozenTokens:
    """The encoder's tokens after its first ``layers`` blocks, final norm applied, without gradients."""

    def __init__(self, encoder, layers: int) -> None:
        self.encoder, self.layers = encoder, layers

    def _blocks(self, x: torch.Tensor, mask, modality: str) -> torch.Tensor:
        attn = None if mask is None else mask.bool()[:, None, None, :]
        for block in self.encoder.blocks[:self.layers]:
            x = block(x, attn, modality)
        return self.encoder.norm(x)

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = enc.patch_embed(images)
        x = torch.cat([enc.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self._blocks(x + enc.pos_embed + enc.type_embed, None, VISION)

    @torch.no_grad()
    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._blocks(self.encoder.embeddings(ids), mask, TEXT)


@user_errors_as_one_line()
def main() -> None:
    checkpoint, root, steps, layers, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    words = open(COLOURS).read().strip()
    model, cfg, tokenizer, _ = load_for_inference(
        checkpoint, None, [f"data.root={root}", "data.num_workers=0", f"loss.itm_swap_words={words}",
                           "loss.itm_weight=1.0"], "cpu")
    model.eval()
    records, splits = load_data(cfg)
    loader, sampler, dataset = build_train_loader(cfg, records, tokenizer)
    tokens = FrozenTokens(model.encoder, layers)
    torch.manual_seed(0)
    width = cfg.model.embed_dim
    fusion = FusionStack(2, width, cfg.model.num_heads, 4 * width, image_width=width, dropout=0.1)
    head = torch.nn.Linear(width, 1)
    optimizer = torch.optim.AdamW([*fusion.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)

    def score(ids, mask, image_tokens):
        return head(fusion(tokens.text(ids, mask), mask, image_tokens)[:, 0]).squeeze(-1)

    began, step, epoch = time.time(), 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            if step >= steps:
                break
            rows = batch["swap_rows"]
            image_tokens = tokens.image(batch["images"][:batch["pids"].shape[0]])[rows]
            fusion.train()
            own = score(batch["caption_ids"][rows], batch["caption_mask"][rows], image_tokens)
            swapped = score(batch["swap_ids"], batch["swap_mask"], image_tokens)
            loss = F.binary_cross_entropy_with_logits(torch.cat([own, swapped]),
                                                      torch.cat([torch.ones_like(own), torch.zeros_like(swapped)]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"layers {layers} step {step} loss {loss.item():.3f} training pairs ordered right "
                      f"{(own > swapped).float().mean().item():.2f} ({time.time() - began:.0f} s)", flush=True)

    wordset = frozenset(cfg.loss.itm_swap_words)
    val = [(sentence_level(r.caption, cfg.text.lowercase), r.image_path) for r in splits.val]
    val = [(c, swap_two_words(c, wordset), p) for c, p in val if swap_two_words(c, wordset) is not None]
    images = EvalImageDataset([p for _, _, p in val], build_test_transform(cfg.input))
    fusion.eval()
    own, swapped = [], []
    with torch.no_grad():
        for start in range(0, len(val), 128):
            chunk = val[start:start + 128]
            image_tokens = tokens.image(torch.stack([images[start + i][0] for i in range(len(chunk))]))
            for texts, out in (([c for c, _, _ in chunk], own), ([s for _, s, _ in chunk], swapped)):
                enc = tokenizer(texts, padding=True, truncation=True, max_length=int(cfg.text.max_text_len),
                                return_tensors="pt")
                out.append(score(enc["input_ids"], enc["attention_mask"], image_tokens))
    own, swapped = torch.cat(own), torch.cat(swapped)
    print(f"RESULT layers {layers}, {steps} steps: val captions scored above their swap "
          f"{100 * (own > swapped).float().mean().item():.1f}% of {len(val)}", flush=True)


if __name__ == "__main__":
    main()
