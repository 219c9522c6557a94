"""torchrun integration: who am I, share the work, gather the results. No scheduler of our own.

Under ``torchrun`` (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK and MASTER_ADDR /
MASTER_PORT), ``world()`` reports this process's place and ``start()`` joins the process group.
The group uses gloo: it carries only small Python objects (per-slide results, per-seed metrics),
works on CPU-only machines and beside CUDA, and needs no GPU-to-GPU fabric. The timeout is long
because ranks wait at the final gather for the slowest share; a rank that dies is seen by
torchrun, which stops the others, and a rerun resumes from what was written.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

GATHER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's deterministic, disjoint share: items rank, rank + size, ..."""
        return items[self.rank::self.size]

    def device(self, requested: str) -> str:
        """``auto`` becomes this rank's own GPU (cuda:LOCAL_RANK) when there are GPUs."""
        if requested == "auto" and self.distributed and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested


def world() -> World:
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")),
                 int(env.get("LOCAL_WORLD_SIZE", str(size))))


def start(w: World) -> None:
    """Join the process group (once) when launched with more than one rank.

    ``torch._dynamo`` is imported first on purpose. The first optimizer a process builds imports it,
    and an import that happens while a group exists keeps a reference to that group: after
    ``destroy_process_group`` its gloo threads then live on into interpreter shutdown, where they
    abort the process now and then ("terminate called without an active exception": 3 of 45 runs
    here). Imported before the group exists, it holds nothing and ``finish`` ends it cleanly.
    """
    if w.distributed and not torch.distributed.is_initialized():
        importlib.import_module("torch._dynamo")   # before the group exists: see the docstring
        torch.distributed.init_process_group("gloo", rank=w.rank, world_size=w.size, timeout=GATHER_TIMEOUT)


def gather(w: World, obj) -> list:
    """Every rank's ``obj``, in rank order (on every rank); ``[obj]`` when not distributed."""
    if not w.distributed:
        return [obj]
    start(w)
    out: list = [None] * w.size
    torch.distributed.all_gather_object(out, obj)
    return out


def finish(w: World) -> None:
    if w.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
