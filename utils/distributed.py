"""torch.distributed helpers that are no-ops at world size 1 without a process group.

Launch with ``torchrun`` (or ``start.sh``): the environment variables RANK, LOCAL_RANK and WORLD_SIZE select
distributed mode; NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 30) -> torch.device:
    """Join the process group described by torchrun's environment, if any, and pick this rank's device.

    A collective that waits longer than ``timeout_minutes`` (a dead or stalled rank) ends the job.
    """
    use_cuda = torch.cuda.is_available() and device_preference in ("auto", "cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not is_distributed():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a copy); the tensor itself at world size 1."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_in_order(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate per-rank shards (rank r holds ``counts[r]`` rows, contiguous in the global order).

    Shards may differ in length by design (no sampler padding), so every rank pads to the longest shard for
    the collective and the padding is cut away afterwards.
    """
    if not is_distributed():
        return local
    longest = max(counts)
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(get_world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n] for piece, n in zip(pieces, counts)], dim=0)


def shard_range(total: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Contiguous [start, end) slice of ``total`` items for ``rank``; sizes differ by at most one."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_counts(total: int, world_size: int | None = None) -> list[int]:
    world_size = get_world_size() if world_size is None else world_size
    return [end - start for start, end in (shard_range(total, r, world_size) for r in range(world_size))]
