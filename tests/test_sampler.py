"""P x K identity sampler and the sharded shuffle sampler: batch structure, sharding, epochs, exact resume."""
from collections import Counter, defaultdict

import pytest
from torch.utils.data import DataLoader

from datasets.sampler import IdentitySampler, ShardedShuffleSampler

# 24 identities with 1..9 records each (several below K=4), records of an id not contiguous.
COUNTS = [(i * 5) % 9 + 1 for i in range(24)]
PIDS = [pid for rnd in range(9) for pid, c in enumerate(COUNTS) if rnd < c]
BATCH, K = 16, 4


def batches(sampler, size):
    flat = list(sampler)
    assert len(flat) % size == 0
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def by_pid(indices):
    groups = defaultdict(list)
    for i in indices:
        groups[PIDS[i]].append(i)
    return groups


def test_batches_are_p_by_k():
    sampler = IdentitySampler(PIDS, BATCH, K, seed=0)
    out = batches(sampler, BATCH)
    assert len(out) == sampler.num_batches() > 5
    assert len(sampler) == len(out) * BATCH
    for batch in out:
        groups = by_pid(batch)
        assert len(groups) == BATCH // K  # P distinct identities ...
        assert all(len(g) == K for g in groups.values())  # ... with K records each
        for pid, g in groups.items():
            if COUNTS[pid] >= K:
                assert len(set(g)) == K  # drawn without replacement
            assert all(PIDS[i] == pid for i in g)
        # chunks are contiguous in the batch
        assert [PIDS[i] for i in batch] == [PIDS[batch[j]] for j in range(0, BATCH, K) for _ in range(K)]


def test_epoch_uses_records_without_replacement_and_pads_small_ids():
    sampler = IdentitySampler(PIDS, BATCH, K, seed=1)
    uses = Counter(i for b in batches(sampler, BATCH) for i in b)
    for i, n in uses.items():
        if COUNTS[PIDS[i]] >= K:
            assert n == 1
    small = [pid for pid, c in enumerate(COUNTS) if c < K]
    assert small
    seen_small = {PIDS[i] for i in uses if PIDS[i] in small}
    assert seen_small  # identities with fewer than K records still appear (sampled with replacement)
    for pid in seen_small:
        picked = [i for i in uses if PIDS[i] == pid]
        assert sum(uses[i] for i in picked) % K == 0


