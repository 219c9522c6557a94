"""Finding slides on disk and opening them.

OpenSlide reads the whole-slide formats. Plain PNG/JPEG/(strip) TIFF images, which OpenSlide
refuses, are opened with ``openslide.ImageSlide`` so that ROIs can be processed when the user
gives their mpp. Every failure is turned into a ``SlideError`` with a reason and a fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import openslide
from PIL import Image

from wsi_ncmi.errors import SlideError, WsiNcmiError

#: Extensions OpenSlide reads (DICOM is a folder of .dcm files; see ``discover_slides``).
SLIDE_EXTENSIONS = frozenset({
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".qptiff",
})
#: Plain raster images, read whole through PIL; they need an mpp from the user.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
_FALLBACK_TO_IMAGE = IMAGE_EXTENSIONS | {".tif", ".tiff"}

# ROIs can be larger than PIL's decompression-bomb guard; they are the user's own files.
Image.MAX_IMAGE_PIXELS = None


def slide_id_for(path: str | os.PathLike) -> str:
    """Slide id = file name without extension (a DICOM folder: the folder's name).

    This is the convention of CLAM, TRIDENT and the CAMELYON/BRACS label files
    (``patient_004_node_4.tif`` -> ``patient_004_node_4``).
    """
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return p.parent.name
    return p.stem


def discover_slides(inputs: list[str], recursive: bool = True, exclude: list[Path] = ()) -> list[Path]:
    """Expand files and folders into a sorted list of slide paths, one per slide.

    A folder of ``.dcm`` files is one DICOM slide (OpenSlide opens it from any of its files).
    Folders in ``exclude`` (the output folder, whose thumbnails are PNGs) and hidden folders are
    not searched. Two slides with the same id would overwrite each other's features: an error.
    """
    skip = [Path(e).resolve() for e in exclude]
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            walker = p.rglob("*") if recursive else p.glob("*")
            dicom_dirs: set[Path] = set()
            for f in sorted(walker):
                rel = f.relative_to(p).parts
                if not f.is_file() or any(part.startswith(".") for part in rel):
                    continue
                if skip and any(f.resolve().is_relative_to(e) for e in skip):
                    continue
                ext = f.suffix.lower()
                if ext == ".dcm":
                    if f.parent not in dicom_dirs:
                        dicom_dirs.add(f.parent)
                        found.append(f)
                elif ext in SLIDE_EXTENSIONS or ext in IMAGE_EXTENSIONS:
                    found.append(f)
        else:
            raise WsiNcmiError(f"{item}: no such file or folder; pass slide files or folders of slides")
    by_id: dict[str, Path] = {}
    for f in found:
        sid = slide_id_for(f)
        if sid in by_id and by_id[sid] != f:
            raise WsiNcmiError(
                f"{f}: slide id '{sid}' is also the id of {by_id[sid]}; rename one of them "
                "(features are saved as <slide_id>.h5)")
        by_id[sid] = f
    return [by_id[k] for k in sorted(by_id)]


def open_slide(path: str | os.PathLike) -> openslide.AbstractSlide:
    """Open a slide with OpenSlide, or a plain image with ``ImageSlide``; errors name the fix."""
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "unopenable", "file not found")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(path, "empty-file", "file is empty (0 bytes); copy the slide again")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        if path.suffix.lower() in _FALLBACK_TO_IMAGE:
            try:
                img = Image.open(path)
                img.load()
                return openslide.ImageSlide(img)
            except Exception as exc:  # PIL raises many types for bad files
                raise SlideError(path, "unopenable",
                                 f"not a readable slide or image ({type(exc).__name__}: {exc}); "
                                 "check the file is complete and in a format OpenSlide or PIL reads") from None
        raise SlideError(path, "unopenable",
                         "not a slide format OpenSlide can read; check the file is a complete "
                         "slide (.svs, .ndpi, .mrxs, .tiff, DICOM, ...)") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(path, "unopenable",
                         f"OpenSlide cannot open it ({exc}); re-export or re-scan the slide") from None
    except OSError as exc:
        raise SlideError(path, "unopenable", f"cannot read file ({exc})") from None


def level_downsamples(slide: openslide.AbstractSlide) -> list[float]:
    """The float downsample of every level, never truncated to int."""
    return [float(d) for d in slide.level_downsamples]


def slide_bounds(slide: openslide.AbstractSlide) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the scanned area in level-0 px (OpenSlide's bounds where given)."""
    w0, h0 = slide.dimensions
    props = slide.properties
    try:
        x = int(props[openslide.PROPERTY_NAME_BOUNDS_X])
        y = int(props[openslide.PROPERTY_NAME_BOUNDS_Y])
        w = int(props[openslide.PROPERTY_NAME_BOUNDS_WIDTH])
        h = int(props[openslide.PROPERTY_NAME_BOUNDS_HEIGHT])
        return x, y, w, h
    except (KeyError, ValueError):
        return 0, 0, w0, h0


def rgba_to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)):
    """Composite OpenSlide's RGBA output onto the slide background (transparent = not scanned)."""
    import numpy as np

    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        bg = np.asarray(background, dtype=np.uint16)
        rgb = (arr[..., :3].astype(np.uint16) * alpha + bg * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def background_color(slide: openslide.AbstractSlide) -> tuple[int, int, int]:
    """The vendor's background colour (hex in ``openslide.background-color``), else white."""
    hexcol = slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
    if hexcol and len(hexcol) == 6:
        try:
            return tuple(int(hexcol[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
        except ValueError:
            pass
    return (255, 255, 255)
