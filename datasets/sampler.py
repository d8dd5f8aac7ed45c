"""Epoch-seeded, DDP-sharded index samplers: P x K identity batches (fine-tuning) and plain shuffling (pretraining).

Both derive the epoch's order from ``seed`` and the epoch alone, so every rank computes the same global order
without communication and takes its own disjoint, equally long share of whole batches. ``set_start_batch(n)``
makes the next iteration skip this rank's first n batches, which together with per-item seeding in
TrainDataset makes a mid-epoch resume reproduce the interrupted run exactly.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sampler: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class _EpochBatches(Sampler[int]):
    """Shared epoch/resume bookkeeping; subclasses list this rank's batches for an epoch."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int):
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"sampler: batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start_batch(self, n: int) -> None:
        """Skip this rank's first ``n`` batches in the next iteration only (resume inside an epoch)."""
        if n < 0:
            raise ValueError(f"sampler: start batch must be >= 0, got {n}")
        self.start_batch = n

    def num_batches(self) -> int:
        """Batches this rank yields in a full pass of the current epoch."""
        raise NotImplementedError

    def _rank_batches(self, start: int) -> Iterator[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Indices of this rank for the whole epoch (``set_start_batch`` does not change it)."""
        return self.num_batches() * self.batch_size

    def __iter__(self) -> Iterator[int]:
        start, self.start_batch = self.start_batch, 0
        for batch in self._rank_batches(start):
            yield from batch


class IdentitySampler(_EpochBatches):
    """P x K batches: ``batch_size // num_instances`` identities with ``num_instances`` records each.

    Per epoch each identity's records are shuffled (identities with fewer than K are drawn with replacement
    up to K), cut into chunks of K (a remainder below K is dropped), and batches take P chunks of distinct
    identities until fewer than P identities have chunks left: P at random, or, after ``set_neighbours``, one
    identity at random and the nearest to it that still have chunks (a batch of look-alikes, whose negatives are
    as hard as the top of a ranking: the graph sampling of Liao & Shao, CVPR 2022) for ``neighbour_share`` of the
    other P - 1, rounded, the rest at random. Consecutive batches are grouped by ``world_size``; rank r takes the
    r-th batch of each full group, so the global step sees P x K x world_size records and every rank has the same
    number of batches.
    """

    def __init__(
        self,
        pids: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        neighbour_share: float = 1.0,
    ):
        super().__init__(batch_size, seed, rank, world_size)
        if not 0.0 <= neighbour_share <= 1.0:
            raise ValueError(f"IdentitySampler: sampler.neighbour_share must be in [0, 1], got {neighbour_share}")
        if num_instances < 1 or batch_size % num_instances != 0:
            raise ValueError(
                f"IdentitySampler: train.batch_size_per_gpu ({batch_size}) must be a positive multiple of "
                f"sampler.num_instances ({num_instances})"
            )
        self.num_instances = num_instances
        self.pids_per_batch = batch_size // num_instances
        # after set_neighbours: how many of a batch's other P - 1 identities are the anchor's nearest
        self.nearest_per_batch = round(neighbour_share * (self.pids_per_batch - 1))
        groups: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            groups[int(pid)].append(index)
        self.identity_pids = sorted(groups)  # identity i of ``set_neighbours`` is the i-th smallest pid
        self._groups = [groups[pid] for pid in self.identity_pids]
        if len(self._groups) < self.pids_per_batch:
            raise ValueError(
                f"IdentitySampler: a batch needs {self.pids_per_batch} distinct identities "
                f"(batch {batch_size} / K {num_instances}) but the data has only {len(self._groups)}"
            )
        self._neighbours: np.ndarray | None = None
        self._cache: tuple[int, list[list[int]]] | None = None
        if self.num_batches() == 0:
            raise ValueError(
                f"IdentitySampler: {len(pids)} records give no full group of {world_size} batch(es) "
                f"of {batch_size}; lower train.batch_size_per_gpu or the number of processes"
            )

    @property
    def neighbours(self) -> np.ndarray | None:
        return self._neighbours

    def set_neighbours(self, neighbours: np.ndarray | None) -> None:
        """neighbours [num identities, M] int: each identity's others, nearest first (see ``identity_pids``);
        None: random batches. Takes effect from the next epoch's batches (the current epoch's are kept)."""
        if neighbours is not None:
            neighbours = np.asarray(neighbours)
            if neighbours.ndim != 2 or neighbours.shape[0] != len(self._groups):
                raise ValueError(f"IdentitySampler: neighbours must have one row per identity "
                                 f"({len(self._groups)}), got shape {list(neighbours.shape)}")
        self._neighbours = neighbours
        self._cache = None

    def _draw(self, rng: random.Random, available: list[int], chunks: list[list[list[int]]]) -> list[int]:
        """The identities of the next batch (P distinct ones, each with a chunk left)."""
        if self._neighbours is None:
            return [available[j] for j in rng.sample(range(len(available)), self.pids_per_batch)]
        anchor = available[rng.randrange(len(available))]
        chosen = [anchor]
        for other in self._neighbours[anchor].tolist():
            if len(chosen) == 1 + self.nearest_per_batch:
                break
            if chunks[other] and other not in chosen:
                chosen.append(other)
        if len(chosen) < self.pids_per_batch:  # the rest at random (and where the listed neighbours ran out)
            taken = set(chosen)
            chosen += rng.sample([i for i in available if i not in taken], self.pids_per_batch - len(chosen))
        return chosen

    def _global_batches(self) -> list[list[int]]:
        """All batches of the epoch (before sharding), cached for the current epoch."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        k = self.num_instances
        chunks: list[list[list[int]]] = []
        for indices in self._groups:
            if len(indices) < k:
                pool = [rng.choice(indices) for _ in range(k)]
            else:
                pool = list(indices)
                rng.shuffle(pool)
            chunks.append([pool[i : i + k] for i in range(0, len(pool) - len(pool) % k, k)])
        available = list(range(len(chunks)))
        slot = {identity: j for j, identity in enumerate(available)}
        batches = []
        while len(available) >= self.pids_per_batch:
            picked = self._draw(rng, available, chunks)
            batches.append([index for identity in picked for index in chunks[identity].pop()])
            # Swap-remove exhausted identities, highest slot first, so lower slots keep their meaning.
            for j in sorted((slot[i] for i in picked if not chunks[i]), reverse=True):
                moved = available[-1]
                available[j] = moved
                slot[moved] = j
                available.pop()
        self._cache = (self.epoch, batches)
        return batches

    def num_batches(self) -> int:
        return len(self._global_batches()) // self.world_size

    def _rank_batches(self, start: int) -> Iterator[list[int]]:
        batches = self._global_batches()
        for group in range(start, self.num_batches()):
            yield batches[group * self.world_size + self.rank]


class ShardedShuffleSampler(_EpochBatches):
    """A permutation of 0..n-1 per epoch, cut into batches; rank r takes the r-th batch of each group of
    ``world_size`` consecutive batches (an incomplete final group is dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        self.n = n
        if self.num_batches() == 0:
            raise ValueError(
                f"ShardedShuffleSampler: {n} records give no full group of {world_size} batch(es) of {batch_size}"
            )

    def num_batches(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def _rank_batches(self, start: int) -> Iterator[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        order = rng.permutation(self.n)
        b, w = self.batch_size, self.world_size
        for group in range(start, self.num_batches()):
            first = (group * w + self.rank) * b
            yield order[first : first + b].tolist()
