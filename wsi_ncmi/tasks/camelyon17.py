"""CAMELYON-17 (camelyon17.grand-challenge.org): 4-class slide task and patient pN staging.

From the challenge's ``stage_labels.csv`` (columns ``patient,stage``): rows ``patient_XXX_node_Y.tif``
give the slide label (negative / itc / micro / macro), rows ``patient_XXX.zip`` the patient's pN
stage. 100 training patients x 5 nodes = 500 labelled slides (318/36/59/87). Centre = patient // 20.
Standard MIL split (AEM/ASMIL/ACMIL line of work): centres 0-2 train+val (val a stratified 10%),
centres 3-4 test. The challenge metric is the quadratic-weighted kappa of patient pN stages,
derived from the five node labels by the official rules (``pn_stage``).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks.base import SlideRecord, Task, stratified_val

CLASSES = ["negative", "itc", "micro", "macro"]
PN_STAGES = ["pN0", "pN0(i+)", "pN1mi", "pN1", "pN2"]
_NODE = re.compile(r"^(patient_(\d+)_node_(\d+))(\.tif{1,2})?$", re.I)
_PATIENT = re.compile(r"^patient_(\d+)(\.zip)?$", re.I)


def pn_stage(node_labels: list[str | int]) -> str:
    """Official CAMELYON-17 rules from the five node labels (names or class indices).

    pN0: no metastasis or ITC; pN0(i+): only ITC; pN1mi: micro-metastases, no macro;
    pN1: metastases (micro or macro) in 1-3 nodes, at least one macro; pN2: in 4-9 nodes, at least one macro.
    """
    names = [CLASSES[v] if isinstance(v, int) else str(v).lower() for v in node_labels]
    macro = names.count("macro")
    mets = macro + names.count("micro")
    if macro:
        return "pN1" if mets <= 3 else "pN2"
    if mets:
        return "pN1mi"
    if "itc" in names:
        return "pN0(i+)"
    return "pN0"


def node_of(slide_id: str) -> tuple[str, int] | None:
    """(patient, node) of a CAMELYON-17 node slide id (``patient_004_node_4`` -> ("patient_004", 4)), else None."""
    m = _NODE.match(slide_id)
    return (f"patient_{int(m.group(2)):03d}", int(m.group(3))) if m else None


def load_camelyon17(labels: str | Path, val_fraction: float = 0.1, split_seed: int = 0) -> Task:
    path = Path(labels)
    if not path.is_file():
        raise WsiNcmiError(f"{path}: CAMELYON-17 labels not found; pass the challenge's stage_labels.csv with --labels")
    slides: list[SlideRecord] = []
    patients: dict[str, str] = {}
    seen: dict[str, str] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if [c.strip().lower() for c in (reader.fieldnames or [])][:2] != ["patient", "stage"]:
            raise WsiNcmiError(f"{path}: expected the official header 'patient,stage' "
                               f"(found {','.join(reader.fieldnames or []) or 'none'})")
        for lineno, row in enumerate(reader, start=2):
            name, stage = (row.get("patient") or "").strip(), (row.get("stage") or "").strip()
            if not name:
                continue
            m = _NODE.match(name)
            if m:
                if not stage:
                    continue  # the challenge's test nodes are unlabelled
                if stage.lower() not in CLASSES:
                    raise WsiNcmiError(f"{path}:{lineno}: slide label '{stage}' is not one of {', '.join(CLASSES)}")
                pid = int(m.group(2))
                if m.group(1) in seen:
                    if seen[m.group(1)] != stage.lower():
                        raise WsiNcmiError(f"{path}:{lineno}: {m.group(1)} is listed again with label '{stage}' "
                                           f"(first '{seen[m.group(1)]}'); keep the one correct row")
                    continue
                seen[m.group(1)] = stage.lower()
                slides.append(SlideRecord(m.group(1), CLASSES.index(stage.lower()), patient=f"patient_{pid:03d}",
                                          centre=pid // 20))
            elif _PATIENT.match(name):
                if stage and stage not in PN_STAGES:
                    raise WsiNcmiError(f"{path}:{lineno}: pN stage '{stage}' is not one of {', '.join(PN_STAGES)}")
                if stage:
                    patients[f"patient_{int(_PATIENT.match(name).group(1)):03d}"] = stage
            else:
                raise WsiNcmiError(f"{path}:{lineno}: '{name}' is neither patient_XXX.zip nor patient_XXX_node_Y.tif")
    if not slides:
        raise WsiNcmiError(f"{path}: no labelled node rows (patient_XXX_node_Y.tif,<label>)")
    for s in slides:
        if s.centre >= 3:
            s.split = "test"
    stratified_val([s for s in slides if s.centre < 3], val_fraction, split_seed)
    task = Task("camelyon17", CLASSES, slides, str(path))
    task.patient_stages = patients  # type: ignore[attr-defined]
    return task.check()
