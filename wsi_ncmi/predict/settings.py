"""The extraction settings a run's features were made with, turned into an ``ExtractConfig`` and
an encoder for new slides.

Why: a slide must be embedded exactly as the training slides were (same encoder and weights,
resolution, patch size and tissue filter), or the model scores features it never saw. The settings
come from the run's recorded provenance (``store.provenance``); nothing is guessed.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.extract.config import ExtractConfig
from wsi_ncmi.store.provenance import read_run_provenance
from wsi_ncmi.train.runfolder import load_run_config, settings_folder


def run_provenance(run: Path) -> dict | None:
    run = settings_folder(run)                      # a fold folder's settings are its run's
    cfg = load_run_config(run, require=())
    return read_run_provenance(run, cfg.features)


def require_provenance(run: Path, prov: dict | None) -> dict:
    if prov is None:
        raise WsiNcmiError(f"{run}: its features record no extraction settings (not made by `wsi-ncmi extract`, or "
                           "the features folder is gone), so slides cannot be embedded as the training slides were; "
                           "extract them with the training's settings and pass that features folder instead")
    return prov


def extract_config(prov: dict, slides: list[str], out: Path, weights: str | None = None, device: str = "auto",
                   progress: bool = True, **extra) -> ExtractConfig:
    """An ``ExtractConfig`` that reproduces the run's features: every recorded setting that is an
    extraction setting is copied (settings added to the fingerprint later are carried too)."""
    names = {f.name for f in fields(ExtractConfig)}
    rec = {k: v for k, v in prov["settings"].items() if k in names and k != "weights"}
    dtype = prov.get("feature_dtype")
    if dtype in ("float16", "float32"):
        rec["feature_dtype"] = dtype
    want_file = prov["settings"].get("weights")
    if want_file and not weights:
        raise WsiNcmiError(f"the run's features were extracted with the weights file {want_file} "
                           f"({prov.get('weights_id')}); pass --weights with that file")
    if weights and not want_file:
        raise WsiNcmiError(f"--weights {weights}: the run's features were extracted with the encoder's own weights "
                           f"({prov.get('weights_id')}); drop --weights")
    if weights and Path(weights).name != want_file:
        raise WsiNcmiError(f"--weights {weights}: the run's features were extracted with {want_file} "
                           f"({prov.get('weights_id')}); pass that file")
    return ExtractConfig(slides=list(slides), out=str(out), weights=weights, device=device, progress=progress,
                         **rec, **extra).validate()


def build_encoder(cfg: ExtractConfig, prov: dict):
    """The encoder of ``cfg``, checked against the recorded weights id (file digest or hub name)."""
    from wsi_ncmi.encoders import create_encoder
    from wsi_ncmi.extract.runner import resolve_device

    enc = create_encoder(cfg.encoder, cfg.weights, device=resolve_device(cfg.device))
    if cfg.encoder_input == "patch":
        enc.use_patch_input()
    want = prov.get("weights_id")
    if want and enc.weights_id != want:
        raise WsiNcmiError(f"encoder '{cfg.encoder}': its weights are now {enc.weights_id}, but the run's features "
                           f"were extracted with {want}; pass --weights with the file the training used")
    return enc
