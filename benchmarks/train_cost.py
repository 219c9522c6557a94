"""Training cost: epoch time and peak memory of gated ABMIL, CE vs NCMI, HDF5 vs zarr vs RAM.

    python benchmarks/train_cost.py                                  # the issue's size: 500 bags x 10k x 1024
    python benchmarks/train_cost.py --slides 100 --patches 2000      # what fits a small CPU machine

Writes random float16 bags as real HDF5 files (and packs them into a zarr cache), then times one
training epoch (train step, plus NCMI's centroid step) and one full epoch (training + the eval
passes that select the model) for each loss and each feature source: NCMI with its class means
from the training pass (``--ncmi-means running``, the default) and with the exact eval pass over
the training set (``exact``). Target: NCMI <= 1.1x CE.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.store.h5 import FeatureWriter
from wsi_ncmi.store.zarr_cache import pack_features
from wsi_ncmi.tasks import load_task
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.data import BagStore, FeatureSource
from wsi_ncmi.train.trainer import Trainer


def make_bags(root: Path, n: int, patches: int, dim: int) -> Path:
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        for i in range(n):
            sid = f"s{i:04d}"
            w.writerow([sid, i % 4, "train" if i % 10 < 8 else "val" if i % 10 == 8 else "test"])
            if (feats / f"{sid}.h5").exists():
                continue
            k = int(patches * rng.uniform(0.8, 1.2))
            fw = FeatureWriter(feats / f"{sid}.h5", feats / ".partial", np.zeros((k, 2), int), dim, "float16")
            fw.write(0, rng.standard_normal((k, dim), dtype=np.float32))
            fw.commit()
    return root


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_epoch(cfg: TrainConfig, task, store: BagStore) -> tuple[float, float, float]:
    tr = Trainer(cfg, task, store, 0, Path(cfg.out))
    if tr.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.train_epoch(0)
    t_train = time.perf_counter() - t0
    with contextlib.redirect_stdout(io.StringIO()):
        tr.evaluate_epoch()
    t_full = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if tr.device.type == "cuda" else rss_gb()
    return t_train, t_full, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=500)
    ap.add_argument("--patches", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="wsi-ncmi-train-cost-"))
    t0 = time.perf_counter()
    make_bags(root, args.slides, args.patches, args.dim)
    if not (root / "features" / "cohort.zarr").exists():
        pack_features(root / "features", progress=False)
    print(f"bags ready in {root} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    for source in ("hdf5", "zarr", "ram"):
        for loss in ("ce", "ncmi", "ncmi exact"):     # ncmi: class means from the training pass (default)
            base = TrainConfig(task="csv", labels=str(root / "labels.csv"), features=str(root / "features"),
                               out=str(root / "run" / f"{source}_{loss.replace(' ', '_')}"), model="abmil",
                               loss=loss.split()[0], ncmi_means=loss.split()[-1] if " " in loss else "running",
                               epochs=1, progress=False, device=args.device)
            with contextlib.redirect_stdout(io.StringIO()):
                task = load_task("csv", base.labels)
                src = FeatureSource(base.features)
            if source == "hdf5":
                src.cohort = None
            ids = [s.slide_id for s in task.slides]
            store = BagStore(src, ids, ram_gb=0 if source != "ram" else 1e9)
            if source == "ram":
                for sid in ids:
                    store.get(sid)   # warm: the first epoch's reading is not a RAM epoch
            tt, tf, peak = time_epoch(base, task, store)
            rows.append((source, loss, tt, tf, peak))
            print(f"  {source:5s} {loss:10s} train epoch {tt:7.2f} s   full epoch {tf:7.2f} s   peak {peak:.2f} GB", flush=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else f"CPU ({os.cpu_count()} cores)"
    print(f"\nABMIL, {args.slides} bags x ~{args.patches} x {args.dim} (80% train), {dev}")
    print("| source | loss | train epoch (s) | train + eval epoch (s) | peak memory (GB) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} |")
    by = {(r[0], r[1]): r for r in rows}
    for src in ("hdf5", "zarr", "ram"):
        for v in ("ncmi", "ncmi exact"):
            print(f"| {src} | {v} / ce | {by[(src, v)][2] / by[(src, 'ce')][2]:.2f}x | "
                  f"{by[(src, v)][3] / by[(src, 'ce')][3]:.2f}x | (target <= 1.1x) |")


if __name__ == "__main__":
    main()
