"""BRACS: BReAst Carcinoma Subtyping, 547 WSIs, official split train 395 / val 65 / test 87.

Pinto et al. (2022), "BRACS: A Dataset for BReAst Carcinoma Subtyping in H&E Histology Images",
Database, arXiv:2111.04740. Labels come from the official folder layout
``BRACS_WSI/{train,val,test}/Group_{BT,AT,MT}/Type_{N,PB,UDH,FEA,ADH,DCIS,IC}/BRACS_*.svs`` or from a CSV
(``slide_id`` + ``label`` (index or type name) + ``split``/``split_info``, as published with ACMIL).
A CSV's ``case_id`` (or ``patient``) column is the patient: one patient in two splits is an error
naming it (``allow_patient_overlap`` proceeds), and so is one slide in two split folders.
7 classes; ``bracs3`` maps {N, PB, UDH} -> benign, {FEA, ADH} -> atypical, {DCIS, IC} -> malignant.
"""

from __future__ import annotations

import csv
from pathlib import Path

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks.base import SPLITS, SlideRecord, Task, refuse_patient_overlap

TYPES = ["N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC"]
THREE = ["benign", "atypical", "malignant"]
TO_THREE = {"N": 0, "PB": 0, "UDH": 0, "FEA": 1, "ADH": 1, "DCIS": 2, "IC": 2}
_EXT = {".svs", ".tif", ".tiff", ".ndpi"}


def _from_folders(root: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    where: dict[str, Path] = {}
    for sp in SPLITS:
        base = root / sp
        if not base.is_dir():
            continue
        for f in sorted(base.glob("Group_*/Type_*/*")):
            if f.suffix.lower() in _EXT:
                if f.stem in where:
                    raise WsiNcmiError(f"{root}: slide {f.stem} is in two places ({where[f.stem].relative_to(root)} "
                                       f"and {f.relative_to(root)}); keep the copy in its official split folder "
                                       "and remove the other")
                where[f.stem] = f
                rows.append((f.stem, f.parent.name.removeprefix("Type_"), sp, ""))
    if not rows:
        raise WsiNcmiError(f"{root}: no slides in the BRACS layout {{train,val,test}}/Group_*/Type_*/*.svs; "
                           "pass the BRACS_WSI folder with --slides or a label CSV with --labels")
    return rows


def _from_csv(path: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        split_col = "split" if "split" in cols else "split_info" if "split_info" in cols else None
        if "slide_id" not in cols or "label" not in cols or split_col is None:
            raise WsiNcmiError(f"{path}: BRACS CSV needs columns slide_id, label and split (or split_info)")
        for lineno, r in enumerate(reader, start=2):
            lab = r["label"].strip()
            if lab.isdigit():
                if int(lab) >= len(TYPES):
                    raise WsiNcmiError(f"{path}:{lineno}: label {lab} is not a BRACS class index 0-6")
                lab = TYPES[int(lab)]
            patient = (r.get("case_id") or r.get("patient") or "").strip()
            rows.append((r["slide_id"].strip(), lab, r[split_col].strip().lower(), patient))
    return rows


def load_bracs(slides: str | Path | None = None, labels: str | Path | None = None, three_class: bool = False,
               allow_patient_overlap: bool = False) -> Task:
    if labels:
        src = Path(labels)
        if not src.is_file():
            raise WsiNcmiError(f"{src}: BRACS label CSV not found")
        rows = _from_csv(src)
    elif slides:
        src = Path(slides)
        rows = _from_folders(src)
    else:
        raise WsiNcmiError("task bracs needs --slides BRACS_WSI/ (official layout) or --labels bracs.csv")
    records = []
    for sid, typ, sp, patient in rows:
        if typ not in TYPES:
            raise WsiNcmiError(f"{src}: slide {sid} has type '{typ}', not one of {', '.join(TYPES)}")
        if sp not in SPLITS:
            raise WsiNcmiError(f"{src}: slide {sid} has split '{sp}', not train/val/test")
        label = TO_THREE[typ] if three_class else TYPES.index(typ)
        records.append(SlideRecord(sid, label, sp, patient=patient or sid))
    notes = refuse_patient_overlap(records, str(src), allow_patient_overlap)
    return Task("bracs3" if three_class else "bracs", THREE if three_class else TYPES, records, str(src),
                notes=notes).check()
