"""Work split across the ranks of an initialised ``torch.distributed`` process group.

Nothing here starts a group: ``torchrun`` (or accelerate's launcher) and the caller's
``init_process_group`` do (the CLI calls :func:`init_from_env`). Without a group every helper is the
single-process identity, so the same code paths run with one process or many. Transport is
torch.distributed collectives only; objects (per-layer results, candidate scores, recorded model
inputs) travel with ``all_gather_object`` / ``broadcast_object_list``, tensors are moved to the CPU first
so a rank unpickles them on its own device.

Determinism: work is split round-robin (item ``i`` on rank ``i % world``) or by cost, results come
back in item order, and every result is computed by one rank exactly as one process computes it, so
every rank ends with what one process would have (bit-identical with the same threads per process).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def active() -> bool:
    """True under an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def init_from_env() -> bool:
    """Join the group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): NCCL with one
    GPU per local rank when CUDA is available, gloo otherwise. Returns whether this call started it
    (then the caller destroys it); False without torchrun or when a group is already running."""
    if (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def device() -> torch.device:
    """Where this rank computes: its GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's ``(index, item)`` pairs, round-robin."""
    return [(i, items[i]) for i in range(rank(), len(items), world_size())]


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, torch.nn.Module):
        return obj.cpu()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (tensors moved to the CPU), in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, _to_cpu(obj))
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [_to_cpu(obj) if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """``t`` reduced over ranks with ``"max"`` or ``"sum"``, returned on ``t``'s device and dtype."""
    if not active():
        return t
    ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    buf = t.to(device()).contiguous()
    dist.all_reduce(buf, ops[op])
    return buf.to(t.device)


def map_round_robin(fn: Callable[[T], R], items: Sequence[T],
                    stop: Callable[[], bool] | None = None) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in item order, each item computed on one rank (round-robin, one
    round of ``world_size`` items at a time, so memory holds one round of results) and its result
    gathered to every rank. ``stop()`` is asked on rank 0 before each round and its answer shared,
    so all ranks stop at the same item (time budgets). One process: a plain lazy map."""
    world, me = world_size(), rank()
    for start in range(0, len(items), world):
        if stop is not None and broadcast_object(stop() if me == 0 else None):
            return
        chunk = items[start:start + world]
        mine = fn(chunk[me]) if me < len(chunk) else None
        for item, result in zip(chunk, gather_objects(mine)):
            yield item, result


def map_balanced(fn: Callable[[T], R], items: Sequence[T], cost: Callable[[T], float]) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in item order for items of uneven cost (layers of different widths):
    items go to ranks largest-cost-first onto the least loaded rank, each rank computes all of its
    items, then every result is broadcast from its rank in item order. Memory holds this rank's
    results until they are sent. One process: a plain lazy map (progress callbacks stay per item)."""
    if not active():
        for item in items:
            yield item, fn(item)
        return
    load = [0.0] * world_size()
    owner = [0] * len(items)
    for i in sorted(range(len(items)), key=lambda i: (-cost(items[i]), i)):
        owner[i] = min(range(len(load)), key=lambda r: (load[r], r))
        load[owner[i]] += cost(items[i])
    me = rank()
    mine = {i: fn(item) for i, item in enumerate(items) if owner[i] == me}
    for i, item in enumerate(items):
        yield item, broadcast_object(mine.pop(i, None), src=owner[i])


class RankFailed(RuntimeError):
    """Rank 0 raised inside a :func:`main_only` function; the other ranks raise this instead of waiting."""


_in_main_only = False  # set on rank 0 while a main_only function runs: nested ones run directly


def main_only(fn: Callable[..., R]) -> Callable[..., R]:
    """Run ``fn`` on rank 0 only (file writes: checkpoints, cards, plots, resumable state); the other
    ranks wait for it and receive its return value. An error on rank 0 is re-raised there and
    reported to the others as :class:`RankFailed`, so no rank is left waiting forever. All ranks must
    make the same calls, except inside another ``main_only`` function (those run on rank 0 only)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _in_main_only
        if not active() or _in_main_only:
            return fn(*args, **kwargs)
        if not is_main():
            status, value = broadcast_object(None)
            if status == "error":
                raise RankFailed(f"{fn.__qualname__} failed on rank 0: {value}")
            return value
        _in_main_only = True
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
        finally:
            _in_main_only = False
        return broadcast_object(("ok", result))[1]
    return wrapper
