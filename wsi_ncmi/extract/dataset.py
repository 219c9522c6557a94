"""Patch reading in DataLoader worker processes, fed by a work queue.

The main process plans slides and puts *tasks* (one batch of patch coordinates of one slide)
on a bounded multiprocessing queue; every worker takes the next task, reads its patches with
its own cached slide handle and yields one uint8 batch. Because workers pull from a shared
queue, all of them stay busy whatever the mix of slide sizes, and the next slide's patches are
already flowing while the last batches of the previous one are encoded: the GPU never waits at
a slide boundary. A worker that fails to read reports the error for that slide instead of a
batch (never a blank patch) and skips that slide's remaining tasks.
"""

from __future__ import annotations

import os
import queue as queue_mod
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset

from wsi_ncmi.slides.open import open_slide
from wsi_ncmi.slides.patches import PatchReader
from wsi_ncmi.slides.rawjpeg import RawJpegReader, load_level

MAX_OPEN_SLIDES = 4


@dataclass
class PatchTask:
    key: int                 # the slide's index in this run
    path: str
    read_level: int
    read_downsample: float
    extent_x: float
    extent_y: float
    patch_size: int
    start: int               # row of the first patch of this batch in the slide's file
    coords: np.ndarray       # (B, 2) level-0 top-left
    reader: str = "openslide"           # or "raw-jpeg"
    raw_page: int = -1                  # TIFF page of the read level (raw-jpeg)
    background: tuple = (255, 255, 255)
    decode_on: str = "worker"           # raw-jpeg only: "worker" (libjpeg-turbo) or "device" (main process)


def grid_tasks(key: int, path: str, grid, batch: int, reader: str = "openslide", raw_page: int = -1,
               background: tuple = (255, 255, 255), decode_on: str = "worker"):
    """One ``PatchTask`` per ``batch`` consecutive patches of a slide's grid."""
    for start in range(0, len(grid), batch):
        yield PatchTask(key, str(path), grid.read_level, grid.read_downsample, grid.extent_x, grid.extent_y,
                        grid.patch_size, start, grid.coords[start:start + batch], reader, raw_page,
                        tuple(background), decode_on if reader == "raw-jpeg" else "worker")


def plan_tasks(key: int, plan, batch: int, decode_on: str = "worker"):
    """``grid_tasks`` for a ``SlidePlan``, with the reader the planner chose for it."""
    return grid_tasks(key, plan.path, plan.grid, batch, plan.reader, plan.raw_page, plan.background, decode_on)


def make_task_loader(workers: int, pin_memory: bool, maxsize: int = 0):
    """(task queue, DataLoader over it): the reader pipeline, one definition for runs and benchmarks.

    Forked workers (the queue is inherited), batches already formed by the workers, and
    ``in_order=False`` so a worker waiting for work never holds back the others' batches. Put one
    ``None`` per worker (at least one) on the queue to end the iteration.
    """
    ctx = mp.get_context("fork")
    tasks = ctx.Queue(maxsize=maxsize)
    loader = DataLoader(PatchTaskDataset(tasks, os.getpid()), batch_size=None, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                        multiprocessing_context=ctx if workers else None, in_order=False)
    return tasks, loader


class PatchTaskDataset(IterableDataset):
    """Yields ``{"key", "start", "images": uint8 (B, P, P, 3)}``, ``{"key", "start", "packed": ...}``
    (compressed tiles for the device, see ``device_cut.pack_batch``) or ``{"key", "start", "error"}``."""

    def __init__(self, tasks, parent_pid: int):
        super().__init__()
        self.tasks = tasks
        self.parent_pid = parent_pid

    def _next_task(self):
        while True:
            try:
                return self.tasks.get(timeout=2.0)
            except queue_mod.Empty:
                if os.getppid() != self.parent_pid and os.getpid() != self.parent_pid:
                    return None  # the main process died (e.g. SIGKILL): stop instead of lingering

    def __iter__(self):
        handles: OrderedDict[str, object] = OrderedDict()
        failed: set[int] = set()
        try:
            while True:
                task = self._next_task()
                if task is None:
                    return
                if task.key in failed:
                    continue
                hkey = (task.path, task.raw_page) if task.reader == "raw-jpeg" else task.path
                try:
                    handle = handles.pop(hkey, None)
                    if handle is None:
                        handle = (RawJpegReader(load_level(task.path, task.raw_page)) if task.reader == "raw-jpeg"
                                  else open_slide(task.path))
                    handles[hkey] = handle
                    while len(handles) > MAX_OPEN_SLIDES:
                        handles.popitem(last=False)[1].close()
                    if task.reader == "raw-jpeg":
                        reader = PatchReader(None, task.read_level, task.read_downsample, task.extent_x,
                                             task.extent_y, task.patch_size, raw=handle, background=task.background)
                        if task.decode_on == "device":
                            from wsi_ncmi.slides.device_cut import pack_batch

                            yield {"key": task.key, "start": task.start, "packed": pack_batch(reader, task.coords)}
                            continue
                    else:
                        reader = PatchReader(handle, task.read_level, task.read_downsample, task.extent_x,
                                             task.extent_y, task.patch_size)
                    batch = reader.read_batch(task.coords)
                except Exception as exc:  # an OpenSlide read error leaves the handle unusable
                    failed.add(task.key)
                    bad = handles.pop(hkey, None)
                    if bad is not None:
                        bad.close()
                    yield {"key": task.key, "start": task.start,
                           "error": f"{type(exc).__name__}: {exc}".strip()}
                    continue
                yield {"key": task.key, "start": task.start, "images": torch.from_numpy(batch)}
        finally:
            for h in handles.values():
                h.close()
