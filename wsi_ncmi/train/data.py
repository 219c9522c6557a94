"""Bags for training: features from HDF5 files, a zarr cohort cache, or RAM.

``FeatureSource`` finds each slide's bag: in ``<features>/cohort.zarr`` when it exists and is
current (one open array instead of hundreds of files), else in ``<features>/<slide_id>.h5``
(ours or CLAM/TRIDENT). ``BagStore`` keeps the bags in RAM when they fit in ``ram_gb``, so
epochs after the first read nothing from disk. Missing slides and dimension mismatches fail
fast with a message that names the files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.store.h5 import read_feature_file
from wsi_ncmi.store.zarr_cache import CACHE_NAME, ZarrCohort


class FeatureSource:
    def __init__(self, features: str | Path):
        self.root = Path(features)
        self.cohort: ZarrCohort | None = None
        if self.root.suffix == ".zarr" and self.root.is_dir():
            self.cohort = ZarrCohort(self.root)
            self.cohort.check_current()   # the staleness check the folder path has
        elif (self.root / CACHE_NAME).is_dir():
            cohort = ZarrCohort(self.root / CACHE_NAME)
            if cohort.is_current(self.root):
                self.cohort = cohort
            else:
                print(f"note: {self.root / CACHE_NAME} is older than the .h5 files; reading the .h5 files "
                      f"(run `wsi-ncmi pack {self.root}` to refresh it)")
        elif not self.root.is_dir():
            raise WsiNcmiError(f"{self.root}: features folder not found; pass the --out folder of `wsi-ncmi extract`")

    @property
    def kind(self) -> str:
        return "zarr" if self.cohort is not None else "hdf5"

    def has(self, slide_id: str) -> bool:
        if self.cohort is not None:
            return slide_id in self.cohort
        return (self.root / f"{slide_id}.h5").is_file()

    def load(self, slide_id: str) -> np.ndarray:
        if self.cohort is not None:
            return np.asarray(self.cohort[slide_id])
        return read_feature_file(self.root / f"{slide_id}.h5").features

    def where(self, slide_id: str) -> str:
        return f"{self.cohort.path}[{slide_id}]" if self.cohort is not None else str(self.root / f"{slide_id}.h5")


STATS_ROWS = 16384   # rows per float64 chunk of ``BagStore.feature_stats``


class BagStore:
    """Bags by slide id, cached in RAM up to ``ram_gb``; checks one feature dimension."""

    def __init__(self, source: FeatureSource, slide_ids: list[str], ram_gb: float = 16.0):
        self.source = source
        self.ids = list(slide_ids)
        self.budget = ram_gb * 2**30
        self.cache: dict[str, np.ndarray] = {}
        self.used = 0
        self.dim = -1
        self._stats: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}   # feature_stats, per set of slides
        for sid in self.ids:            # the first readable bag sets a provisional dimension (check_all fixes it)
            try:
                first = source.load(sid)
            except (WsiNcmiError, OSError, ValueError):
                continue
            if first.ndim == 2:
                self.dim = first.shape[1]
                self._keep(sid, first)
                break

    def check_all(self, progress: bool = True) -> None:
        """Open every bag once before the first epoch; one error lists every bad file.

        Checked: readable, has ``features``, the same dimension as the others, at least one patch,
        all values finite. Without this a NaN or inf feature surfaced epochs later as a diverged
        loss, with advice to lower the learning rate. Bags that fit ``ram_gb`` stay cached.
        """
        from tqdm.auto import tqdm

        bad: list[tuple[str, str]] = []
        dims: dict[str, int] = {}
        for sid in tqdm(self.ids, desc="checking features", unit="slide", leave=False,
                        disable=None if progress else True):
            try:
                arr = self.cache[sid] if sid in self.cache else self.source.load(sid)
            except WsiNcmiError as exc:
                bad.append((sid, str(exc).split(";")[0]))
                continue
            except (OSError, ValueError) as exc:           # e.g. a truncated file h5py opened
                bad.append((sid, f"{self.source.where(sid)}: unreadable ({exc})"))
                continue
            if arr.ndim != 2 or len(arr) == 0:
                bad.append((sid, f"{self.source.where(sid)}: no patches (shape {arr.shape})"))
                continue
            dims[sid] = arr.shape[1]
            finite = np.isfinite(arr)
            if not finite.all():
                rows = int((~finite.all(1)).sum())
                bad.append((sid, f"{self.source.where(sid)}: {rows} of {len(arr)} patches hold NaN or inf"))
                continue
            if sid not in self.cache and arr.shape[1] == self.dim:
                self._keep(sid, arr)
        if dims:       # the cohort's dimension is the most common one, not whichever file came first
            self.dim = max(set(dims.values()), key=lambda d: (list(dims.values()).count(d), -d))
            bad += [(sid, f"{self.source.where(sid)}: dimension {d}, not the cohort's {self.dim}")
                    for sid, d in dims.items() if d != self.dim]
            for sid in [s for s, d in dims.items() if d != self.dim and s in self.cache]:
                self.used -= self.cache.pop(sid).nbytes
        bad = [msg for sid in self.ids for s, msg in bad if s == sid]   # in cohort order
        if bad:
            shown = "; ".join(bad[:5]) + (f"; ... and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise WsiNcmiError(f"{len(bad)} of {len(self.ids)} feature files are unusable: {shown}. Re-extract "
                               "them (wsi-ncmi extract reruns only the missing ones once they are deleted), or "
                               "drop them from the label file")

    def feature_stats(self, slide_ids: list[str], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per feature dimension over every instance of ``slide_ids`` (float64).

        For ``--feature-norm zscore``: one pass over the training bags, merged bag by bag (Chan et al.
        1979's pairwise update), so a cohort of large bags never needs its instances in memory at once
        and a large mean does not cancel the variance. Cached per set of slides: the seeds of a run
        share one pass.
        """
        from tqdm.auto import tqdm

        key = tuple(sorted(slide_ids))
        cached = self._stats.get(key)
        if cached is not None:
            return cached
        n, mean, m2 = 0, np.zeros(self.dim), np.zeros(self.dim)
        for sid in tqdm(slide_ids, desc="feature statistics", unit="slide", leave=False,
                        disable=None if progress else True):
            bag = self.get(sid)
            for i in range(0, len(bag), STATS_ROWS):     # bounded float64 temporaries for 100k-patch bags
                x = bag[i:i + STATS_ROWS].astype(np.float64)
                nb, mb = len(x), x.mean(0)
                d = mb - mean
                m2 += ((x - mb) ** 2).sum(0) + d * d * n * nb / (n + nb)
                mean += d * nb / (n + nb)
                n += nb
        std = np.sqrt(m2 / max(n, 1))
        # a constant dimension keeps rounding residue (~1e-17) through the merges: call it constant
        std[std <= np.maximum(1e-7 * np.abs(mean), 1e-12)] = 0.0
        out = (mean, std)
        self._stats[key] = out
        return out

    def _keep(self, sid: str, arr: np.ndarray) -> None:
        if self.used + arr.nbytes <= self.budget:
            self.cache[sid] = arr
            self.used += arr.nbytes

    def get(self, sid: str) -> np.ndarray:
        arr = self.cache.get(sid)
        if arr is None:
            arr = self.source.load(sid)
            if arr.ndim != 2 or arr.shape[1] != self.dim:
                raise WsiNcmiError(f"{self.source.where(sid)}: features of dimension {arr.shape[-1]}, but "
                                   f"{self.source.where(self.ids[0])} has {self.dim}; all slides must come from "
                                   "one encoder")
            if len(arr) == 0:
                raise WsiNcmiError(f"{self.source.where(sid)}: empty bag (0 patches); re-extract or drop the slide")
            self._keep(sid, arr)
        return arr


