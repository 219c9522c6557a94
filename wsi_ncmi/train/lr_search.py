"""``--lr auto``: the learning rate chosen per loss on validation, and recorded.

Why: the right step size of a MIL head depends on the loss, the aggregator and the feature scale
(one cohort's CE went from 0.38 to 0.85 macro-F1 between 2e-4 and 1e-3), and a comparison of losses
is only fair when each gets the same tuning budget. The search trains the first seed once per rate
of ``LR_GRID`` with the run's full recipe (schedule, early stopping, selection criterion), picks
the rate whose best epoch scores best on the validation criterion (never the test split; ties go
to the smaller rate), and writes ``lr_search.json`` (grid, criterion, every trial's value and best
epoch, the choice). Trials live in ``lr_search/lr_<rate>/seed_<s>/``; a killed search resumes from
the trials that finished. The chosen trial's folder becomes the first seed's folder, so the search
costs ``len(LR_GRID) - 1`` extra trainings of one seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from wsi_ncmi.train.trainer import Trainer

LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
SEARCH_DIR = "lr_search"
RECORD = "lr_search.json"


def trial_dir(out: Path, lr: float, seed: int) -> Path:
    return out / SEARCH_DIR / f"lr_{lr:g}" / f"seed_{seed}"


def choose_lr(cfg, task, store, out: Path, ddp=None, is_main: bool = True) -> float:
    """Train the first seed at every rate of the grid (resuming finished trials) and return the best."""
    record = out / RECORD
    if record.is_file():
        return float(json.loads(record.read_text())["chosen"])
    trials = []
    for lr in LR_GRID:
        sdir = trial_dir(out, lr, cfg.seed)
        done = sdir / "trial.json"
        if done.is_file():
            trials.append(json.loads(done.read_text()))
            print(f"lr search: {lr:g} already tried, kept", flush=True)
            continue
        print(f"lr search: seed {cfg.seed} at lr {lr:g} ({len(trials) + 1}/{len(LR_GRID)})", flush=True)
        trainer = Trainer(replace(cfg, lr=lr, resume=True), task, store, cfg.seed, sdir, ddp)
        trainer.fit()
        trial = {"lr": lr, "best_epoch": trainer.best["epoch"] + 1, "value": list(trainer.best["value"]),
                 "best_row": trainer.history[trainer.best["epoch"]] if 0 <= trainer.best["epoch"] < len(trainer.history)
                 else {}}
        if is_main:
            done.write_text(json.dumps(trial, indent=2))
        trials.append(trial)
    best = max(trials, key=lambda t: (t["value"], -t["lr"]))
    if is_main:
        record.write_text(json.dumps({"grid": list(LR_GRID), "criterion": cfg.select_metric, "seed": cfg.seed,
                                      "trials": trials, "chosen": best["lr"]}, indent=2))
        sign = -1.0 if cfg.select_metric == "loss" else 1.0     # the value of "loss" is the negated NLL
        tried = ", ".join(f"{t['lr']:g}: {sign * t['value'][0]:.4f}" for t in trials)
        print(f"lr search: chose {best['lr']:g} on validation {cfg.select_metric} ({tried})", flush=True)
    return float(best["lr"])


def recorded_lr(cfg, out: Path) -> float:
    """The rate a run trained with: its ``--lr``, or for ``auto`` the search's choice."""
    if cfg.lr != "auto":
        return float(cfg.lr)
    record = out / RECORD
    if not record.is_file():
        from wsi_ncmi.errors import WsiNcmiError

        raise WsiNcmiError(f"{record}: missing (the run used --lr auto); finish training with `wsi-ncmi train ... "
                           "--resume`")
    return float(json.loads(record.read_text())["chosen"])


def adopt_trial(out: Path, lr: float, seed: int, sdir: Path) -> bool:
    """Copy the chosen trial of ``seed`` to its seed folder (so it continues instead of retraining)."""
    src = trial_dir(out, lr, seed)
    if seed is None or not (src / "last.pt").is_file() or (sdir / "last.pt").exists():
        return False
    shutil.copytree(src, sdir, dirs_exist_ok=True)
    (sdir / "trial.json").unlink(missing_ok=True)
    return True
