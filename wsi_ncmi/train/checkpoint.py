"""Checkpoints that carry their own checksum, so a damaged file is an error, never a silent model.

Why: ``torch.load`` does not verify the tensor bytes it reads; a checkpoint with 2 KB overwritten
loads and predicts something else. ``save_checkpoint`` adds ``sha256``, a digest of the checkpoint's
content (tensors by dtype, shape and bytes; other values by ``repr``), computed independently of
the file format so it is the same after loading; the file stays a plain ``torch.save`` dict that
other tools can read. ``load_checkpoint`` recomputes it, and turns an unreadable or mismatching
file, or weights that do not fit the model (features of another dimension), into one
``WsiNcmiError`` naming the file and the fix. Checkpoints written before checksums load unchecked.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from wsi_ncmi.errors import WsiNcmiError

KEY = "sha256"


def _feed(h, o) -> None:
    if isinstance(o, torch.Tensor):
        t = o.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(o, np.ndarray):
        h.update(f"A{o.dtype}{o.shape}".encode())
        h.update(np.ascontiguousarray(o).tobytes())
    elif isinstance(o, dict):
        h.update(f"D{len(o)}".encode())
        for k, v in o.items():
            h.update(repr(k).encode())
            _feed(h, v)
    elif isinstance(o, (list, tuple)):
        h.update(f"{type(o).__name__[0]}{len(o)}".encode())
        for v in o:
            _feed(h, v)
    else:
        h.update(repr(o).encode())


def digest(obj: dict) -> str:
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != KEY})
    return h.hexdigest()


def save_checkpoint(obj: dict, path: Path) -> None:
    """Atomic (temporary file + rename) ``torch.save`` of ``obj`` plus its checksum."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**obj, KEY: digest(obj)}, tmp)
    os.replace(tmp, path)


def _fix(path: Path) -> str:
    return (f"restore it from a backup, or delete {path.parent} and rerun the training command with --resume "
            "to train that seed again")


def load_checkpoint(path: Path, device="cpu", model: torch.nn.Module | None = None,
                    objective: torch.nn.Module | None = None) -> dict:
    """Load and verify; with ``model`` / ``objective``, also load their weights from it."""
    path = Path(path)
    if not path.is_file():
        raise WsiNcmiError(f"{path}: checkpoint not found; {_fix(path)}")
    try:
        st = torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:  # truncated, zero bytes, not a zip, bad pickle: all mean "damaged"
        why = (str(exc).splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        raise WsiNcmiError(f"{path}: damaged checkpoint, cannot be read ({why}); {_fix(path)}") from None
    if not isinstance(st, dict):
        raise WsiNcmiError(f"{path}: not a wsi-ncmi checkpoint; {_fix(path)}")
    want = st.pop(KEY, None)
    if want is not None and digest(st) != want:
        raise WsiNcmiError(f"{path}: damaged checkpoint (its content does not match its checksum); {_fix(path)}")
    if model is not None:
        load_state(model, st["model"], path)
    if objective is not None:
        load_state(objective, st["objective"], path)
    return st


def load_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict`` whose shape mismatch names the checkpoint and the likely cause."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")
        raise WsiNcmiError(
            f"{path}: the weights do not fit the model built for these features ({detail[:160] or 'different model'}); "
            "the features probably come from another encoder (another dimension): pass --features with the "
            "extraction the run was trained on") from None
