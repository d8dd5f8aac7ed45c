"""Losses against hand-computed values; hard negatives, ITM/MLM helpers and gathering."""
import math
import os
import tempfile

import pytest
import torch

from utils.checkpoint import load_file
import torch.nn.functional as F

from models.losses import (
    cmpm_loss,
    gather_with_grad,
    itc_loss,
    itm_loss,
    itm_rank_loss,
    itm_targets,
    mlm_loss,
    sample_hard_negatives,
)

EPS = 1e-8


def kl_row(logits, q):
    """KL(softmax(logits) || q) with the eps of the authors' code, in plain Python."""
    z = sum(math.exp(x) for x in logits)
    p = [math.exp(x) / z for x in logits]
    return sum(pi * (math.log(pi) - math.log(qi + EPS)) for pi, qi in zip(p, q))


def test_cmpm_matches_hand_computation():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pids = torch.tensor([0, 0, 1])
    r2, h = math.sqrt(2.0), 1.0 / math.sqrt(2.0)
    # image i . unit text j; unit texts are (1,0), (0,1), (h,h)
    i2t_logits = [[1.0, 0.0, h], [0.0, 1.0, h], [1.0, 1.0, r2]]
    # text i . unit image j; unit images are (1,0), (0,1), (h,h)
    t2i_logits = [[2.0, 0.0, r2], [0.0, 1.0, h], [1.0, 1.0, r2]]
    # ids 0,0 have two positives -> 1/sqrt(2); id 1 has one -> 1
    q = [[h, h, 0.0], [h, h, 0.0], [0.0, 0.0, 1.0]]
    i2t = sum(kl_row(i2t_logits[i], q[i]) for i in range(3)) / 3
    t2i = sum(kl_row(t2i_logits[i], q[i]) for i in range(3)) / 3
    got = cmpm_loss(v, t, pids, pids)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-5)


@pytest.mark.parametrize("per_id, plateau", [(4, 23.42), (2, 25.52)])
def test_cmpm_of_input_independent_features_is_the_demo_plateau(per_id, plateau):
    """Identical features give the uniform softmax: the value a from-scratch run sits at while its features have
    collapsed (bench/bench_collapse.py). 32 records x 3 views/levels, ``per_id`` records per identity."""
    records, views = 32, 3
    pids = torch.arange(records // per_id).repeat_interleave(per_id).repeat(views)  # [96]
    feats = torch.randn(1, 16).expand(records * views, 16)
    n, positives = records * views, per_id * views
    row = ((n - positives) / n * (math.log(1 / n) - math.log(1e-8))
           + positives / n * (math.log(1 / n) + 0.5 * math.log(positives)))
    loss = cmpm_loss(feats, feats, pids, pids).item()
    assert loss == pytest.approx(2 * row, abs=1e-4)
    assert round(loss, 2) == plateau


def test_cmpm_non_square_uses_row_counts():
    # 1 image (pid 0) against texts with pids [0, 0, 1]: its row has two positives
    v = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    h = 1.0 / math.sqrt(2.0)
    i2t = kl_row([1.0, 0.0, 1.0], [h, h, 0.0])
    # texts against the single image: every row holds one entry, softmax = 1, q = 1 or 0
    t2i = (kl_row([1.0], [1.0]) + kl_row([0.0], [1.0]) + kl_row([1.0], [0.0])) / 3
    got = cmpm_loss(v, t, torch.tensor([0]), torch.tensor([0, 0, 1]))
    assert got.item() == pytest.approx(i2t + t2i, rel=1e-5)
    assert t2i == pytest.approx(-math.log(EPS) / 3, rel=1e-6)  # the row with no positive pays -log(eps)


def test_cmpm_equals_authors_formula_for_symmetric_labels():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(9, 5, generator=g)
    t = torch.randn(9, 5, generator=g)
    pids = torch.tensor([3, 3, 1, 1, 1, 7, 3, 2, 7])
    y = (pids[:, None] == pids[None, :]).float()
    y_norm = y / y.norm(dim=1)  # the authors' broadcast: column j divided by ||row j||

    def authors(a, b):
        logits = a @ F.normalize(b, dim=1).t()
        pred = F.softmax(logits, dim=1)
        return (pred * (F.log_softmax(logits, dim=1) - torch.log(y_norm + EPS))).sum(1).mean()

    expected = authors(v, t) + authors(t, v)
    assert cmpm_loss(v, t, pids, pids).item() == pytest.approx(expected.item(), rel=1e-6)


def authors_cmpm_written_out(image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """The authors' CMPM step by step (one id vector for both sides, N = M): probabilities by softmax, their
    log by log_softmax, targets Y / ||Y||_2 with the [N] norm broadcast over the last dim."""
    labels = (pids.reshape(-1, 1) - pids.reshape(1, -1) == 0).float()
    targets = labels / labels.norm(dim=1)
    unit_image = image / image.norm(dim=1, keepdim=True)
    unit_text = text / text.norm(dim=1, keepdim=True)
    total = torch.zeros(())
    for scores in (torch.matmul(image, unit_text.t()), torch.matmul(text, unit_image.t())):
        per_pair = F.softmax(scores, dim=1) * (F.log_softmax(scores, dim=1) - torch.log(targets + EPS))
        total = total + torch.mean(torch.sum(per_pair, dim=1))
    return total


@pytest.mark.parametrize("n, dim, num_ids, seed", [(9, 5, 4, 0), (84, 64, 7, 1), (144, 768, 12, 2), (30, 16, 30, 3)])
def test_cmpm_is_bit_equal_to_the_authors_formula(n, dim, num_ids, seed):
    g = torch.Generator().manual_seed(seed)
    v = 3.0 * torch.randn(n, dim, generator=g)
    t = 3.0 * torch.randn(n, dim, generator=g)
    pids = torch.randint(0, num_ids, (n,), generator=g)
    expected = authors_cmpm_written_out(v, t, pids)
    assert torch.equal(cmpm_loss(v, t, pids, pids), expected), (cmpm_loss(v, t, pids, pids).item(), expected.item())


def test_cmpm_float32_under_autocast_and_gradients():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 8, generator=g, requires_grad=True)
    t = torch.randn(6, 8, generator=g, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = cmpm_loss(v, t, pids, pids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cmpm_loss(v, t, pids, pids)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


def test_cmpm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="image ids must be"):
        cmpm_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2), torch.zeros(3))


