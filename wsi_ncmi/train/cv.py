"""``--folds K``: train and evaluate every fold, then pool the out-of-fold predictions.

Why pooling as well as mean +/- std: with small cohorts a fold's test set holds a handful of slides
of a rare class, so per-fold macro-F1 and AUC are noisy and their mean is biased (a fold missing a
class averages over fewer classes). The out-of-fold predictions of the K folds cover every slide of
the CV pool exactly once per seed, so metrics on the pooled set use all of it, and its bootstrap
95% CIs resample those slides. Both are reported, plus the held-out test (mean +/- std over
folds x seeds) where the task has a fixed test set. How folds are formed: ``tasks/folds.py``.

Layout (besides the run's config.yaml, run.json)::

    folds.csv                 slide_id,patient,label,fold of the CV pool
    fold_<k>/                 like a run folder: seed_<s>/..., metrics.json, metrics.md (split "oof" = fold k)
    predictions_oof.csv       seed,fold,slide_id,label,pred,p_0..p_{C-1},logp_0..logp_{C-1}: every pool
                              slide once per seed
    metrics.json, metrics.md  pooled OOF (per seed, with CIs; mean +/- std over seeds), mean +/- std over
                              folds x seeds of oof / val / test
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.tasks.base import Task
from wsi_ncmi.tasks.folds import OOF, cv_pool, fold_assignment, fold_task
from wsi_ncmi.train.config import NCMI_PREDICT_BEFORE
from wsi_ncmi.train.metrics import bootstrap_ci, classification_metrics, mean_std
from wsi_ncmi.train.run import (EVALUATED, REPORTED, _patient_kappa, aggregate, evaluate_seeds, mean_std_of,
                                read_scores, train_seeds)

POOLED = ("macro_f1", "auc", "balanced_accuracy", "accuracy", "ece", "brier", "nll")

Plan = tuple[dict[str, int], list[Task], Task]   # assignment, one task per fold, the task itself


def plan_folds(cfg, task: Task) -> Plan:
    """The fold assignment and each fold's task (checked: every fold can be trained and selected on)."""
    assignment = fold_assignment(task, cfg.folds, cfg.split_seed)
    return assignment, [fold_task(task, assignment, k, cfg.val_fraction, cfg.split_seed)
                        for k in range(cfg.folds)], task


def _write_folds(path: Path, plan: Plan) -> None:
    assignment, _, task = plan
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient", "label", "fold"])
        for s in sorted(cv_pool(task), key=lambda s: (assignment[s.slide_id], s.slide_id)):
            w.writerow([s.slide_id, s.patient, task.classes[s.label], assignment[s.slide_id]])


def _refuse_other_folds(run: Path, plan: Plan) -> None:
    """``evaluate`` scores each fold's models on that fold's own slides: folds drawn differently now
    (another wsi-ncmi version, an edited label file) would score training slides as out-of-fold."""
    f = run / "folds.csv"
    try:
        with open(f, newline="") as fh:
            trained = {r["slide_id"]: int(r["fold"]) for r in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError, TypeError):
        raise WsiNcmiError(f"{f}: missing or unreadable, so the folds this run was trained on are unknown; train "
                           "the run again with --overwrite") from None
    if trained != plan[0]:
        raise WsiNcmiError(f"{run}: the folds drawn now differ from those in {f}, so out-of-fold slides would include "
                           "training slides; evaluate with the wsi-ncmi version and label file of the training")


def _finished(fdir: Path, seeds: list[int]) -> list[dict] | None:
    """A fold's per-seed metrics when every seed of this run finished there, else None."""
    files = [fdir / f"seed_{s}" / "metrics.json" for s in seeds]
    if not (fdir / "metrics.json").is_file() or not all(f.is_file() for f in files):
        return None
    return [json.loads(f.read_text()) for f in files]


def train_folds(cfg, plan: Plan, store, out: Path, w, ddp, seeds: list[int]) -> dict:
    """Train every fold into ``out/fold_<k>`` (``--resume`` keeps finished folds and seeds)."""
    if w.is_main:
        _write_folds(out / "folds.csv", plan)
    per_fold = []
    for k, ftask in enumerate(plan[1]):
        fdir = out / f"fold_{k}"
        done = _finished(fdir, seeds) if cfg.resume else None
        if done is not None:
            print(f"fold {k}: already finished, kept", flush=True)
            per_fold.append(done)
            continue
        fdir.mkdir(parents=True, exist_ok=True)
        if w.is_main:
            print(f"fold {k + 1}/{cfg.folds}: train/val/oof/test {len(ftask.split('train'))}/"
                  f"{len(ftask.split('val'))}/{len(ftask.split(OOF))}/{len(ftask.split('test'))}", flush=True)
        per_seed = train_seeds(cfg, ftask, store, fdir, w, ddp, seeds)
        if w.is_main:
            aggregate(per_seed, cfg, ftask, fdir)
        per_fold.append(per_seed)
    return aggregate_folds(per_fold, cfg, plan, out, out) if w.is_main else {}


