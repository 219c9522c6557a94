"""Cross-validation folds: which slides form the CV pool, and which fold each patient is in.

Why its own module: a fold assignment is the one place where a leak or an unstable split would
silently inflate every number a cross-validated run reports, so it is kept small and tested alone.

* The **pool** is what the folds cover. A task with a fixed test set (CAMELYON-17's centres 3-4,
  BRACS's official test, a CSV's ``split`` column) keeps that test set held out: the folds cover
  the rest (train + val), and every fold also scores the held-out test. A CSV without a ``split``
  column has no fixed test: the folds cover every slide; a CSV ``fold`` column gives the folds
  itself (``--folds`` must then equal its number of distinct values).
* **Whole patients.** A patient's slides are always in one fold (CAMELYON-17's five nodes of a
  patient are not independent); a slide without a patient is its own patient.
* **Stratified.** Patients are placed in a seeded order, those holding the rarest classes first;
  each goes to the fold that (1) lacks its rarest class, then its next rarest, ..., (2) keeps every
  class's count per fold closest to its share (total / K), then (3) holds the fewest slides. A last
  pass moves (or swaps) patients into a fold the greedy order left without a class, so every class
  with at least K patients reaches every fold where whole patients allow it. Deterministic given ``split_seed``.
* Within each fold's training part, validation is drawn like the single split's
  (``stratified_val``: whole patients, stratified, ``--val-fraction``); the out-of-fold slides are
  split ``oof`` and are never used for selection.
"""

from __future__ import annotations

from collections import Counter
from copy import copy

import numpy as np

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks.base import SlideRecord, Task, stratified_val

OOF = "oof"


def cv_pool(task: Task) -> list[SlideRecord]:
    """The slides the folds cover: all but the fixed test set (all, where the task has none)."""
    if task.fixed_test:
        return [s for s in task.slides if s.split != "test"]
    return list(task.slides)


def _patients(records: list[SlideRecord]) -> dict[str, list[SlideRecord]]:
    by: dict[str, list[SlideRecord]] = {}
    for r in sorted(records, key=lambda r: r.slide_id):
        by.setdefault(r.patient or r.slide_id, []).append(r)
    return by


def assign_folds(records: list[SlideRecord], k: int, seed: int, classes: list[str] | None = None) -> dict[str, int]:
    """{slide_id: fold in 0..k-1}: whole patients, stratified by class, deterministic given ``seed``."""
    if k < 2:
        raise WsiNcmiError(f"--folds {k}: cross-validation needs at least 2 folds; pass --folds 5 (or leave --folds "
                           "out for the single split)")
    by = _patients(records)
    name = (lambda c: classes[c]) if classes else str
    holders = Counter(lab for rs in by.values() for lab in {r.label for r in rs})
    few = sorted((n, c) for c, n in holders.items() if n < k)
    if few:
        n, c = few[0]
        raise WsiNcmiError(f"--folds {k}: class {name(c)} has only {n} patient(s) in the cross-validation pool, so "
                           f"some fold would have none of it to test on; pass --folds {max(2, n)} or fewer")
    total = Counter(r.label for r in records)
    share = {c: n / k for c, n in total.items()}
    rarity = {c: (holders[c], total[c], c) for c in total}
    pats = sorted(by)
    order = [pats[i] for i in np.random.default_rng(seed).permutation(len(pats))]
    rank = {p: i for i, p in enumerate(order)}
    labs = {p: sorted({r.label for r in by[p]}, key=lambda c: rarity[c]) for p in pats}
    order.sort(key=lambda p: (rarity[labs[p][0]], -len(by[p]), rank[p]))   # rarest class first, big patients first
    counts = [Counter() for _ in range(k)]
    sizes = [0] * k
    placed: dict[str, int] = {}
    for p in order:
        mine = Counter(r.label for r in by[p])

        def cost(f: int) -> tuple:
            lacks = tuple(0 if counts[f][c] == 0 else 1 for c in labs[p])
            dev = sum(((counts[f][c] + mine[c] - share[c]) ** 2 - (counts[f][c] - share[c]) ** 2) / total[c]
                      for c in mine)
            return lacks, round(dev, 12), sizes[f], f

        f = min(range(k), key=cost)
        counts[f].update(mine)
        sizes[f] += len(by[p])
        placed[p] = f
    _fill_gaps(placed, labs, k, order)
    return {r.slide_id: placed[p] for p in pats for r in by[p]}


