"""Any cohort from a CSV: ``slide_id,label`` plus optional ``split`` or ``fold`` and ``patient``.

Labels may be names or integers (classes are sorted). A ``patient`` column groups slides: every split
drawn here keeps a patient's slides together, and a ``split`` column that puts one patient in two
splits is an error naming the patient (``allow_patient_overlap`` proceeds, with a note). With a
``split`` column (train/val/test) it is used as is; with a ``fold`` column, fold ``test_fold`` is the
test set and a stratified ``val_fraction`` of the rest is validation; with neither, a stratified
70/15/15 split is drawn with ``split_seed`` (written into the run's config so it can be reproduced).
``--folds K`` (``tasks/folds.py``) cross-validates over the train+val rows of a ``split`` column, or
over every row otherwise; a ``fold`` column then gives the folds itself.
"""

from __future__ import annotations

import csv
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks.base import SPLITS, SlideRecord, Task, refuse_patient_overlap, stratified_val


def load_csv_task(labels: str | Path, val_fraction: float = 0.1, split_seed: int = 0, test_fold: int = 0,
                  allow_patient_overlap: bool = False) -> Task:
    path = Path(labels) if labels else None
    if path is None or not path.is_file():
        raise WsiNcmiError(f"{labels}: label CSV not found; task csv needs --labels FILE with columns slide_id,label")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"slide_id", "label"} <= cols:
            raise WsiNcmiError(f"{path}: needs columns slide_id,label (found {','.join(reader.fieldnames or []) or 'none'})")
        raw_rows = [dict(r) for r in reader]
        rows = [{k: (v or "").strip() for k, v in r.items() if k} for r in raw_rows]
    if not rows:
        raise WsiNcmiError(f"{path}: no rows")
    spellings: dict[str, set[str]] = {}
    for r in raw_rows:
        v = r.get("label") or ""
        spellings.setdefault(" ".join(v.split()).casefold(), set()).add(v)
    clash = next((sorted(v) for v in spellings.values() if len(v) > 1), None)
    if clash:
        raise WsiNcmiError(f"{path}: labels {' and '.join(repr(v) for v in clash)} differ only by case or "
                           "whitespace; write each class one way in the label column")
    raw = [r["label"] for r in rows]
    if any(not v for v in raw):
        raise WsiNcmiError(f"{path}: empty label on line {raw.index('') + 2}")
    numeric = all(v.lstrip("-").isdigit() for v in raw)
    classes = sorted(set(raw), key=(lambda v: int(v)) if numeric else None)
    seen = set()
    records = []
    for lineno, r in enumerate(rows, start=2):
        if r["slide_id"] in seen:
            raise WsiNcmiError(f"{path}:{lineno}: slide_id '{r['slide_id']}' appears twice")
        seen.add(r["slide_id"])
        records.append(SlideRecord(r["slide_id"], classes.index(r["label"]), r.get("split", "").lower(),
                                   r.get("patient", "") or r["slide_id"]))
    if "split" in cols:
        bad = [r.split for r in records if r.split not in SPLITS]
        if bad:
            raise WsiNcmiError(f"{path}: split must be train, val or test (found '{bad[0]}')")
    elif "fold" in cols:
        folds = [r["fold"] for r in rows]
        if str(test_fold) not in folds:
            raise WsiNcmiError(f"{path}: --test-fold {test_fold} is not a value of the fold column "
                               f"({', '.join(sorted(set(folds), key=_fold_order))}); pass --test-fold "
                               f"{min(set(folds), key=_fold_order)}")
        for rec, f in zip(records, folds):
            rec.split = "test" if f == str(test_fold) else ""
        stratified_val([r for r in records if r.split != "test"], val_fraction, split_seed)
    else:
        stratified_val(records, 0.15, split_seed + 1)
        for r in records:
            if r.split == "val":
                r.split = "test"
        stratified_val([r for r in records if r.split != "test"], 0.15 / 0.85, split_seed)
    notes = refuse_patient_overlap(records, str(path), allow_patient_overlap)
    return Task("csv", classes, records, str(path), notes=notes, fixed_test="split" in cols,
                fold_column={r["slide_id"]: r["fold"] for r in rows} if "fold" in cols and "split" not in cols
                else None).check()


def _fold_order(v: str) -> tuple:
    """Fold values in numeric order where they are numbers ("2" before "10")."""
    return (0, int(v), v) if v.lstrip("-").isdigit() else (1, 0, v)