def test_itc_one_hot_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    temp = torch.tensor(0.5, requires_grad=True)
    # logits = [[2, 2], [0, 2]]; i2t rows: log 2, log(1 + e^-2); t2i rows: log(1 + e^-2), log 2
    expected = 0.5 * (math.log(2) + math.log(1 + math.exp(-2)))
    got = itc_loss(img, txt, torch.tensor([0, 1]), torch.tensor([0, 1]), temp)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert temp.grad is not None and temp.grad.item() != 0.0


def test_itc_soft_targets_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # images both id 7, texts ids 7 and 8. logits = [[2, 2], [0, 2]].
    # i2t: image0 -> text0 only: log 2; image1 -> text0 only: -log(e^0 / (e^0 + e^2)) = log(1 + e^2)
    # t2i: text0 -> both images at 1/2: -(0.5 * 2 - log(e^2 + 1)) = log(1 + e^2) - 1; text1 has no positive: 0
    i2t = (math.log(2) + math.log(1 + math.exp(2))) / 2
    t2i = (math.log(1 + math.exp(2)) - 1) / 2
    got = itc_loss(img, txt, torch.tensor([7, 7]), torch.tensor([7, 8]), torch.tensor(0.5))
    assert got.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-6)


def test_hard_negatives_never_share_the_anchor_pid():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = 12
        pids = torch.randint(0, 4, (b,), generator=g)
        if (pids == pids[0]).all():
            continue
        # make same-pid pairs by far the most similar, so only the masking keeps them out
        sim = torch.randn(b, b, generator=g) + 50.0 * (pids[:, None] == pids[None, :]).float()
        neg_img, neg_txt = sample_hard_negatives(sim, pids, pids, generator=g)
        assert neg_img.shape == (b,) and neg_txt.shape == (b,)
        assert (pids[neg_img] != pids).all()
        assert (pids[neg_txt] != pids).all()


