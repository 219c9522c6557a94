"""Tasks as code: labels, classes and splits from each dataset's own files."""

from __future__ import annotations

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks.base import SlideRecord, Task
from wsi_ncmi.tasks.bracs import load_bracs
from wsi_ncmi.tasks.camelyon17 import load_camelyon17, pn_stage
from wsi_ncmi.tasks.csvtask import load_csv_task

TASKS = ("camelyon17", "bracs", "bracs3", "csv")


def load_task(name: str, labels: str | None = None, slides: str | None = None, val_fraction: float = 0.1,
              split_seed: int = 0, test_fold: int = 0, allow_patient_overlap: bool = False) -> Task:
    if name == "camelyon17":
        if not labels:
            raise WsiNcmiError("task camelyon17 needs --labels stage_labels.csv (the challenge's label file)")
        return load_camelyon17(labels, val_fraction, split_seed)
    if name in ("bracs", "bracs3"):
        return load_bracs(slides, labels, three_class=name == "bracs3", allow_patient_overlap=allow_patient_overlap)
    if name == "csv":
        return load_csv_task(labels, val_fraction, split_seed, test_fold, allow_patient_overlap)
    raise WsiNcmiError(f"unknown task '{name}'; choose one of {', '.join(TASKS)}")


__all__ = ["TASKS", "SlideRecord", "Task", "load_task", "pn_stage"]