def kept_patches(n, patch_dropout: float = 0.0, max_patches: int = 0):
    """Patches a training step keeps of a bag of ``n`` (int or int array): ceil((1 - patch_dropout) * n),
    at least 1, then at most ``max_patches`` (> 0). The 1e-9 keeps float error from adding a patch
    ((1 - 0.7) * 50 is 15.000000000000002)."""
    keep = n
    if patch_dropout:
        keep = np.maximum(1, np.ceil((1.0 - patch_dropout) * np.asarray(n) - 1e-9)).astype(np.int64)
    if max_patches:
        keep = np.minimum(keep, max_patches)
    return keep


def collate(bags: list[np.ndarray], device, max_patches: int = 0, gen: torch.Generator | None = None,
            patch_dropout: float = 0.0):
    """Pad bags to one (B, N, D) float32 tensor with a (B, N) mask (None when B == 1).

    Training only: ``patch_dropout`` keeps a random ceil((1 - p) * n) of each bag's n patches, and
    ``max_patches`` > 0 then caps the count; the draw uses ``gen``, which is left untouched when
    neither applies (so runs without them reproduce exactly).
    """
    picked = []
    for b in bags:
        keep = int(kept_patches(len(b), patch_dropout, max_patches))
        if keep < len(b):
            idx = torch.randperm(len(b), generator=gen)[:keep].sort().values.numpy()
            b = b[idx]
        picked.append(torch.from_numpy(np.ascontiguousarray(b)))
    if len(picked) == 1:
        return picked[0][None].to(device, dtype=torch.float32, non_blocking=True), None
    n = max(len(b) for b in picked)
    x = torch.zeros(len(picked), n, picked[0].shape[1], dtype=torch.float32)
    mask = torch.zeros(len(picked), n, dtype=torch.bool)
    for i, b in enumerate(picked):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    return x.to(device, non_blocking=True), mask.to(device)
