"""``wsi-ncmi predict RUN INPUT... --out DIR``: score new slides with every member of a trained run.

Steps: sort the inputs (``slides``); extract slides with the run's recorded extraction settings
into ``DIR/features`` through the extraction pipeline (``settings``, ``extract.runner``); refuse
given feature files made with other settings; score every slide with every member
(``members``); write ``DIR/predictions.csv`` (and ``DIR/predict.json``); with ``heatmaps``, draw
each slide (``maps``). A slide that fails (moved, damaged, other settings) is named with its
reason and skipped; the cohort goes on.

The predicted class is the argmax of the members' mean class probability. (An NCMI member alone
predicts by its own rule, see ``train --ncmi-predict``: its nearest class mean, or the Bayes score
with each class's own spread. Either can differ from the argmax of its class probabilities, which
pool the spread, on a borderline slide; the ensemble has no single rule, so the mean probability
decides.)
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.predict.slides import Failure, sort_inputs


@dataclass
class PredictResult:
    out: Path
    members: list[str]
    classes: list[str]
    rows: list[dict] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    heatmaps: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"predict: {len(self.rows)} slides scored by {len(self.members)} member(s) "
                 f"({', '.join(self.members)}) -> {self.out / 'predictions.csv'}"]
        staged = {r["patient"]: r["pn_stage"] for r in self.rows if r.get("pn_stage")}
        if staged:
            lines.append(f"  pN stage of {len(staged)} patient(s) with all five nodes: "
                         + ", ".join(f"{p} {s}" for p, s in sorted(staged.items())))
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  FAILED [{f.reason}] {f.message}" for f in self.failures]
        return "\n".join(lines)


class _Encoder:
    """The run's encoder, built once on first use (extraction and --overlap share it)."""

    def __init__(self, run: Path, prov: dict | None, out: Path, weights, device):
        self.run, self.prov, self.out, self.weights, self.device = run, prov, out, weights, device
        self.enc = None

    def config(self, slides: list[str], progress: bool):
        from wsi_ncmi.predict.settings import extract_config, require_provenance

        prov = require_provenance(self.run, self.prov)
        return extract_config(prov, slides, self.out / "features", self.weights, self.device, progress)

    def __call__(self):
        from wsi_ncmi.predict.settings import build_encoder

        if self.enc is None:
            self.enc = build_encoder(self.config([], False), self.prov)
        return self.enc


def _extract(slides: list[str], encoder: _Encoder, progress: bool, result: PredictResult) -> list[Path]:
    """Extract ``slides`` into ``out/features``; feature files of the slides that are ready."""
    from wsi_ncmi.extract.runner import run_extraction

    cfg = encoder.config(slides, progress)
    prov = encoder.prov
    summary = run_extraction(cfg, encoder())
    if summary.count("done") and prov.get("precision") and summary.precision != prov["precision"]:
        result.notes.append(f"the run's features were computed in {prov['precision']}, these in {summary.precision} "
                            f"(on {summary.device}): class probabilities may differ from the same slide's in training "
                            "in the third decimal")
    ready = []
    for r in summary.results:
        if r.status in ("done", "skipped"):
            ready.append(Path(cfg.out) / f"{r.slide_id}.h5")
        else:
            result.failures.append(Failure(r.slide_id, r.path, r.reason or r.status, r.message))
    if summary.count("done"):
        print(summary.render().splitlines()[0] + f"; {summary.tiles:,} tiles in {summary.seconds:.1f} s", flush=True)
    return ready


def _check_given(files: list[Path], prov: dict | None, result: PredictResult) -> list[Path]:
    """Feature files given directly: refused when made with other settings than the run's."""
    from wsi_ncmi.store.h5 import read_attrs
    from wsi_ncmi.store.provenance import difference

    if prov is None and files:
        result.notes.append("the run's features record no extraction settings: the given feature files could not be "
                            "checked against them")
    keep, unchecked = [], 0
    for f in files:
        try:
            attrs = read_attrs(f)
        except OSError as exc:
            result.failures.append(Failure(f.stem, str(f), "unreadable", f"{f}: not a readable HDF5 file ({exc}); "
                                                                          "extract the slide again"))
            continue
        diff = difference(attrs, prov) if prov is not None else None
        unchecked += prov is not None and not attrs.get("settings_fingerprint")
        if diff:
            result.failures.append(Failure(f.stem, str(f), "settings-mismatch",
                                           f"{f}: extracted with other settings than the run's features: {diff}; "
                                           "pass the slide itself (it is extracted with the run's settings)"))
        else:
            keep.append(f)
    if unchecked:
        result.notes.append(f"{unchecked} feature file(s) record no extraction settings (CLAM/TRIDENT files): scored "
                            "without checking them against the run's")
    return keep


def _pn_stages(rows: list[dict], classes: list[str]) -> None:
    """CAMELYON-17: patients with all five nodes predicted get their pN stage (official rules)."""
    from wsi_ncmi.tasks.camelyon17 import node_of, pn_stage

    nodes: dict[str, dict[int, str]] = {}
    for r in rows:
        pn = node_of(r["slide_id"])
        r["patient"], r["pn_stage"] = (pn[0] if pn else ""), ""
        if pn:
            nodes.setdefault(pn[0], {})[pn[1]] = r["pred"]
    for r in rows:
        got = nodes.get(r["patient"], {})
        if len(got) == 5:
            r["pn_stage"] = pn_stage(list(got.values()))