def authors_negative_probs(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """The authors' ITM sampling distribution per row, written out in float64: softmax over the whole row,
    plus 1e-4, same-id entries set to 0, renormalised (what torch.multinomial does with the weights)."""
    e = torch.exp(sim.double() - sim.double().max(dim=1, keepdim=True).values)
    w = e / e.sum(dim=1, keepdim=True) + 1e-4
    w[same] = 0.0
    return w / w.sum(dim=1, keepdim=True)


def allowed_only_probs(sim: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """The previous sampler (softmax over the allowed entries, no floor): the test must tell it apart."""
    return sim.double().masked_fill(same, float("-inf")).softmax(dim=1)


def chi_square(counts: torch.Tensor, probs: torch.Tensor, allowed: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's statistic over the allowed cells of every row, its degrees of freedom and the p-value."""
    n = counts.sum(dim=1, keepdim=True).double()
    expected = probs * n
    stat = float((((counts.double() - expected) ** 2 / expected)[allowed]).sum())
    dof = int(allowed.sum() - allowed.shape[0])
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                            torch.tensor(stat / 2.0, dtype=torch.float64)))
    return stat, dof, p_value


def _hard_negative_batches():
    """Random batches of 6: ids with repeats (or none: the diagonal), raw similarities (already / temp); in half
    of them the anchor's own-id pairs dominate the row, which is where the 1e-4 floor changes the draw most."""
    g = torch.Generator().manual_seed(11)
    for case in range(8):
        b = 6
        pids = None if case % 4 == 3 else torch.randint(0, 3, (b,), generator=g)
        if pids is not None and (pids == pids[0]).all():
            pids[0] = pids[0] + 1
        same = torch.eye(b, dtype=torch.bool) if pids is None else pids[:, None] == pids[None, :]
        sim = 2.0 * torch.randn(b, b, generator=g)
        if case % 2:
            sim = sim.clamp(-1, 1) + 9.0 * same.float()  # allowed softmax mass ~ e^-9: comparable to the floor
        yield pids, same, sim


def test_hard_negatives_follow_the_authors_weights():
    draws = 3000
    results = []
    for pids, same, sim in _hard_negative_batches():
        b = sim.shape[0]
        g = torch.Generator().manual_seed(b + len(results))
        counts_i2t = torch.zeros(b, b, dtype=torch.long)
        counts_t2i = torch.zeros(b, b, dtype=torch.long)
        rows = torch.arange(b)
        for _ in range(draws):
            neg_img, neg_txt = sample_hard_negatives(sim, pids, pids, generator=g)
            counts_t2i[rows, neg_img] += 1
            counts_i2t[rows, neg_txt] += 1
        for counts, s, m in ((counts_i2t, sim, same), (counts_t2i, sim.t(), same.t())):
            assert counts[m].sum() == 0  # never a same-id (or, without ids, diagonal) negative
            probs = authors_negative_probs(s, m)
            stat, dof, p_value = chi_square(counts, probs, ~m)
            max_dev = float((counts.double() / draws - probs).abs().max())
            old_stat, _, old_p = chi_square(counts, allowed_only_probs(s, m), ~m)
            results.append((stat, dof, p_value, max_dev, old_stat, old_p, bool(s.max() > 5)))
    for stat, dof, p_value, max_dev, old_stat, old_p, dominated in results:
        # 3000 draws: a cell's standard deviation is at most sqrt(0.25 / 3000) = 0.009
        assert p_value > 1e-3 and max_dev < 0.04, (stat, dof, p_value, max_dev)
        if dominated:  # the softmax over the allowed entries alone is far from what is drawn
            assert old_p < 1e-12, (old_stat, dof, old_p)
    assert sum(r[6] for r in results) >= 6


def test_hard_negatives_floor_reaches_far_negatives():
    # Without ids (the authors' call): in row i, text i is the own pair (zeroed), text i+1 dominates with
    # softmax ~1 and the other b-2 texts sit at e^-40 below it. Their weights are ~0 + 1e-4 each, so a far text
    # is drawn with probability (b-2)e-4 / (1 + (b-1)e-4) = 0.62% at b = 64; the previous sampler: ~1e-16.
    b, calls = 64, 2000
    i = torch.arange(b)
    sim = torch.full((b, b), -20.0)
    sim[i, (i + 1) % b] = 20.0
    g = torch.Generator().manual_seed(0)
    far = 0
    for _ in range(calls):
        _, neg_txt = sample_hard_negatives(sim, None, None, generator=g)
        assert (neg_txt != i).all()
        far += int((neg_txt != (i + 1) % b).sum())
    p_far = (b - 2) * 1e-4 / (1 + (b - 1) * 1e-4)
    expected = calls * b * p_far
    assert abs(far - expected) < 4 * math.sqrt(expected), (far, expected)


def test_hard_negatives_reproducible_with_generator():
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    a = sample_hard_negatives(sim, pids, pids, generator=torch.Generator().manual_seed(5))
    b = sample_hard_negatives(sim, pids, pids, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hard_negatives_error_counts_rows_without_negative():
    with pytest.raises(ValueError, match="4 of 4 image rows and 4 of 4 text rows"):
        sample_hard_negatives(torch.zeros(4, 4), torch.tensor([5, 5, 5, 5]), torch.tensor([5, 5, 5, 5]))
    # images 0 and 1 (pid 0) see only pid-0 texts; every text can still take image 2
    with pytest.raises(ValueError, match="2 of 3 image rows and 0 of 3 text rows"):
        sample_hard_negatives(torch.zeros(3, 3), torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]))


