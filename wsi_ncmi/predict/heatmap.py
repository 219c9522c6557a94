"""``wsi-ncmi heatmap RUN SLIDE``: one slide under one member of a trained run.

Finds the slide's feature file (by the slide file's name or the id), loads the member through
``train.inference`` and hands the values to ``predict.maps`` (picture, CSV, GeoJSON).
"""

from __future__ import annotations

from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError


def save_heatmap(run: str | Path, slide: str, features: str | Path | None = None, seed: int = 0,
                 out: str | Path | None = None, kind: str = "attention", target: str | None = None,
                 estimator: str = "instance", max_evals: int = 2048, overlap: float = 0.0,
                 weights: str | None = None, device: str = "auto") -> tuple[Path, int, float]:
    """(PNG path, patches drawn, seconds). With ``overlap``, shifted patches are embedded with the
    run's recorded extraction settings (``predict.settings``)."""
    from wsi_ncmi.mil.information import ESTIMATORS
    from wsi_ncmi.predict.maps import KINDS, heatmap_for_slide
    from wsi_ncmi.predict.members import Member
    from wsi_ncmi.predict.shifted import shifts_per_axis
    from wsi_ncmi.slides.open import slide_id_for
    from wsi_ncmi.store.h5 import read_feature_file
    from wsi_ncmi.train.inference import load_run_model
    from wsi_ncmi.train.runfolder import load_run_config, settings_folder

    if kind not in KINDS:
        raise WsiNcmiError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    if estimator not in ESTIMATORS:
        raise WsiNcmiError(f"--estimator {estimator}: choose one of {', '.join(ESTIMATORS)}")
    shifts_per_axis(overlap)
    run = Path(run)
    features = Path(features or load_run_config(settings_folder(run), require=()).features)
    if features.suffix == ".zarr":
        from wsi_ncmi.store.zarr_cache import ZarrCohort

        features = ZarrCohort(features).source_dir      # coords and attributes live in the .h5 files
    sid = slide_id_for(slide) if Path(slide).suffix else slide
    h5 = features / f"{sid}.h5"
    if not h5.is_file():
        raise WsiNcmiError(f"{h5}: no features for slide '{sid}'; pass --features with the extraction folder")
    ff = read_feature_file(h5)
    member = Member(f"seed_{seed}", load_run_model(run, seed, ff.features.shape[1]))
    suffix = "" if kind == "attention" else "_info"
    out = Path(out) if out else run / "heatmaps" / f"{sid}_seed{seed}{suffix}.png"
    return heatmap_for_slide([member], h5, out, slide if Path(slide).suffix else None, kind, target, estimator,
                             max_evals, overlap, lambda: _encoder(settings_folder(run), weights, device), features=ff)


def _encoder(run: Path, weights: str | None, device: str):
    from wsi_ncmi.predict.settings import build_encoder, extract_config, require_provenance, run_provenance

    prov = require_provenance(run, run_provenance(run))
    cfg = extract_config(prov, [], Path("."), weights, device, progress=False)
    return build_encoder(cfg, prov)
