"""``wsi-ncmi demo``: the whole product on a built-in cohort, on a CPU, in minutes.

build slides (real H&E, implanted lesions) -> extract (offline ImageNet encoder) -> train gated
ABMIL with NCMI and with CE on the CAMELYON centre split (several seeds) -> attention and information heatmaps ->
one comparison table and ``report.md``. Every step is resumable: a second run reuses the slides,
the features (extraction is a no-op) and finished seeds.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from wsi_ncmi.demo.cohort import build_cohort

DEMO_EXTRACT = dict(encoder="efficientnet_lite0", mpp=2.0, patch_size=224, min_tissue=0.5)


def run_demo(out: str | Path = "wsi-ncmi-demo", patients_per_centre: int = 2, nodes: int = 5, seeds: int = 5,
             epochs: int = 40, losses: tuple[str, ...] = ("ncmi", "ce"), verbose: bool = False,
             width_um: float = 5600, height_um: float = 4200) -> dict:
    from wsi_ncmi.extract import ExtractConfig, run_extraction
    from wsi_ncmi.train.config import TrainConfig
    from wsi_ncmi.train.run import run_training
    from wsi_ncmi.predict.heatmap import save_heatmap

    out = Path(out)
    print(f"[1/4] building the demo cohort in {out / 'slides'} (real H&E, implanted lesions, 5 centres)", flush=True)
    build_cohort(out, patients_per_centre, nodes, width_um=width_um, height_um=height_um)
    plan = json.loads((out / "lesions.json").read_text())
    print(f"[2/4] extracting features ({DEMO_EXTRACT['encoder']}, {DEMO_EXTRACT['patch_size']} px at "
          f"{DEMO_EXTRACT['mpp']} um/px)", flush=True)
    ex = run_extraction(ExtractConfig(slides=[str(out / "slides")], out=str(out / "features"), **DEMO_EXTRACT))
    print("      " + ex.render().replace("\n", "\n      "), flush=True)
    if ex.failed:
        raise SystemExit(1)
    results = {}
    for loss in losses:
        print(f"[3/4] training gated ABMIL with {loss}, {seeds} seed(s), centres 0-2 -> 3-4", flush=True)
        cfg = TrainConfig(task="camelyon17", labels=str(out / "stage_labels.csv"), features=str(out / "features"),
                          out=str(out / "runs" / loss), model="abmil", loss=loss, seeds=seeds, epochs=epochs,
                          resume=True, progress=False, bootstrap=200,
                          val_fraction=0.2)   # ~2 validation slides per class: selection and NCMI need more than one
        with contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
            results[loss] = run_training(cfg)
    print("[4/4] attention and information heatmaps", flush=True)
    test = [s for s in plan if s["centre"] >= 3]
    picks = [max((s for s in test if s["label"] == lab), key=lambda s: s["patient"], default=None) for lab in (3, 2)]
    heatmaps = []
    for s in (p for p in picks if p):
        for loss in losses:
            heatmaps.append(save_heatmap(out / "runs" / loss, s["path"], out / "features", 0,
                                         out / "runs" / loss / "heatmaps" / f"{s['slide_id']}.png", kind="info")[0])
    table = comparison_table(results, seeds)
    report = out / "report.md"
    report.write_text(_report(out, table, results, heatmaps, ex))
    print("\n" + table)
    print(f"\npictures: {out / 'features' / 'thumbnails'}/*.png (tissue + patch grid), "
          f"{out / 'runs'}/<loss>/seed_*/curves.png and test_confusion_roc.png, "
          f"{out / 'runs'}/<loss>/heatmaps/*.png\nreport:   {report}")
    return results


def comparison_table(results: dict, seeds: int, title: str = "CAMELYON-17-like demo, test centres 3-4") -> str:
    lines = [f"{title}, mean ± std over {seeds} seed(s)", "",
             "| loss | macro-F1 | macro AUC | balanced acc. | NCMI |", "|---|---|---|---|---|"]
    for loss, agg in results.items():
        t = agg["test"]
        lines.append(f"| {loss} | " + " | ".join(f"{t[k]['mean']:.3f} ± {t[k]['std']:.3f}"
                                                 for k in ("macro_f1", "auc", "balanced_accuracy", "ncmi")) + " |")
    return "\n".join(lines)


def _report(out: Path, table: str, results: dict, heatmaps: list[Path], ex) -> str:
    rel = lambda p: Path(p).resolve().relative_to(out.resolve()).as_posix()
    thumbs = sorted((out / "features" / "thumbnails").glob("*.png"))[:4]
    parts = ["# wsi-ncmi demo report", "", table, "",
             f"Extraction: {ex.count('done')} slides extracted now, {ex.count('skipped')} reused; "
             f"{ex.tiles:,} tiles at {ex.tiles_per_s:.1f} tiles/s this run.", "", "## Slides (tissue outline, patch grid)", ""]
    parts += [f"![{t.stem}]({rel(t)})" for t in thumbs]
    parts += ["", "## Training (seed 0): loss, validation metrics, NCMI vs accuracy", ""]
    parts += [f"### {loss}\n\n![curves]({rel(out / 'runs' / loss / 'seed_0' / 'curves.png')})\n\n"
              f"![test]({rel(out / 'runs' / loss / 'seed_0' / 'test_confusion_roc.png')})" for loss in results]
    parts += ["", "## Attention and information heatmaps (test slides)", ""] + [f"![{h.stem}]({rel(h)})" for h in heatmaps]
    parts += ["", "Per-run tables: " + ", ".join(f"[{loss}]({rel(out / 'runs' / loss / 'metrics.md')})" for loss in results)]
    return "\n".join(parts) + "\n"
