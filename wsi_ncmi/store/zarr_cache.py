"""Zarr cohort cache: every slide's features in one array, so an epoch does not reopen 500 files.

``wsi-ncmi pack features/ [features/cohort.zarr]`` concatenates the ``features`` of every HDF5 file
into one (total_N, D) float16 array chunked in row blocks, with ``offsets`` (S + 1,) so a slide's
bag is one contiguous slice, plus ``coords``. Slide ids, the dimension and each source file's
size/mtime are stored as attributes; training uses the cache automatically when it is present
and still matches the HDF5 files it was made from, and refuses a cache passed directly that no
longer matches them.

``pack`` never deletes what it did not make: it writes only to a new path ending in ``.zarr`` or
replaces an earlier cache of its own, and it stores float32 when float16 would turn large values
into inf (float64 features above 65504, e.g.).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.store.h5 import read_feature_file

CACHE_NAME = "cohort.zarr"
ROWS_PER_CHUNK = 1024   # 2 MiB of 1024-d float16: a bag over-reads at most one partial chunk per end


def _h5_files(features_dir: Path) -> list[Path]:
    return sorted(p for p in features_dir.glob("*.h5") if p.is_file())


def is_cohort_cache(path: Path) -> bool:
    """True for a folder written by ``pack`` (the only kind of folder ``pack`` will replace)."""
    try:
        g = zarr.open_group(str(path), mode="r")
        return "slide_ids" in g.attrs and "offsets" in g
    except Exception:  # not a zarr group at all
        return False


def _check_target(features_dir: Path, out: Path) -> None:
    if out.suffix != ".zarr":
        raise WsiNcmiError(f"{out}: the cache is a folder ending in .zarr; pass e.g. {features_dir / CACHE_NAME}")
    if out.exists() and not out.is_dir():
        raise WsiNcmiError(f"{out}: a file; pass a new path ending in .zarr (nothing was changed)")
    if out.is_dir() and any(out.iterdir()) and not is_cohort_cache(out):
        raise WsiNcmiError(f"{out}: not empty and not a cache made by `wsi-ncmi pack`; pass a new path ending in "
                           ".zarr (nothing was changed)")


class _NeedsFloat32(Exception):
    pass


def pack_features(features_dir: str | Path, out: str | Path | None = None, progress: bool = True) -> Path:
    features_dir = Path(features_dir)
    files = _h5_files(features_dir)
    if not files:
        raise WsiNcmiError(f"{features_dir}: no .h5 feature files to pack; run `wsi-ncmi extract` first")
    out = Path(out) if out else features_dir / CACHE_NAME
    _check_target(features_dir, out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            _pack(files, features_dir, tmp, "float16", progress)
        except _NeedsFloat32 as big:
            print(f"note: {big} exceeds the float16 range (65504); the cache stores float32")
            shutil.rmtree(tmp, ignore_errors=True)
            _pack(files, features_dir, tmp, "float32", progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)   # an earlier cache of ours (checked above)
    tmp.rename(out)
    return out


def _pack(files: list[Path], features_dir: Path, tmp: Path, dtype: str, progress: bool) -> None:
    sizes, dim = [], None
    for f in files:
        ff = read_feature_file(f, features=False)
        if dim is None:
            dim = ff.features.shape[1]
        elif ff.features.shape[1] != dim:
            raise WsiNcmiError(f"{f}: feature dimension {ff.features.shape[1]} differs from {files[0]} ({dim}); "
                               "a cache holds one encoder's features")
        sizes.append(ff.features.shape[0])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    g = zarr.open_group(str(tmp), mode="w")
    # uncompressed: embeddings do not compress, and decoding cost more than it saved (measured)
    feats = g.create_array("features", shape=(int(offsets[-1]), dim), dtype=dtype,
                           chunks=(ROWS_PER_CHUNK, dim), compressors=None)
    coords = g.create_array("coords", shape=(int(offsets[-1]), 2), dtype="int64", chunks=(ROWS_PER_CHUNK * 8, 2),
                            compressors=None)
    g.create_array("offsets", data=offsets)
    for i, f in enumerate(tqdm(files, desc="pack", unit="slide", disable=None if progress else True)):
        ff = read_feature_file(f)
        x = ff.features
        if x.size and not np.isfinite(x).all():
            raise WsiNcmiError(f"{f}: features contain NaN or inf; re-extract this slide, or move the file out of "
                               f"{features_dir} (nothing was packed)")
        if dtype == "float16" and x.size and float(np.abs(x).max()) > float(np.finfo(np.float16).max):
            raise _NeedsFloat32(f"{f} (max |x| {float(np.abs(x).max()):.4g})")
        feats[offsets[i]:offsets[i + 1]] = x.astype(dtype)
        if len(ff.coords):
            coords[offsets[i]:offsets[i + 1]] = ff.coords
    g.attrs.update({"slide_ids": [f.stem for f in files], "dim": int(dim), "format": "wsi-ncmi-cohort",
                    "source_dir": str(features_dir.resolve()),
                    "sources": {f.stem: [f.stat().st_size, f.stat().st_mtime] for f in files}})


class ZarrCohort:
    """Read bags from a packed cache: ``cohort[slide_id] -> (N, D) float16``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_cohort_cache(self.path):
            raise WsiNcmiError(f"{self.path}: not a cohort cache made by `wsi-ncmi pack`; pass the features folder")
        g = zarr.open_group(str(self.path), mode="r")
        self._features = g["features"]
        self._offsets = g["offsets"][:]
        self.slide_ids = list(g.attrs["slide_ids"])
        self.source_dir = Path(g.attrs.get("source_dir") or self.path.parent)
        self.index = {s: i for i, s in enumerate(self.slide_ids)}
        self.dim = int(g.attrs["dim"])
        self.sources = dict(g.attrs.get("sources", {}))

    def length(self, slide_id: str) -> int:
        i = self.index[slide_id]
        return int(self._offsets[i + 1] - self._offsets[i])

    def check_current(self) -> None:
        """For a cache passed directly: refuse it when the .h5 files it was packed from changed (a
        cache moved away from them, e.g. onto a compute node, is used as it is)."""
        if _h5_files(self.source_dir) and not self.is_current(self.source_dir):
            raise WsiNcmiError(f"{self.path}: older than the .h5 files in {self.source_dir} it was packed from; "
                               f"run `wsi-ncmi pack {self.source_dir} {self.path}` to refresh it, or pass "
                               f"--features {self.source_dir}")

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self.index

    def __getitem__(self, slide_id: str) -> np.ndarray:
        i = self.index[slide_id]
        return self._features[int(self._offsets[i]):int(self._offsets[i + 1])]

    def is_current(self, features_dir: Path) -> bool:
        """True when every HDF5 file it was packed from is unchanged and no new one was added."""
        files = {f.stem: f for f in _h5_files(features_dir)}
        if set(files) != set(self.sources):
            return False
        return all([files[s].stat().st_size, files[s].stat().st_mtime] == list(v) for s, v in self.sources.items())