def evaluate_folds(cfg, plan: Plan, store, run: Path) -> dict:
    """``evaluate`` of a fold run: every fold's seeds re-scored into ``run/evaluate/fold_<k>/``, pooled there."""
    _refuse_other_folds(run, plan)
    out = run / "evaluate"
    per_fold = []
    for k, ftask in enumerate(plan[1]):
        fout = out / f"fold_{k}"
        per_seed = evaluate_seeds(cfg, ftask, store, run / f"fold_{k}", fout)
        aggregate(per_seed, cfg, ftask, fout)
        per_fold.append(per_seed)
    return aggregate_folds(per_fold, cfg, plan, out, out)   # pool the re-scored predictions


def _read_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise WsiNcmiError(f"{path}: missing; finish the run with `wsi-ncmi train ... --resume`")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def pool_oof(plan: Plan, root: Path, seeds: list[int], num_classes: int) -> dict[int, dict]:
    """Per seed, the out-of-fold predictions of every fold under ``root``: {seed: {ids, fold, y, pred, scores}}.
    Refuses a pool that does not cover every CV slide exactly once (a fold folder edited by hand)."""
    assignment = plan[0]
    pooled = {}
    for seed in seeds:
        ids, folds, y, pred, scores, logs = [], [], [], [], [], []
        for k in range(len(plan[1])):
            for r in _read_predictions(root / f"fold_{k}" / f"seed_{seed}" / f"predictions_{OOF}.csv"):
                ids.append(r["slide_id"])
                folds.append(k)
                y.append(int(r["label"]))
                pred.append(int(r["pred"]))
                p, lp = read_scores(r, num_classes)
                scores.append(p)
                logs.append(lp)
        wrong = [i for i, k in zip(ids, folds) if assignment.get(i) != k]
        if len(ids) != len(set(ids)) or set(ids) != set(assignment) or wrong:
            raise WsiNcmiError(f"{root}: the out-of-fold predictions of seed {seed} do not cover the "
                               f"{len(assignment)} slides of folds.csv once each; train the run again with --overwrite")
        pooled[seed] = {"ids": ids, "fold": folds, "y": np.array(y), "pred": np.array(pred),
                        "scores": np.array(scores, dtype=np.float64), "log_scores": np.array(logs, dtype=np.float64)}
    return pooled


def _write_pooled(path: Path, pooled: dict[int, dict], num_classes: int) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seed", "fold", "slide_id", "label", "pred"] + [f"p_{c}" for c in range(num_classes)]
                   + [f"logp_{c}" for c in range(num_classes)])
        for seed, o in pooled.items():
            for i, sid in enumerate(o["ids"]):
                w.writerow([seed, o["fold"][i], sid, int(o["y"][i]), int(o["pred"][i])]
                           + [f"{v:.9g}" for v in o["scores"][i]] + [f"{v:.17g}" for v in o["log_scores"][i]])