def _fill_gaps(placed: dict[str, int], labs: dict[str, list[int]], k: int, order: list[str]) -> None:
    """Where the greedy pass left a fold without a class that has K or more patients, move there a
    patient of that class from a fold that keeps every class the patient takes away, or else swap
    it with a patient of the gap's fold where both folds keep every class. Each step closes a gap
    and opens none, so this ends."""
    holders = Counter(c for p in order for c in labs[p])
    while True:
        has = [Counter(c for p in order if placed[p] == f for c in labs[p]) for f in range(k)]
        gap = next(((c, f) for c in sorted(holders) if holders[c] >= k for f in range(k) if has[f][c] == 0), None)
        if gap is None:
            return
        c, f = gap
        movable = [p for p in order if c in labs[p] and all(has[placed[p]][d] >= 2 for d in labs[p])]
        if movable:
            placed[max(movable, key=lambda p: (has[placed[p]][c], -len(labs[p])))] = f
            continue
        swap = next(((q, r) for q in order if c in labs[q] and has[placed[q]][c] >= 2
                     for r in order if placed[r] == f
                     and all(has[placed[q]][d] - 1 + (d in labs[r]) >= 1 for d in labs[q])
                     and all(has[f][d] - 1 + (d in labs[q]) >= 1 for d in labs[r])), None)
        if swap is None:
            return
        q, r = swap
        placed[q], placed[r] = f, placed[q]


def given_folds(task: Task, k: int) -> dict[str, int] | None:
    """A CSV ``fold`` column's folds as {slide_id: 0..k-1} (None when the task has none)."""
    present = {s.slide_id for s in task.slides}      # slides dropped by --allow-missing are not folded
    col = {sid: v for sid, v in (task.fold_column or {}).items() if sid in present}
    if not col:
        return None
    values = sorted(set(col.values()), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit()
                                                     else 0, v))
    if len(values) != k:
        raise WsiNcmiError(f"--folds {k}: {task.source} has a fold column with {len(values)} folds "
                           f"({', '.join(values)}); pass --folds {len(values)} to use them")
    fold_of = {sid: values.index(v) for sid, v in col.items()}
    seen: dict[str, int] = {}
    for s in task.slides:
        p = s.patient or s.slide_id
        if seen.setdefault(p, fold_of[s.slide_id]) != fold_of[s.slide_id]:
            raise WsiNcmiError(f"{task.source}: patient {p} has slides in folds {values[seen[p]]} and "
                               f"{values[fold_of[s.slide_id]]}; put each patient's slides in one fold")
    return fold_of


def fold_assignment(task: Task, k: int, seed: int) -> dict[str, int]:
    """The folds of ``task``'s CV pool: a CSV's fold column, or drawn by ``assign_folds``."""
    return given_folds(task, k) or assign_folds(cv_pool(task), k, seed, task.classes)


def fold_task(task: Task, assignment: dict[str, int], fold: int, val_fraction: float, seed: int) -> Task:
    """``task`` as fold ``fold`` sees it: that fold's slides ``oof``, a validation draw from the rest of
    the pool, the fixed test set (if any) kept as ``test``. The records are copies."""
    slides = [copy(s) for s in task.slides]
    rest = []
    for s in slides:
        if s.slide_id not in assignment:
            continue                        # the held-out test set
        if assignment[s.slide_id] == fold:
            s.split = OOF
        else:
            rest.append(s)
    stratified_val(rest, val_fraction, seed)
    t = Task(task.name, task.classes, slides, task.source, notes=list(task.notes), fixed_test=task.fixed_test)
    if hasattr(task, "patient_stages"):
        t.patient_stages = task.patient_stages  # type: ignore[attr-defined]
    return t.check()