def test_itm_targets_and_loss():
    targets = itm_targets(2, "cpu")
    assert targets.dtype == torch.long
    assert targets.tolist() == [1, 1, 0, 0, 0, 0]
    logits = torch.zeros(6, 2)
    logits[0] = torch.tensor([0.0, 1.0])
    # five rows at log 2, one row at -log(e / (1 + e)) = log(1 + e^-1)
    expected = (5 * math.log(2) + math.log(1 + math.exp(-1))) / 6
    assert itm_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_itm_rank_loss_asks_each_positive_margin_above_its_two_negatives():
    # B = 2; rows: positives (text i, image i), text i with a negative image, image i with a negative text.
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0],     # positive margins 2, 0
                           [0.0, 0.0], [0.0, 3.0],     # negative-image margins 0, 3
                           [1.0, 3.0], [0.5, 0.5]])    # negative-text margins 2, 0

    def softplus(x):
        return math.log1p(math.exp(x))

    expected = 0.5 * ((softplus(0 - 2) + softplus(3 - 0)) / 2 + (softplus(2 - 2) + softplus(0 - 0)) / 2)
    assert itm_rank_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # An offset common to every pair (calibration) changes nothing; the match/no-match cross-entropy moves.
    shifted = logits + torch.tensor([0.0, 5.0])
    assert itm_rank_loss(shifted).item() == pytest.approx(expected, rel=1e-6)
    targets = itm_targets(2, "cpu")
    assert itm_loss(shifted, targets).item() != pytest.approx(itm_loss(logits, targets).item())
    with pytest.raises(ValueError, match=r"expected logits \[3B, 2\], got \(4, 2\)"):
        itm_rank_loss(torch.zeros(4, 2))


def test_mlm_loss_only_counts_labelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.full((2, 4), -100)
    labels[0, 1] = 3
    labels[1, 2] = 0

    def ce(row, target):
        return math.log(sum(math.exp(x) for x in row)) - row[target]

    expected = (ce(logits[0, 1].tolist(), 3) + ce(logits[1, 2].tolist(), 0)) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    changed = logits.clone()
    changed[0, 0] += 10.0
    changed[1, 3] -= 7.0
    assert mlm_loss(changed, labels).item() == mlm_loss(logits, labels).item()
    # the flat [n, V] form gives the same value
    assert mlm_loss(logits.reshape(8, 5), labels.reshape(8)).item() == pytest.approx(expected, rel=1e-5)


