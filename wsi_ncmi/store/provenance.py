"""Which extraction made a folder of features: the settings a trained run's inputs came from.

Why: a model trained on features of one encoder, resolution and tissue filter scores garbage on
features of another, silently. Training records the provenance of its features in
``<run>/features.json`` (``write_run_provenance``); ``predict`` extracts new slides with exactly
those settings and refuses feature files whose recorded settings differ (``difference``).

The provenance is read from the HDF5 root attributes that ``extract`` writes: the settings
fingerprint (encoder, mpp, patch size, tissue parameters, weights file name), the weights id
(``file:<name> sha256:<digest>``, or the hub name) and the stored feature dtype. CLAM/TRIDENT files
carry none of these; their provenance is ``None`` and nothing can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.store.h5 import read_attrs

FILE_NAME = "features.json"
#: fingerprint keys added after files were written without them, with the value those files had
FINGERPRINT_DEFAULTS = {"remove_pen": False, "tissue_source": "detection", "encoder_input": "model"}
#: fingerprint keys that belong to one slide, not to the run's settings (a mask drawn for one slide)
PER_SLIDE_KEYS = ("tissue_source",)


def _fingerprint(attrs: dict) -> dict | None:
    """The run-wide extraction settings of a file: its fingerprint with the defaults of keys added
    later (files from before them had those values) and without the per-slide keys."""
    fp = attrs.get("settings_fingerprint")
    if not fp:
        return None
    fp = {**FINGERPRINT_DEFAULTS, **(fp if isinstance(fp, dict) else json.loads(fp))}
    return {k: v for k, v in fp.items() if k not in PER_SLIDE_KEYS}


def file_provenance(h5: str | Path) -> dict | None:
    """The extraction settings recorded in one feature file, or None for a file without them."""
    attrs = read_attrs(h5)
    fp = _fingerprint(attrs)
    if fp is None:
        return None
    return {"settings": fp, "weights_id": attrs.get("weights") or None, "encoder_dim": attrs.get("encoder_dim"),
            "feature_dtype": attrs.get("feature_dtype"), "precision": attrs.get("precision"), "source": str(h5)}


def folder_provenance(features: str | Path, slide_ids: list[str] | None = None) -> dict | None:
    """Provenance of a features folder (or a zarr cache, through the folder it was packed from).

    Reads the attributes of every listed slide's file (attributes only: cheap); when the files
    disagree the first one is kept and the others are listed under ``mixed``.
    """
    root = Path(features)
    if root.suffix == ".zarr":
        from wsi_ncmi.store.zarr_cache import ZarrCohort

        root = ZarrCohort(root).source_dir
    files = [root / f"{s}.h5" for s in slide_ids] if slide_ids is not None else sorted(root.glob("*.h5"))
    first, mixed = None, []
    for f in files:
        if not f.is_file():
            continue
        try:
            p = file_provenance(f)
        except OSError:
            continue
        if p is None:
            continue
        if first is None:
            first = p
        elif (p["settings"], p["weights_id"]) != (first["settings"], first["weights_id"]):
            mixed.append(f.stem)
    if first is not None and mixed:
        first["mixed"] = mixed
    return first


def write_run_provenance(run: Path, features: str | Path, slide_ids: list[str]) -> dict | None:
    """Record the provenance of a run's features in ``<run>/features.json`` (at training)."""
    prov = folder_provenance(features, slide_ids)
    doc = {"format": "wsi-ncmi-features-provenance", "version": 1, "features": str(features), "provenance": prov}
    (Path(run) / FILE_NAME).write_text(json.dumps(doc, indent=2))
    return prov


def read_run_provenance(run: Path, features: str | Path | None) -> dict | None:
    """The run's recorded provenance; runs from before it was recorded: read their features folder."""
    f = Path(run) / FILE_NAME
    if f.is_file():
        try:
            return json.loads(f.read_text())["provenance"]
        except (ValueError, KeyError, TypeError):
            raise WsiNcmiError(f"{f}: damaged; delete it (it is read again from the run's features folder)") from None
    if features and Path(features).exists():
        return folder_provenance(features)
    return None


def difference(attrs: dict, prov: dict) -> str | None:
    """None when a feature file's recorded settings are the run's, else what differs (one line)."""
    fp = _fingerprint(attrs)
    if fp is None:
        return None            # a CLAM/TRIDENT file: nothing recorded to compare
    want = {k: v for k, v in {**FINGERPRINT_DEFAULTS, **prov["settings"]}.items() if k not in PER_SLIDE_KEYS}
    diff = [f"{k}={fp.get(k)!r} (run: {want.get(k)!r})" for k in sorted(set(fp) | set(want)) if fp.get(k) != want.get(k)]
    have_w, want_w = attrs.get("weights") or None, prov.get("weights_id")
    if not diff and want_w and have_w and have_w != want_w:
        diff.append(f"encoder weights {have_w} (run: {want_w})")
    return ", ".join(diff) or None
