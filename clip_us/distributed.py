"""DDP helpers: join torchrun's process group, gather per-rank values, agree on a finite loss.

Every script works in one process or under `torchrun --nproc_per_node N` (gloo on the CPU, nccl
on CUDA); outside torchrun each helper is the single-process identity.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch.utils.data import Subset


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _destroy_process_group():
    if is_distributed():
        dist.destroy_process_group()


def setup_distributed(device_flag: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a single process otherwise."""
    want_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else device_flag if device_flag != "auto" else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not is_distributed():
        dist.init_process_group("nccl" if want_cuda else "gloo")
        # An orderly teardown when the script ends: left to interpreter shutdown, gloo's threads
        # can outlive their process group and abort the rank ("terminate called without an
        # active exception"), failing a run whose work was done.
        atexit.register(_destroy_process_group)
    if want_cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def gather_list(values: list) -> list:
    """Concatenate a per-rank Python list over all ranks (identity without DDP)."""
    if not is_distributed():
        return list(values)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: one rank's NaN must stop (or skip) all of them,
    or the others would wait in the next all-reduce until the timeout."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if is_distributed():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def barrier():
    if is_distributed():
        dist.barrier()


def shard(dataset, rank: int, world: int):
    """Rank r takes items r, r+world, ...: no padding, so no image is counted twice."""
    return Subset(dataset, list(range(rank, len(dataset), world)))
