"""Generated MIL cohorts with a known rule, for tests and benchmarks.

Each slide is a bag of background instances (one Gaussian cluster per "tissue type") plus a number
of "tumour" instances drawn around a separate direction; the slide label is set by how many tumour
instances it holds, like CAMELYON-17's negative / ITC / micro / macro by lesion size
(0 / 1-3 / 4-15 / 16+ by default). Files are real HDF5 feature files in our layout.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from wsi_ncmi.store.h5 import FeatureWriter

CAMELYON17_SHARES = (318, 36, 59, 87)   # slide-level negative / ITC / micro / macro counts
# the generated bags of benchmarks/loss_table.py and benchmarks/ablation.py: make_cohort(out, n_slides, **these)
CAMELYON17_LIKE_BAGS = dict(dim=32, bag_size=(60, 160), separation=4.0, proportions=CAMELYON17_SHARES)
TUMOUR_COUNTS = ((0, 0), (1, 3), (4, 15), (16, 40))   # per class: inclusive range of tumour instances


def make_bag(rng, label: int, n: int, dim: int, centres: np.ndarray, tumour: np.ndarray, noise: float = 1.0,
             counts=TUMOUR_COUNTS) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = counts[label]
    k = min(n, int(rng.integers(lo, hi + 1)))
    kinds = rng.integers(0, len(centres), n)
    x = centres[kinds] + noise * rng.standard_normal((n, dim))
    is_tumour = np.zeros(n, bool)
    if k:
        idx = rng.choice(n, size=k, replace=False)
        x[idx] = tumour + noise * rng.standard_normal((k, dim))
        is_tumour[idx] = True
    return x.astype(np.float32), is_tumour


def make_cohort(out: str | Path, n_slides: int = 80, dim: int = 32, bag_size: tuple[int, int] = (60, 200),
                seed: int = 0, num_classes: int = 4, splits: tuple[float, float] = (0.6, 0.2),
                separation: float = 4.0, proportions: tuple[float, ...] | None = None) -> Path:
    """Write ``<out>/features/<slide>.h5`` and ``<out>/labels.csv`` (slide_id,label,split); returns ``out``.

    Classes are balanced unless ``proportions`` gives their shares (e.g. CAMELYON-17's slide-level
    318/36/59/87); each class is split train/val/test by ``splits`` in the order its slides appear.
    """
    out = Path(out)
    feats = out / "features"
    feats.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, dim)) * 2.0
    tumour = rng.standard_normal(dim)
    tumour = separation * tumour / np.linalg.norm(tumour) * np.sqrt(dim) / 2
    labels = class_sequence(n_slides, num_classes, proportions)
    per_class = np.bincount(labels, minlength=num_classes)
    seen = np.zeros(num_classes, int)
    rows = []
    for i in range(n_slides):
        label = int(labels[i])
        n = int(rng.integers(bag_size[0], bag_size[1] + 1))
        x, is_t = make_bag(rng, label, n, dim, centres, tumour)
        sid = f"bag_{i:04d}"
        coords = np.stack([np.arange(n) * 256, np.zeros(n, int)], 1)
        w = FeatureWriter(feats / f"{sid}.h5", feats / ".partial", coords, dim, "float32",
                          {"encoder": "synthetic", "slide_id": sid}, extra={"is_tumour": is_t})
        w.write(0, x)
        w.commit()
        u = seen[label] / max(1, per_class[label])
        seen[label] += 1
        split = "train" if u < splits[0] else "val" if u < splits[0] + splits[1] else "test"
        rows.append((sid, label, split))
    return _write_labels(out, rows)


def class_sequence(n: int, num_classes: int, proportions=None) -> np.ndarray:
    """Slide labels in order: round-robin when balanced, else interleaved by the given shares."""
    if proportions is None:
        return np.arange(n) % num_classes
    p = np.asarray(proportions, float)
    if len(p) != num_classes or (p <= 0).any():
        raise ValueError(f"proportions needs {num_classes} positive shares, got {proportions}")
    raw = p / p.sum() * n
    counts = np.floor(raw).astype(int).clip(min=1)
    for k in np.argsort(raw - np.floor(raw))[::-1][:max(0, n - counts.sum())]:
        counts[k] += 1
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts])
    return np.concatenate([np.full(c, k) for k, c in enumerate(counts)])[np.argsort(keys, kind="stable")]


MEASUREMENT_SETS = {
    # name: (sklearn loader, classes whose instances are "positive"); all bundled with scikit-learn
    "digits": ("load_digits", (8,)),                  # 8x8 grey digits, 64-d, values 0-16
    "breast_cancer": ("load_breast_cancer", (0,)),    # 30 raw cell-nucleus measurements, malignant positive
    "wine": ("load_wine", (2,)),                      # 13 raw chemical measurements, scales 0.1-1680
    "iris": ("load_iris", (2,)),                      # 4 flower measurements in cm; virginica overlaps versicolor
}
MEASUREMENT_COUNTS = ((0, 0), (1, 2), (3, 6), (7, 14))   # positive instances per bag, by class


def make_measurement_cohort(out: str | Path, dataset: str = "digits", seed: int = 0,
                            bags: tuple[int, int, int] = (240, 60, 120), bag_size: tuple[int, int] = (24, 40),
                            counts=MEASUREMENT_COUNTS, positive: tuple[int, ...] | None = None) -> Path:
    """A 4-class MIL cohort of *real* measurements, unscaled, written as plain CLAM-style HDF5.

    Instances are rows of a scikit-learn bundled dataset (no download); the bag's class is set by
    how many "positive" rows it holds (negative / ITC / micro / macro-like). Train+val bags draw
    from 60% of the rows, test bags from the other 40%, so no row is shared across that line.
    Files hold only ``features`` and ``coords`` (no attributes), as CLAM writes them: these cohorts
    test that defaults work on data the project never shaped. ``labels.csv``: slide_id,label,split.
    ``positive`` names other classes of the dataset as the positive rows (default: ``MEASUREMENT_SETS``).
    """
    import h5py
    from sklearn import datasets

    loader, pos_classes = MEASUREMENT_SETS[dataset]
    pos_classes = pos_classes if positive is None else positive
    d = getattr(datasets, loader)()
    x_all, t = d.data.astype(np.float32), d.target
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x_all))
    cut = int(0.6 * len(perm))
    pools = {"fit": perm[:cut], "test": perm[cut:]}
    is_pos = np.isin(t, pos_classes)
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n_bags in zip(("train", "val", "test"), bags):
        pool = pools["test" if split == "test" else "fit"]
        pos, neg = pool[is_pos[pool]], pool[~is_pos[pool]]
        for i in range(n_bags):
            label = i % len(counts)
            n = int(rng.integers(bag_size[0], bag_size[1] + 1))
            lo, hi = counts[label]
            k = min(n, int(rng.integers(lo, hi + 1)))
            idx = np.concatenate([rng.choice(pos, k), rng.choice(neg, n - k)])
            rng.shuffle(idx)
            sid = f"{dataset}_{split}_{i:03d}"
            with h5py.File(out / "features" / f"{sid}.h5", "w") as f:
                f["features"] = x_all[idx]
                f["coords"] = np.stack([np.arange(n) * 256, np.zeros(n, int)], 1)
            rows.append((sid, label, split))
    return _write_labels(out, rows)


def _write_labels(out: Path, rows: list[tuple[str, int, str]]) -> Path:
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "split"])
        w.writerows(rows)
    return out


def make_camelyon17_cohort(out: str | Path, dim: int = 8, bag_size: int = 50, patients_per_centre: int = 5,
                           seed: int = 0) -> Path:
    """Node bags named as in CAMELYON-17 (``patient_XXX_node_Y``, 5 nodes per patient, patients
    ``20c .. 20c + patients_per_centre - 1`` of each centre c) with the challenge's own
    ``stage_labels.csv`` (node labels and each patient's pN stage); returns ``out``.

    Why: the camelyon17 task's rules (centre split, whole-patient validation, pN stage) need the
    challenge's file names and label format; the bags follow ``make_bag``.
    """
    from wsi_ncmi.tasks import pn_stage
    from wsi_ncmi.tasks.camelyon17 import CLASSES

    out = Path(out)
    rng = np.random.default_rng(seed)
    centres, tumour = rng.standard_normal((3, dim)) * 2, np.full(dim, 6.0)
    feats = out / "features"
    lines = ["patient,stage"]
    for pid in [p for c in range(5) for p in range(20 * c, 20 * c + patients_per_centre)]:
        labels = [int(v) for v in rng.integers(0, 4, 5)]
        lines.append(f"patient_{pid:03d}.zip,{pn_stage(labels)}")
        for node, lab in enumerate(labels):
            sid = f"patient_{pid:03d}_node_{node}"
            x, _ = make_bag(rng, lab, bag_size, dim, centres, tumour)
            w = FeatureWriter(feats / f"{sid}.h5", feats / ".p", np.zeros((bag_size, 2)), dim, "float32")
            w.write(0, x)
            w.commit()
            lines.append(f"{sid}.tif,{CLASSES[lab]}")
    (out / "stage_labels.csv").write_text("\n".join(lines) + "\n")
    return out