def test_mlm_loss_zero_with_grad_when_nothing_masked():
    logits = torch.randn(3, 4, 6, requires_grad=True)
    loss = mlm_loss(logits, torch.full((3, 4), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_gather_is_identity_without_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x


def _gather_worker(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = gather_with_grad(x)
        (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
        torch.save({"gathered": gathered.detach(), "grad": x.grad},
                   os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo processes: 13 s on 2 shared cores (load 10)
def test_gather_with_two_gloo_ranks():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_gather_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        out = [load_file(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    expected = torch.tensor([[1.0] * 3, [1.0] * 3, [2.0] * 3, [2.0] * 3])
    for r in range(2):
        assert torch.equal(out[r]["gathered"], expected)
    # only the local slice carries gradient: rank 0 owns rows 0-1 (weights 1, 2), rank 1 rows 2-3 (3, 4)
    assert torch.equal(out[0]["grad"], torch.tensor([[1.0] * 3, [2.0] * 3]))
    assert torch.equal(out[1]["grad"], torch.tensor([[3.0] * 3, [4.0] * 3]))


@pytest.mark.parametrize("width", [64, 84])
def test_cmpm_targets_are_bit_equal_to_the_authors_formula_for_every_positive_count(width):
    # The authors divide the 0/1 label matrix by its rows' L2 norms; sum().sqrt() is one ulp off for some
    # counts (19, 34, 37, ...), so only the same formula is bit-equal.
    from models.losses import cmpm_targets

    for count in range(1, min(width, 64) + 1):
        pids = torch.arange(width)
        pids[:count] = -1  # one person with `count` items, everyone else alone
        labels = (pids[:, None] == pids[None, :]).float()
        authors = labels / labels.norm(dim=1)
        assert torch.equal(cmpm_targets(labels), authors), count
        assert torch.equal(cmpm_targets(labels.t()), authors.t()), count  # the text-to-image direction's view
    assert torch.equal(cmpm_targets(torch.zeros(2, 3)), torch.zeros(2, 3))  # no positive: zeros, not NaN


def test_several_hard_negatives_per_anchor_are_different_and_drawn_as_the_authors_weigh_them():
    # Image 0 (pid 0) may pair with texts 2, 3, 4 (pids 1, 2, 3); its weights, from these similarities, are
    # proportional to e^2, e^1, e^0 (the floor 1e-4 is negligible here): the first of two draws follows them, the
    # second is never the first, and the pair {2, 3} comes with probability p2 p3 / (1 - p2) + p3 p2 / (1 - p3).
    pids = torch.tensor([0, 0, 1, 2, 3])
    sim = torch.zeros(5, 5)
    sim[0, 2:] = torch.tensor([2.0, 1.0, 0.0])
    weights = torch.tensor([math.exp(2.0), math.exp(1.0), 1.0])
    p = weights / weights.sum()
    g = torch.Generator().manual_seed(0)
    firsts, pairs_23, runs = torch.zeros(3), 0, 5000
    for _ in range(runs):
        neg_img, neg_txt = sample_hard_negatives(sim, pids, pids, generator=g, count=2)
        assert neg_img.shape == (5, 2) and neg_txt.shape == (5, 2)
        assert (neg_txt[:, 0] != neg_txt[:, 1]).all() and (neg_img[:, 0] != neg_img[:, 1]).all()
        assert (pids[neg_txt] != pids[:, None]).all() and (pids[neg_img] != pids[:, None]).all()
        firsts[int(neg_txt[0, 0]) - 2] += 1
        pairs_23 += set(neg_txt[0].tolist()) == {2, 3}
    assert (firsts / runs).tolist() == pytest.approx(p.tolist(), abs=0.02)  # 3 standard errors
    expected_23 = float(p[0] * p[1] / (1 - p[0]) + p[1] * p[0] / (1 - p[1]))
    assert pairs_23 / runs == pytest.approx(expected_23, abs=0.02)


def test_a_row_with_fewer_candidates_than_asked_cycles_through_them():
    # Text 0 (pid 0) has two candidate images (pids 1 and 2): four draws are both of them, twice, in one order.
    pids = torch.tensor([0, 0, 0, 1, 2])
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    neg_img, _ = sample_hard_negatives(sim, pids, pids, generator=torch.Generator().manual_seed(2), count=4)
    first, second = neg_img[0, :2].tolist()
    assert {first, second} == {3, 4}
    assert neg_img[0].tolist() == [first, second, first, second]
    assert (pids[neg_img[3]] != 1).all() and len(set(neg_img[3].tolist())) == 4
    with pytest.raises(ValueError, match="count must be at least 1, got 0"):
        sample_hard_negatives(sim, pids, pids, count=0)


def test_itm_loss_weighs_each_pair_and_rank_loss_reads_several_negatives():
    # match: positives weigh 1, each of two negatives per anchor 1/2
    logits = torch.zeros(5, 2)
    logits[0] = torch.tensor([0.0, 1.0])
    targets = itm_targets(1, "cpu", negatives=2)
    assert targets.tolist() == [1, 0, 0, 0, 0]
    weights = torch.tensor([1.0, 0.5, 0.5, 0.5, 0.5])
    expected = (math.log(1 + math.exp(-1)) + 0.5 * 4 * math.log(2)) / 3.0
    assert itm_loss(logits, targets, weights).item() == pytest.approx(expected, rel=1e-6)
    assert itm_loss(logits, targets, torch.ones(5)).item() == pytest.approx(itm_loss(logits, targets).item())
    # rank, B = 1, n = 2: positive margin 1; negative images 0 and 3; negative texts 2 and -1
    rank_logits = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [0.0, 2.0], [1.0, 0.0]])

    def softplus(x):
        return math.log1p(math.exp(x))

    expected = 0.5 * ((softplus(-1) + softplus(2)) / 2 + (softplus(1) + softplus(-2)) / 2)
    assert itm_rank_loss(rank_logits, negatives=2).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"expected logits \[5B, 2\], got \(6, 2\)"):
        itm_rank_loss(torch.zeros(6, 2), negatives=2)
