"""Is this slide file the one a feature file was extracted from?

Why: heatmaps find features by slide id, which is the file name; another slide under the same name
(another scanner export, another cohort) would get the first one's attention drawn over its tissue.
Extraction records the slide's size in bytes and level-0 dimensions; a file that differs in either
is refused. The mtime is not compared: copying a slide changes it, not the pixels.
"""

from __future__ import annotations

from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError


def check_slide_matches(path: Path, attrs: dict, h5: Path, dimensions: tuple[int, int] | None = None) -> None:
    """Raise when ``path`` (its byte size, and ``dimensions`` when given) differs from the record."""
    recorded = attrs.get("slide_path", "?")
    want = attrs.get("slide_size_bytes")
    have = Path(path).stat().st_size
    if want not in (None, "") and int(want) != have:
        raise WsiNcmiError(f"{path}: not the slide the features in {h5} came from ({have:,} bytes; {recorded} had "
                           f"{int(want):,}); pass that slide file, or the slide id to use the recorded path")
    w, h = attrs.get("level0_width"), attrs.get("level0_height")
    if dimensions is not None and w not in (None, "") and h not in (None, "") and tuple(dimensions) != (int(w), int(h)):
        raise WsiNcmiError(f"{path}: not the slide the features in {h5} came from ({dimensions[0]}x{dimensions[1]} px; "
                           f"{recorded} was {int(w)}x{int(h)}); pass that slide file, or the slide id")
