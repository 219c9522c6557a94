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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> list[SlideRecord]:
        return [s for s in self.slides if s.split == name]

    def counts(self) -> dict[str, list[int]]:
        """Per split, the number of slides of each class."""
        out = {}
        for sp in SPLITS:
            c = Counter(s.label for s in self.split(sp))
            out[sp] = [c.get(k, 0) for k in range(self.num_classes)]
        return out

    def check(self) -> "Task":
        for sp in ("train", "test"):
            if not self.split(sp):
                raise WsiNcmiError(f"{self.source}: task '{self.name}' has no {sp} slides; check the split column/layout")
        return self


def stratified_val(records: list[SlideRecord], fraction: float, seed: int) -> None:
    """Mark a stratified ``fraction`` of ``records`` (per class, at least one) as val, rest train."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[SlideRecord]] = {}
    for r in sorted(records, key=lambda r: r.slide_id):
        by_class.setdefault(r.label, []).append(r)
    for label, rs in sorted(by_class.items()):
        idx = rng.permutation(len(rs))
        n_val = max(1, int(round(fraction * len(rs)))) if len(rs) > 1 and fraction > 0 else 0
        for k, i in enumerate(idx):
            rs[i].split = "val" if k < n_val else "train"