def test_two_ranks_are_disjoint_equal_and_interleave_the_global_order():
    full = batches(IdentitySampler(PIDS, BATCH, K, seed=5), BATCH)
    ranks = [IdentitySampler(PIDS, BATCH, K, seed=5, rank=r, world_size=2) for r in range(2)]
    shards = [batches(s, BATCH) for s in ranks]
    assert len(ranks[0]) == len(ranks[1]) == (len(full) // 2) * BATCH
    for g in range(len(full) // 2):  # rank r takes the r-th batch of each group of 2
        assert shards[0][g] == full[2 * g] and shards[1][g] == full[2 * g + 1]
    # disjoint in batches: no record of an identity with >= K records is on both ranks
    on_both = set(map(tuple, shards[0])) & set(map(tuple, shards[1]))
    assert not on_both
    big = {i for b in shards[0] for i in b if COUNTS[PIDS[i]] >= K}
    assert not big & {i for b in shards[1] for i in b}


def test_set_epoch_reshuffles_deterministically():
    a = IdentitySampler(PIDS, BATCH, K, seed=7)
    b = IdentitySampler(PIDS, BATCH, K, seed=7)
    epoch0 = list(a)
    assert list(a) == epoch0 == list(b)  # same seed, same epoch: same order, also when iterated again
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    b.set_epoch(1)
    assert list(b) == epoch1
    a.set_epoch(0)
    assert list(a) == epoch0
    assert list(IdentitySampler(PIDS, BATCH, K, seed=8)) != epoch0


def test_set_start_batch_skips_exactly_n_batches_once():
    for rank in range(2):
        sampler = IdentitySampler(PIDS, BATCH, K, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(4)
        full = list(sampler)
        sampler.set_start_batch(2)
        assert list(sampler) == full[2 * BATCH :]
        assert list(sampler) == full  # only the next iteration skips
        assert len(sampler) == len(full)
        sampler.set_start_batch(sampler.num_batches())
        assert list(sampler) == []


def test_dataloader_batches_match_sampler_chunks():
    sampler = IdentitySampler(PIDS, BATCH, K, seed=2, rank=1, world_size=2)
    loader = DataLoader(list(range(len(PIDS))), batch_size=BATCH, sampler=sampler, drop_last=True)
    got = [b.tolist() for b in loader]
    assert got == batches(sampler, BATCH) and len(loader) == len(got)


def test_neighbour_batches_take_an_anchor_and_its_nearest_identities_with_chunks_left():
    import numpy as np

    # identities on a line: each one's neighbours are the others by distance (ties: lower index first)
    ids = len(COUNTS)
    order = np.array([sorted((j for j in range(ids) if j != i), key=lambda j: (abs(i - j), j)) for i in range(ids)])
    plain = IdentitySampler(PIDS, BATCH, K, seed=3)
    sampler = IdentitySampler(PIDS, BATCH, K, seed=3)
    sampler.set_neighbours(order[:, :5])  # 5 listed: later batches run out and fill at random
    out = batches(sampler, BATCH)
    # the same records per epoch as random batches (the same chunks, only grouped otherwise)
    assert sorted(i for b in out for i in b) == sorted(i for b in batches(plain, BATCH) for i in b)
    first = sorted({PIDS[i] for i in out[0]})
    # the first batch: an anchor and its 3 nearest on the line, i.e. 4 identities spanning at most 3 neighbours
    # on either side (every identity has a chunk left at the start)
    assert len(first) == BATCH // K and max(first) - min(first) <= 3
    spans = [max(p) - min(p) for p in ({PIDS[i] for i in b} for b in out)]
    assert sum(span <= 6 for span in spans) > len(spans) // 2  # mostly near neighbours; random ones span ~15
    random_spans = [max(p) - min(p) for p in ({PIDS[i] for i in b} for b in batches(plain, BATCH))]
    assert sum(span <= 6 for span in random_spans) < len(random_spans) // 2
    sampler.set_neighbours(None)
    assert batches(sampler, BATCH) == batches(plain, BATCH)
    with pytest.raises(ValueError, match="one row per identity"):
        sampler.set_neighbours(order[:3])


def test_neighbour_share_takes_that_share_of_the_others_from_the_nearest():
    import numpy as np

    # each identity's listed neighbours are the 2 identities after it (mod 24): a batch of P = 4 identities that
    # holds an anchor and both hold 3 in a row
    ids = len(COUNTS)
    order = np.array([[(i + d) % ids for d in (1, 2)] for i in range(ids)])

    def three_in_a_row(share, seed):  # per batch of the epoch
        sampler = IdentitySampler(PIDS, BATCH, K, seed=seed, neighbour_share=share)
        sampler.set_neighbours(order)
        return [any((p + 1) % ids in pids and (p + 2) % ids in pids for p in pids)
                for pids in ({PIDS[i] for i in b} for b in batches(sampler, BATCH))]

    assert IdentitySampler(PIDS, BATCH, K, seed=0, neighbour_share=2 / 3).nearest_per_batch == 2
    assert IdentitySampler(PIDS, BATCH, K, seed=0, neighbour_share=0.5).nearest_per_batch == 2  # round(1.5)
    # share 2/3: anchor + its 2 nearest + 1 at random; the epoch's first batch finds both nearest unused
    assert all(three_in_a_row(2 / 3, seed)[0] for seed in range(5))
    # share 0: the anchor and 3 at random (3 in a row in 2 of 35 batches over 5 epochs)
    assert sum(sum(three_in_a_row(0.0, seed)) for seed in range(5)) <= 3
    with pytest.raises(ValueError, match="neighbour_share must be in"):
        IdentitySampler(PIDS, BATCH, K, seed=0, neighbour_share=1.5)


def test_identity_sampler_errors():
    with pytest.raises(ValueError, match="multiple of sampler.num_instances"):
        IdentitySampler(PIDS, 18, 4, seed=0)
    with pytest.raises(ValueError, match="distinct identities"):
        IdentitySampler([0, 0, 1, 1], 12, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        IdentitySampler(PIDS, BATCH, K, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no full group"):
        IdentitySampler([0, 1, 2, 3] * 4, 16, 4, seed=0, world_size=2)


def test_sharded_shuffle_sampler():
    n, bs, w = 103, 5, 2
    shards = [ShardedShuffleSampler(n, bs, seed=0, rank=r, world_size=w) for r in range(w)]
    outs = [list(s) for s in shards]
    assert len(shards[0]) == len(shards[1]) == len(outs[0]) == len(outs[1]) == (n // (bs * w)) * bs == 50
    assert not set(outs[0]) & set(outs[1])
    assert len(set(outs[0] + outs[1])) == 100 and set(outs[0]) <= set(range(n))
    single = list(ShardedShuffleSampler(n, bs, seed=0))
    assert len(single) == 100 and len(set(single)) == 100
    assert outs[0][:bs] == single[:bs] and outs[1][:bs] == single[bs : 2 * bs]  # same global order
    shards[0].set_epoch(1)
    epoch1 = list(shards[0])
    assert epoch1 != outs[0] and list(shards[0]) == epoch1
    shards[0].set_start_batch(3)
    assert list(shards[0]) == epoch1[3 * bs :]
    with pytest.raises(ValueError, match="no full group"):
        ShardedShuffleSampler(9, 5, seed=0, world_size=2)