def aggregate_folds(per_fold: list[list[dict]], cfg, plan: Plan, out: Path, root: Path) -> dict:
    """Top-level metrics of a fold run (``root`` holds the fold folders whose predictions are pooled)."""
    assignment, ftasks, task = plan
    C = task.num_classes
    seeds = [m["seed"] for m in per_fold[0]]
    flat = [m for fold in per_fold for m in fold]
    pooled = pool_oof(plan, root, seeds, C)
    _write_pooled(out / "predictions_oof.csv", pooled, C)
    per_seed = []
    for seed, o in pooled.items():
        m = {"seed": seed, **classification_metrics(o["y"], o["pred"], o["scores"], C, log_scores=o["log_scores"])}
        m["ci95"] = bootstrap_ci(o["y"], o["pred"], o["scores"], C, n=cfg.bootstrap, seed=seed,
                                 log_scores=o["log_scores"])
        pk = _patient_kappa(task, o)
        if pk:
            m["patient_pn"] = pk
        per_seed.append(m)
    summary = {k: dict(zip(("mean", "std"), mean_std([m[k] for m in per_seed]))) for k in POOLED}
    if all("patient_pn" in m for m in per_seed):
        summary["patient_qwk"] = dict(zip(("mean", "std"), mean_std([m["patient_pn"]["qwk"] for m in per_seed])))
    pool = [s for s in task.slides if s.slide_id in assignment]
    agg: dict = {"task": task.name, "model": cfg.model, "loss": cfg.loss, "seeds": seeds, "classes": task.classes,
                 "folds": cfg.folds, "split_seed": cfg.split_seed,
                 "design": f"{cfg.folds}-fold cross-validation, whole patients, stratified by class, over "
                           + ("the slides outside the fixed test set" if task.fixed_test else "every slide"),
                 "counts": {"pool": [sum(s.label == c for s in pool) for c in range(C)],
                            "test": task.counts()["test"] if task.fixed_test else [0] * C,
                            "folds": [f.counts()[OOF] for f in ftasks]},
                 "notes": task.notes, "oof_pooled": {**summary, "n": len(assignment), "per_seed": per_seed}}
    if any("ncmi_predict" in m for m in flat):   # NCMI: each fold x seed model's prediction rule
        agg["ncmi_predict"] = {f"fold_{k}": [m.get("ncmi_predict", NCMI_PREDICT_BEFORE) for m in fold]
                               for k, fold in enumerate(per_fold)}
    for sp in EVALUATED:
        if all(sp in m for m in flat):
            agg[sp] = mean_std_of(flat, sp)
    (out / "metrics.json").write_text(json.dumps(agg, indent=2))
    (out / "metrics.md").write_text(_markdown(agg, cfg, task, len(flat)))
    return agg


def _markdown(agg: dict, cfg, task: Task, runs: int) -> str:
    cell = lambda d, k: f"{d[k]['mean']:.3f} ± {d[k]['std']:.3f}" if k in d else "–"
    p = agg["oof_pooled"]
    lines = [f"# {task.name}: {cfg.model} trained with {cfg.loss}, {agg['design']} "
             f"({cfg.folds} folds x {len(agg['seeds'])} seed{'s' * (len(agg['seeds']) > 1)})", "",
             "| estimate | macro-F1 | AUC | balanced acc. | accuracy | ECE | Brier | NCMI |",
             "|---|---|---|---|---|---|---|---|",
             f"| pooled out-of-fold, {p['n']} slides (mean ± std over seeds) | "
             + " | ".join(cell(p, k) for k in REPORTED) + " |"]
    names = {"oof": "out-of-fold", "val": "validation", "test": "held-out test"}
    for sp in ("oof", "test", "val"):
        if sp in agg:
            lines.append(f"| {names[sp]} (mean ± std over {runs} folds x seeds) | "
                         + " | ".join(cell(agg[sp], k) for k in REPORTED) + " |")
    if "patient_qwk" in p:
        lines += ["", f"CAMELYON-17 patient pN-stage quadratic-weighted kappa, pooled out-of-fold: {cell(p, 'patient_qwk')}"
                  + (f"; held-out test: {cell(agg['test'], 'patient_qwk')}" if "patient_qwk" in agg.get("test", {})
                     else "")]
    lines += ["", "Pooled out-of-fold, bootstrap 95% CIs:", "",
              "| seed | macro-F1 (95% CI) | AUC (95% CI) | balanced acc. (95% CI) |", "|---|---|---|---|"]
    for m in p["per_seed"]:
        ci = m["ci95"]
        lines.append(f"| {m['seed']} | " + " | ".join(f"{m[k]:.3f} ({ci[k][0]:.3f}-{ci[k][1]:.3f})"
                                                      for k in ("macro_f1", "auc", "balanced_accuracy")) + " |")
    c = agg["counts"]
    lines += ["", "Class counts per fold (out-of-fold slides): " + "; ".join(
        f"fold {k}: " + "/".join(str(v) for v in f) for k, f in enumerate(c["folds"])) + f" ({', '.join(task.classes)})"]
    if task.fixed_test:
        lines.append("Held-out test: " + "/".join(str(v) for v in c["test"]))
    if "ncmi_predict" in agg:
        lines.append("NCMI prediction rule per fold (seeds in order): " + "; ".join(
            f"{f} {', '.join(r)}" for f, r in agg["ncmi_predict"].items()))
    lines.append("Per fold: fold_*/metrics.md; predictions: predictions_oof.csv; assignment: folds.csv")
    return "\n".join(lines) + "\n"
