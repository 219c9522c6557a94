"""HDF5 feature files: ``features`` (N, D) and ``coords`` (N, 2), one file per slide.

Names and shapes follow CLAM and TRIDENT so their tools read our files and we read theirs.
``coords`` is the level-0 top-left pixel of each patch; ``coords.attrs`` carries both CLAM's
(``patch_level``=0, ``patch_size`` in level-0 px) and TRIDENT's (``patch_size_level0``) keys.
Everything needed to reproduce the file is in the root attributes (see ``FeatureWriter``).

Files are written to ``<out>/.partial/`` and renamed into place only when every row is
written and flushed, so a crash never leaves a truncated ``.h5`` that looks finished.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from wsi_ncmi.errors import WsiNcmiError

FORMAT = "wsi-ncmi-features"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB row blocks: whole chunks per batch write, cheap partial reads


PARTIAL_SUFFIX = ".h5part"


def partial_name(partial_dir: str | Path, slide_id: str, host: str | None = None, pid: int | None = None) -> Path:
    """``<slide_id>__<host>__<pid>.h5part``: the owner can be told from the name after a crash."""
    host = host or socket.gethostname()
    return Path(partial_dir) / f"{slide_id}__{host}__{pid or os.getpid()}{PARTIAL_SUFFIX}"


def parse_partial_name(path: Path) -> tuple[str, str, int] | None:
    if not path.name.endswith(PARTIAL_SUFFIX):
        return None
    parts = path.name[: -len(PARTIAL_SUFFIX)].rsplit("__", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _attr_value(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    if v is None:
        return ""
    return v


class FeatureWriter:
    """Fills one slide's feature file batch by batch, in any order of row blocks."""

    def __init__(self, final_path: str | Path, partial_dir: str | Path, coords: np.ndarray, dim: int,
                 dtype: str = "float16", attrs: dict | None = None, coords_attrs: dict | None = None,
                 extra: dict[str, np.ndarray] | None = None):
        self.final_path = Path(final_path)
        Path(partial_dir).mkdir(parents=True, exist_ok=True)
        self.partial_path = partial_name(partial_dir, self.final_path.stem)
        self.n = len(coords)
        self.dtype = np.dtype(dtype)
        self.filled = 0
        rows = int(min(max(1, self.n), max(64, CHUNK_BYTES // max(1, dim * self.dtype.itemsize))))
        self._f = h5py.File(self.partial_path, "w")
        self._feat = self._f.create_dataset("features", shape=(self.n, dim), dtype=self.dtype, chunks=(rows, dim))
        c = self._f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in (coords_attrs or {}).items():
            c.attrs[k] = _attr_value(v)
        for name, arr in (extra or {}).items():
            self._f.create_dataset(name, data=arr)
        for k, v in (attrs or {}).items():
            self._f.attrs[k] = _attr_value(v)
        self._f.attrs["format"] = FORMAT
        self._f.attrs["format_version"] = FORMAT_VERSION
        self._f.attrs["feature_dtype"] = str(self.dtype)

    @property
    def complete(self) -> bool:
        return self.filled >= self.n

    def write(self, start: int, feats: np.ndarray) -> None:
        if self.dtype == np.float16 and feats.size and float(np.abs(feats).max()) > float(np.finfo(np.float16).max):
            raise OverflowError("features exceed the float16 range; rerun with --feature-dtype float32")
        if not np.isfinite(feats).all():
            raise FloatingPointError("the encoder produced NaN/inf features; try --precision fp32")
        self._feat[start:start + len(feats)] = feats.astype(self.dtype, copy=False)
        self.filled += len(feats)

    def commit(self) -> Path:
        """Flush, fsync and atomically rename into place."""
        self._f.attrs["num_patches"] = self.n
        self._f.flush()
        self._f.close()
        with open(self.partial_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.partial_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:
            pass
        self.partial_path.unlink(missing_ok=True)


@dataclass
class FeatureFile:
    features: np.ndarray   # (N, D)
    coords: np.ndarray     # (N, 2) level-0 px; empty (0, 2) if the file has none
    attrs: dict


def read_attrs(path: str | Path) -> dict:
    """Root attributes (JSON strings decoded) of a feature file."""
    with h5py.File(path, "r") as f:
        return _decode_attrs(f.attrs)


def _decode_attrs(attrs) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        if isinstance(v, str) and v[:1] in "[{":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def read_feature_file(path: str | Path, features: bool = True) -> FeatureFile:
    """Read our files and plain CLAM/TRIDENT ones (``features`` + ``coords``, few attributes).

    Accepts ``features`` stored as (N, D) or (1, N, D). Errors name the file and what is wrong.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise WsiNcmiError(f"{path}: not a readable HDF5 file ({exc}); re-run extraction for this slide") from None
    with f:
        if "features" not in f:
            raise WsiNcmiError(f"{path}: no 'features' dataset (found: {', '.join(f.keys()) or 'nothing'}); "
                               "expected a CLAM/TRIDENT/wsi-ncmi feature file")
        ds = f["features"]
        shape = ds.shape
        if len(shape) == 3 and shape[0] == 1:
            feats = ds[0] if features else np.empty((shape[1], shape[2]), ds.dtype)
        elif len(shape) == 2:
            feats = ds[()] if features else np.empty(shape, ds.dtype)
        else:
            raise WsiNcmiError(f"{path}: 'features' has shape {shape}; expected (N, D) patch features")
        coords = np.zeros((0, 2), np.int64)
        if "coords" in f:
            coords = f["coords"][()]
            if coords.ndim == 3 and coords.shape[0] == 1:
                coords = coords[0]
            if len(coords) != feats.shape[0]:
                raise WsiNcmiError(f"{path}: {len(coords)} coords for {feats.shape[0]} feature rows; "
                                   "the file is inconsistent, re-extract it")
        attrs = _decode_attrs(f.attrs)
    return FeatureFile(features=feats, coords=coords, attrs=attrs)