def _write_csv(path: Path, rows: list[dict], classes: list[str], members: list[str], staged: bool) -> None:
    cols = ["slide_id", "pred"] + [f"p_{c}" for c in classes] + ["attention_entropy", "patches"]
    cols += [f"{m}/p_{c}" for m in members for c in classes]
    cols += ["patient", "pn_stage"] if staged else []
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_predict(run: str | Path, inputs: list[str], out: str | Path, heatmaps: bool = False, overlap: float = 0.0,
                weights: str | None = None, device: str = "auto", progress: bool = True) -> PredictResult:
    from wsi_ncmi.predict.maps import heatmap_for_slide
    from wsi_ncmi.predict.members import load_members, score_bag
    from wsi_ncmi.predict.settings import run_provenance
    from wsi_ncmi.predict.shifted import shifts_per_axis
    from wsi_ncmi.store.h5 import read_feature_file
    from wsi_ncmi.train.runfolder import refuse_while_training, settings_folder

    run, out = Path(run), Path(out)
    shifts_per_axis(overlap)
    refuse_while_training(settings_folder(run), "predict with")
    prov = run_provenance(run)
    given = sort_inputs(inputs)
    out.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out, [], [], failures=list(given.failures))
    encoder = _Encoder(run, prov, out, weights, device)
    if heatmaps and overlap > 0:
        encoder()                   # a missing --weights fails now, not after every slide was scored
    files = _check_given(given.features, prov, result)
    if given.slides:
        files += _extract(given.slides, encoder, progress, result)
    seen: set[str] = set()
    for f in list(files):
        if f.stem in seen:          # a slide given twice (as a slide and in a features folder)
            files.remove(f)
            result.notes.append(f"{f}: slide '{f.stem}' was given twice; scored once")
        seen.add(f.stem)
    if not files:
        raise WsiNcmiError(f"{', '.join(inputs)}: no slide could be scored"
                           + (f" ({result.failures[0].message}{' ...' if len(result.failures) > 1 else ''})"
                              if result.failures else "") + "; pass slides, or a features folder of `wsi-ncmi extract`")
    dim = int((prov or {}).get("encoder_dim") or 0) or read_feature_file(files[0]).features.shape[1]
    members = load_members(run, dim)
    classes = members[0].model.classes
    result.members, result.classes = [m.name for m in members], classes
    scored: dict[str, Path] = {}
    for f in tqdm(files, desc="predict", unit="slide", disable=None if progress else True):
        sid = f.stem
        try:
            ff = read_feature_file(f)
        except WsiNcmiError as exc:
            result.failures.append(Failure(sid, str(f), "unreadable", str(exc)))
            continue
        x = ff.features
        if x.ndim != 2 or len(x) == 0 or x.shape[1] != dim or not np.isfinite(x).all():
            why = (f"features of dimension {x.shape[-1]}, the run's are {dim}" if x.shape[-1] != dim else
                   "no patches" if len(x) == 0 else "NaN or inf features")
            result.failures.append(Failure(sid, str(f), "unusable", f"{f}: {why}; extract the slide again"))
            continue
        sc = score_bag(members, torch.from_numpy(x.astype(np.float32)))
        mean = sc.mean
        row = {"slide_id": sid, "pred": classes[int(np.argmax(mean))], "patches": len(x),
               "attention_entropy": f"{np.nanmean(sc.entropy):.4f}" if np.isfinite(sc.entropy).any() else "nan",
               **{f"p_{c}": f"{mean[k]:.9g}" for k, c in enumerate(classes)},
               **{f"{m.name}/p_{c}": f"{sc.probs[i, k]:.9g}" for i, m in enumerate(members)
                  for k, c in enumerate(classes)}}
        result.rows.append(row)
        scored[sid] = f
    staged = members[0].model.cfg.task == "camelyon17"
    if staged:
        _pn_stages(result.rows, classes)
    _write_csv(out / "predictions.csv", result.rows, classes, result.members, staged)
    if heatmaps:
        for sid, f in scored.items():
            png = out / "heatmaps" / f"{sid}.png"
            try:
                _, n, secs = heatmap_for_slide(members, f, png, None, "info", overlap=overlap, encoder=encoder)
            except WsiNcmiError as exc:
                result.failures.append(Failure(sid, str(f), "heatmap", f"heatmap not drawn: {exc}"))
                continue
            except Exception as exc:        # a read error of a damaged slide: that slide only
                result.failures.append(Failure(sid, str(f), "heatmap", f"heatmap not drawn: {f}: "
                                                                       f"{type(exc).__name__}: {exc}"))
                continue
            result.heatmaps.append(png)
            print(f"heatmap {sid}: {n} patches in {secs:.1f} s -> {png}", flush=True)
    (out / "predict.json").write_text(json.dumps(
        {"run": str(run.resolve()), "inputs": list(inputs), "members": result.members, "classes": classes,
         "provenance": prov, "overlap": overlap, "scored": len(result.rows),
         "failures": [asdict(f) for f in result.failures], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    return result
