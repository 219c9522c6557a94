"""A task: classes and labelled slides with their split, built from the dataset's own files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from wsi_ncmi.errors import WsiNcmiError

SPLITS = ("train", "val", "test")


@dataclass
class SlideRecord:
    slide_id: str
    label: int
    split: str = ""
    patient: str = ""
    centre: int = -1


@dataclass
class Task:
    name: str
    classes: list[str]
    slides: list[SlideRecord]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    fixed_test: bool = True           # the test split is the dataset's own (False: drawn from the cohort)
    fold_column: dict[str, str] | None = None   # a CSV's fold column {slide_id: fold}, for --folds

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> list[SlideRecord]:
        return [s for s in self.slides if s.split == name]

    def counts(self) -> dict[str, list[int]]:
        """Per split, the number of slides of each class (``oof`` too in a cross-validation fold)."""
        out = {}
        for sp in SPLITS + (("oof",) if self.split("oof") else ()):
            c = Counter(s.label for s in self.split(sp))
            out[sp] = [c.get(k, 0) for k in range(self.num_classes)]
        return out

    def check(self) -> "Task":
        """Refuse a cohort no model can be trained or selected on, before any epoch runs."""
        present = {s.label for s in self.slides}
        if len(present) < 2:
            only = self.classes[next(iter(present))] if present else "none"
            raise WsiNcmiError(f"{self.source}: every slide has the same label ({only}); a classifier needs at "
                               "least two classes: check the label column")
        for sp in ("train", "test"):
            if not self.split(sp) and not (sp == "test" and self.split("oof")):
                raise WsiNcmiError(f"{self.source}: task '{self.name}' has no {sp} slides; check the split column/layout")
        if not self.split("val"):
            raise WsiNcmiError(f"{self.source}: task '{self.name}' has no validation slides, and model selection "
                               "and early stopping need them (never the test split): add val rows to the split "
                               "column, or drop the column and let --val-fraction draw them")
        untrained = [self.classes[k] for k, n in enumerate(self.counts()["train"]) if n == 0]
        if untrained:
            raise WsiNcmiError(f"{self.source}: class(es) {', '.join(untrained)} have no training slides, so no "
                               "model can learn them: move some of their slides to train, or remove those rows")
        return self

    def warnings(self) -> list[str]:
        """Classes absent from val or test: their F1 and AUC are left out of the macro averages."""
        out = []
        for sp in [sp for sp in ("val", "oof", "test") if sp != "oof" or self.split(sp)]:
            gone = [self.classes[k] for k, n in enumerate(self.counts()[sp]) if n == 0]
            if gone:
                out.append(f"{sp} split has no slide of class(es) {', '.join(gone)}: macro-F1 and AUC on {sp} "
                           "average over the classes it holds (and any it wrongly predicts)")
        return out


def stratified_val(records: list[SlideRecord], fraction: float, seed: int) -> None:
    """Mark about ``fraction`` of ``records`` as val, the rest train: whole patients, stratified.

    A patient's slides always land on one side (CAMELYON-17's five nodes of a patient drawn as
    independent slides put 23 patients in both train and val). In a seeded random order of
    patients, each class (rarest first) first gets one patient holding it, where the class has two
    or more patients; then patients join val while they bring a class still under its share
    (``fraction`` of the class's slides) and push none over it. So every class that can be in val
    is, and the draw is reproducible from the seed.
    Records without a patient count as their own patient.
    """
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[SlideRecord]] = {}
    for r in sorted(records, key=lambda r: r.slide_id):
        by_patient.setdefault(r.patient or r.slide_id, []).append(r)
    patients = sorted(by_patient)
    n_class = Counter(r.label for r in records)
    patients_of = Counter(lab for p in patients for lab in {r.label for r in by_patient[p]})
    target = {k: (max(1, int(round(fraction * n))) if patients_of[k] > 1 else 0) if fraction > 0 else 0
              for k, n in n_class.items()}
    order = [patients[i] for i in rng.permutation(len(patients))]
    val: set[str] = set()
    taken: Counter = Counter()
    left = Counter(patients_of)                                # patients of each class still in train

    def may_leave(p: str) -> bool:                             # never a class's last patient in train
        return p not in val and all(left[k] >= 2 for k in {r.label for r in by_patient[p]})

    def move(p: str) -> None:
        val.add(p)
        taken.update(r.label for r in by_patient[p])
        left.subtract({r.label for r in by_patient[p]})

    for k in sorted(n_class, key=lambda k: (n_class[k], k)):   # rarest class first: one patient each
        if target[k] > 0 and taken[k] == 0:
            pick = next((p for p in order if may_leave(p) and any(r.label == k for r in by_patient[p])), None)
            if pick is not None:
                move(pick)
    for p in order:                                            # then fill each class up to its share
        c = Counter(r.label for r in by_patient[p])
        if may_leave(p) and any(taken[k] < target[k] for k in c) and all(taken[k] + n <= target[k] for k, n in c.items()):
            move(p)
    for p in patients:
        for r in by_patient[p]:
            r.split = "val" if p in val else "train"


def patients_in_two_splits(records: list[SlideRecord]) -> dict[str, list[str]]:
    """Patients whose slides sit in more than one split: {patient: sorted splits}."""
    seen: dict[str, set[str]] = {}
    for r in records:
        if r.patient and r.split:
            seen.setdefault(r.patient, set()).add(r.split)
    return {p: sorted(s) for p, s in sorted(seen.items()) if len(s) > 1}


def refuse_patient_overlap(records: list[SlideRecord], source: str, allow: bool) -> list[str]:
    """Error naming the first patient found in two splits (notes instead when ``allow``)."""
    both = patients_in_two_splits(records)
    if not both:
        return []
    first, splits = next(iter(both.items()))
    msg = (f"{len(both)} patient(s) have slides in more than one split (first: {first} in {' and '.join(splits)})")
    if not allow:
        raise WsiNcmiError(f"{source}: {msg}; their slides are not independent, so the split leaks. Put each "
                           "patient's slides in one split, or pass --allow-patient-overlap to train anyway")
    return [f"allowed by --allow-patient-overlap: {msg}"]
