"""Slides: open any OpenSlide format (or a plain image ROI), resolve its mpp, find tissue,
lay out an exact-physical-size patch grid and read patches from it."""

from wsi_ncmi.slides.grid import PatchGrid, plan_grid
from wsi_ncmi.slides.mpp import Mpp, load_mpp_csv, resolve_mpp
from wsi_ncmi.slides.open import discover_slides, open_slide, slide_id_for
from wsi_ncmi.slides.patches import PatchReader
from wsi_ncmi.slides.tissue import TissueMask, TissueParams, detect_tissue

__all__ = [
    "Mpp", "PatchGrid", "PatchReader", "TissueMask", "TissueParams", "detect_tissue",
    "discover_slides", "load_mpp_csv", "open_slide", "plan_grid", "resolve_mpp", "slide_id_for",
]
