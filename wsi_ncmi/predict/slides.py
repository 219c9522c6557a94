"""What ``predict`` was given: slide files and folders, feature files and folders, and paths that
are gone.

Why per input: one moved slide must not stop a cohort. A path that no longer exists is reported
as a failure of its own and the rest goes on (``extract`` would refuse the whole list).
A folder holding ``.h5`` files is a features folder (``wsi-ncmi extract --out``); any other folder
is searched for slides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Failure:
    slide_id: str
    path: str
    reason: str          # short stable code: missing, settings-mismatch, unreadable, dimension, heatmap, ...
    message: str         # one line naming the file and the fix


@dataclass
class Inputs:
    slides: list[str] = field(default_factory=list)      # slide files and folders, for extraction
    features: list[Path] = field(default_factory=list)   # .h5 feature files, scored as they are
    failures: list[Failure] = field(default_factory=list)


def sort_inputs(inputs: list[str]) -> Inputs:
    got = Inputs()
    for item in inputs:
        p = Path(item)
        if not p.exists():
            got.failures.append(Failure(p.stem, str(p), "missing", f"{p}: no such file or folder (moved or deleted?); "
                                                                   "pass its new location"))
        elif p.is_file() and p.suffix.lower() == ".h5":
            got.features.append(p)
        elif p.is_dir() and any(p.glob("*.h5")):
            got.features += sorted(p.glob("*.h5"))
        else:
            got.slides.append(str(p))
    return got
