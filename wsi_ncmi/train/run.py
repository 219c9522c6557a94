"""``wsi-ncmi train`` / ``evaluate``: task -> bags -> one Trainer per seed -> run folder.

Run folder::

    config.yaml                   resolved settings (absolute paths)
    features.json                 extraction settings of the features (what `predict` extracts with)
    run.json, .train.lock         identity of the run, lock while training (see runfolder.py)
    seed_<s>/best.pt, last.pt     checkpoints (best on validation; last for --resume)
    seed_<s>/history.csv          per-epoch loss, validation metrics and NCMI diagnostics
    seed_<s>/predictions_<split>.csv   slide_id,label,pred,p_0..p_{C-1},attention_entropy
    seed_<s>/metrics.json         per split: macro-F1, AUC, balanced acc., acc., per-class F1,
                                  confusion, NCMI; test bootstrap 95% CIs; CAMELYON-17 patient QWK
    seed_<s>/curves.png, test_confusion_roc.png
    metrics.json, metrics.md      mean +/- std over seeds

With ``--folds K`` (default off: the task's single split) each fold is trained into ``fold_<k>/``,
laid out as above, and the top level pools them (``train/cv.py``; folds: ``tasks/folds.py``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from wsi_ncmi.distributed import finish, gather, start, world
from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.store.provenance import write_run_provenance
from wsi_ncmi.tasks import load_task, pn_stage
from wsi_ncmi.tasks.base import Task
from wsi_ncmi.train.checkpoint import save_checkpoint
from wsi_ncmi.train.config import NCMI_PREDICT_BEFORE, TrainConfig
from wsi_ncmi.train.data import BagStore, FeatureSource
from wsi_ncmi.train.lr_search import adopt_trial, choose_lr, recorded_lr
from wsi_ncmi.train.metrics import bootstrap_ci, mean_std, quadratic_kappa
from wsi_ncmi.train.padding import padding_warning
from wsi_ncmi.train.runfolder import (absolute_paths, load_run_config, open_run, refuse_changed_task,
                                      refuse_while_training, releases_run_lock)
from wsi_ncmi.train.scoring import saved_score_spread
from wsi_ncmi.train.trainer import Trainer

REPORTED = ("macro_f1", "auc", "balanced_accuracy", "accuracy", "ece", "brier", "ncmi")
EVALUATED = ("val", "oof", "test")    # "oof": a cross-validation fold's own slides (tasks/folds.py)


def mean_std_of(per_seed: list[dict], sp: str) -> dict:
    """{metric: {mean, std}} of split ``sp`` over per-seed metrics (and CAMELYON-17's patient QWK)."""
    out = {k: dict(zip(("mean", "std"), mean_std([m[sp].get(k) for m in per_seed]))) for k in REPORTED}
    if all("patient_pn" in m[sp] for m in per_seed):
        out["patient_qwk"] = dict(zip(("mean", "std"), mean_std([m[sp]["patient_pn"]["qwk"] for m in per_seed])))
    return out


def prepare(cfg: TrainConfig) -> tuple[Task, BagStore, list[str]]:
    """Load the task and check every listed slide has features (or drop them if allowed)."""
    task = load_task(cfg.task, cfg.labels, cfg.slides, cfg.val_fraction, cfg.split_seed, cfg.test_fold,
                     cfg.allow_patient_overlap)
    source = FeatureSource(cfg.features)
    missing = [s.slide_id for s in task.slides if not source.has(s.slide_id)]
    if missing:
        if not cfg.allow_missing or len(missing) == len(task.slides):
            where = source.cohort.path if source.cohort is not None else source.root
            raise WsiNcmiError(
                f"{where}: {len(missing)} of {len(task.slides)} slides listed in {task.source} have no features "
                f"(first: {', '.join(missing[:3])}); extract them, or pass --allow-missing to train without them")
        task.slides = [s for s in task.slides if s.slide_id not in set(missing)]
        task.notes.append(f"trained without {len(missing)} slides that have no features: {', '.join(missing)}")
        print(f"warning: {task.notes[-1]}")
        task.check()
    for note in task.warnings():
        task.notes.append(note)
        print(f"warning: {note}")
    store = BagStore(source, [s.slide_id for s in task.slides], cfg.ram_gb)
    store.check_all(cfg.progress)
    return task, store, missing


def _write_predictions(path: Path, o: dict, classes: list[str]) -> None:
    """One row per slide: label, prediction, class probabilities ``p_k`` and their float64 logs
    ``logp_k``. Why both: a confident NCMI score underflows to p = 0 or 1 in many rows, which ties
    slides that the log scores still rank, so anything re-scored from this file (paired comparisons,
    pooled out-of-fold metrics) ranks by ``logp_k`` (``read_scores``)."""
    C, logs = len(classes), o["log_scores"].numpy()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "label", "pred"] + [f"p_{k}" for k in range(C)] + [f"logp_{k}" for k in range(C)]
                   + ["attention_entropy"])
        for i, sid in enumerate(o["ids"]):
            w.writerow([sid, int(o["y"][i]), int(o["pred"][i])] + [f"{float(v):.9g}" for v in o["scores"][i]]
                       + [f"{float(v):.17g}" for v in logs[i]] + [f"{o['entropy'][i]:.4f}"])


def read_scores(row: dict, num_classes: int) -> tuple[list[float], list[float]]:
    """(probabilities, log scores) of one predictions row; files written before ``logp_k`` existed
    give the log of the probabilities."""
    p = [float(row[f"p_{k}"]) for k in range(num_classes)]
    if f"logp_{num_classes - 1}" in row:
        return p, [float(row[f"logp_{k}"]) for k in range(num_classes)]
    return p, [float(np.log(max(v, 1e-300))) for v in p]


def _patient_kappa(task: Task, o: dict) -> dict | None:
    """CAMELYON-17: pN stage of each patient with all five nodes predicted, and the QWK."""
    if task.name != "camelyon17":
        return None
    from wsi_ncmi.tasks.camelyon17 import PN_STAGES

    rec = {s.slide_id: s for s in task.slides}
    pred_nodes: dict[str, list[int]] = {}
    true_nodes: dict[str, list[int]] = {}
    for i, sid in enumerate(o["ids"]):
        p = rec[sid].patient
        pred_nodes.setdefault(p, []).append(int(o["pred"][i]))
        true_nodes.setdefault(p, []).append(int(o["y"][i]))
    pats = sorted(p for p, v in pred_nodes.items() if len(v) == 5)
    if len(pats) < 2:
        return None
    stages = getattr(task, "patient_stages", {})
    t = [PN_STAGES.index(stages.get(p, pn_stage(true_nodes[p]))) for p in pats]
    q = [PN_STAGES.index(pn_stage(pred_nodes[p])) for p in pats]
    return {"patients": len(pats), "qwk": quadratic_kappa(t, q)}


def write_seed_outputs(trainer: Trainer, scores: dict[str, dict], out: Path) -> dict:
    from wsi_ncmi.viz.curves import plot_confusion_roc, plot_history

    task, cfg = trainer.task, trainer.cfg
    metrics: dict = {"seed": trainer.seed, "best_epoch": trainer.best["epoch"] + 1}
    for sp, o in scores.items():
        _write_predictions(out / f"predictions_{sp}.csv", o, task.classes)
        metrics[sp] = o["metrics"]
        if o["scorer"].kind == "centroid":
            metrics[sp]["score_temperature"] = o["scorer"].tau
            metrics["ncmi_predict"] = o["scorer"].rule
    save_checkpoint(next(iter(scores.values()))["scorer"].state(), out / "scoring.pt")   # single-slide scoring
    if "test" in scores:
        t = scores["test"]
        metrics["test"]["ci95"] = bootstrap_ci(t["y"].numpy(), t["pred"].numpy(), t["scores"].numpy(),
                                               task.num_classes, n=cfg.bootstrap, seed=trainer.seed,
                                               log_scores=t["log_scores"].numpy())
        pk = _patient_kappa(task, t)
        if pk:
            metrics["test"]["patient_pn"] = pk
        plot_confusion_roc(t["y"].numpy(), t["scores"].numpy(), t["metrics"]["confusion"], task.classes,
                           out / "test_confusion_roc.png", f"{cfg.model} / {cfg.loss} / seed {trainer.seed}: test")
    if trainer.history:
        with open(out / "history.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(trainer.history[0]))
            w.writeheader()
            w.writerows(trainer.history)
        plot_history(trainer.history, out / "curves.png", f"{cfg.model} / {cfg.loss} / seed {trainer.seed}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def aggregate(per_seed: list[dict], cfg: TrainConfig, task: Task, out: Path) -> dict:
    agg: dict = {"task": task.name, "model": cfg.model, "loss": cfg.loss, "seeds": [m["seed"] for m in per_seed],
                 "classes": task.classes, "counts": task.counts(), "notes": task.notes}
    for sp in EVALUATED:
        if all(sp in m for m in per_seed):
            agg[sp] = mean_std_of(per_seed, sp)
    if any("ncmi_predict" in m for m in per_seed):     # NCMI: each model's prediction rule (--ncmi-predict)
        agg["ncmi_predict"] = [m.get("ncmi_predict", NCMI_PREDICT_BEFORE) for m in per_seed]
    (out / "metrics.json").write_text(json.dumps(agg, indent=2))
    lines = [f"# {task.name}: {cfg.model} trained with {cfg.loss} ({len(per_seed)} seed{'s' * (len(per_seed) > 1)})", "",
             "| split | macro-F1 | AUC | balanced acc. | accuracy | ECE | Brier | NCMI |",
             "|---|---|---|---|---|---|---|---|"]
    for sp in EVALUATED:
        if sp in agg:
            cells = [f"{agg[sp][k]['mean']:.3f} ± {agg[sp][k]['std']:.3f}" for k in REPORTED]
            lines.append(f"| {sp} | " + " | ".join(cells) + " |")
    if "test" in agg and "patient_qwk" in agg["test"]:
        q = agg["test"]["patient_qwk"]
        lines += ["", f"CAMELYON-17 patient pN-stage quadratic-weighted kappa (test): {q['mean']:.3f} ± {q['std']:.3f}"]
    if any("test" in m for m in per_seed):
        lines += ["", "| seed | best epoch | test macro-F1 (95% CI) | test AUC (95% CI) |", "|---|---|---|---|"]
    for m in per_seed:
        if "test" in m:
            t, ci = m["test"], m["test"]["ci95"]
            lines.append(f"| {m['seed']} | {m['best_epoch']} | {t['macro_f1']:.3f} ({ci['macro_f1'][0]:.3f}-{ci['macro_f1'][1]:.3f}) "
                         f"| {t['auc']:.3f} ({ci['auc'][0]:.3f}-{ci['auc'][1]:.3f}) |")
    if "ncmi_predict" in agg:
        how = "chosen on validation macro-F1" if cfg.ncmi_predict == "auto" else f"--ncmi-predict {cfg.ncmi_predict}"
        lines += ["", f"NCMI prediction rule per seed ({how}): " + ", ".join(
            f"seed {m['seed']} {r}" for m, r in zip(per_seed, agg["ncmi_predict"]))]
    splits = [sp for sp in ("train", "val", "oof", "test") if sp in agg["counts"]]
    lines += ["", f"Class counts ({' / '.join(splits)}): " + "; ".join(
        f"{c}: " + "/".join(str(agg['counts'][sp][k]) for sp in splits) for k, c in enumerate(task.classes))]
    lines += ["Pictures: seed_*/curves.png (loss, validation metrics, NCMI vs accuracy), seed_*/test_confusion_roc.png"]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    return agg


def train_seeds(cfg: TrainConfig, task: Task, store: BagStore, out: Path, w, ddp, seeds: list[int]) -> list[dict]:
    """Train ``seeds`` of one task into ``out`` (a run folder, or a fold folder of one); ``--resume``
    keeps finished seeds. Under torchrun every rank returns every seed's metrics."""
    lr = None
    if cfg.lr == "auto":             # seeds in parallel: rank 0 searches while the others wait
        if ddp or w.is_main:
            lr = choose_lr(cfg, task, store, out, ddp, w.is_main)
        if w.distributed:
            gather(w, None)
            lr = recorded_lr(cfg, out)
    mine = seeds if ddp or not w.distributed else w.share(seeds)
    if w.distributed and not ddp and not mine:
        print(f"rank {w.rank}: no seed left for this rank ({len(seeds)} seeds over {w.size} ranks)", flush=True)
    per_seed = []
    for seed in mine:
        sdir = out / f"seed_{seed}"
        if cfg.resume and (sdir / "metrics.json").exists():
            per_seed.append(json.loads((sdir / "metrics.json").read_text()))
            print(f"seed {seed}: already finished, kept")
            continue
        scfg = cfg
        if lr is not None:           # --lr auto: train at the chosen rate; the first seed continues its trial
            adopted = seed == cfg.seed and w.is_main and adopt_trial(out, lr, seed, sdir)
            scfg = replace(cfg, lr=lr, resume=cfg.resume or adopted)
        trainer = Trainer(scfg, task, store, seed, sdir, ddp)
        trainer.fit()
        if trainer.is_main:
            per_seed.append(write_seed_outputs(trainer, trainer.final_scores(), sdir))
    if w.distributed:
        per_seed = sorted((m for part in gather(w, per_seed) for m in part), key=lambda m: m["seed"])
    return per_seed


@releases_run_lock
def run_training(cfg: TrainConfig) -> dict:
    """Train every seed and aggregate. Under torchrun: seeds are shared out one per rank (rank r
    trains seeds r, r + world, ...) and rank 0 gathers them into the one report; a single seed on
    several ranks is trained data-parallel instead (disjoint bags per rank, averaged gradients)."""
    cfg.validate()
    w = world()
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    ddp = w if w.distributed and len(seeds) == 1 else None
    if w.distributed:
        cfg = replace(cfg, device=w.device(cfg.device), progress=cfg.progress and w.is_main)
        start(w)
    cfg = absolute_paths(cfg)
    out = Path(cfg.out)
    task, store, _ = prepare(cfg)
    plan = None
    if cfg.folds:                   # a fold no model can be trained on is refused before anything is written
        from wsi_ncmi.train.cv import plan_folds, train_folds

        plan = plan_folds(cfg, task)
    open_run(cfg, task, store, w)   # identity check, lock, run.json: before anything is written
    if w.is_main:
        cfg.save(out / "config.yaml")
        write_run_provenance(out, cfg.features, [s.slide_id for s in task.slides])   # what `predict` extracts with
        if note := padding_warning(cfg, task, store):
            print(note, flush=True)
        mode = (f"; {w.size} ranks, data-parallel" if ddp else f"; {w.size} ranks, seeds in parallel") \
            if w.distributed else ""
        design = (f"{cfg.folds}-fold cross-validation over {sum(len(f.split('oof')) for f in plan[1])} slides, "
                  + (f"held-out test {len(task.split('test'))}" if task.fixed_test else "no held-out test")) \
            if plan else (
                  f"train/val/test {len(task.split('train'))}/{len(task.split('val'))}/{len(task.split('test'))}")
        print(f"{task.name}: {len(task.slides)} slides, classes {task.classes}, {design}; features "
              f"{store.source.kind} ({store.dim}-d){mode}", flush=True)
    if plan:
        agg = train_folds(cfg, plan, store, out, w, ddp, seeds)
    else:
        per_seed = train_seeds(cfg, task, store, out, w, ddp, seeds)     # every rank trains (its share)
        agg = aggregate(per_seed, cfg, task, out) if w.is_main else {}
    if w.is_main:
        print((out / "metrics.md").read_text())
    if w.distributed:
        agg = gather(w, agg)[0]
        finish(w)
    return agg


def run_evaluation(run: str | Path, features: str | None = None, labels: str | None = None,
                   slides: str | None = None, ncmi_predict: str | None = None) -> dict:
    """Re-score a trained run (e.g. on re-extracted features, or by another ``--ncmi-predict`` rule,
    which needs no training) into ``<run>/evaluate/``."""
    run = Path(run)
    cfg = load_run_config(run, features=features, labels=labels, slides=slides)
    if ncmi_predict:
        if cfg.loss != "ncmi":
            raise WsiNcmiError(f"--ncmi-predict: {run} was trained with {cfg.loss}, which predicts by the argmax of "
                               "its scores; the rule applies to ncmi runs only")
        cfg = replace(cfg, ncmi_predict=ncmi_predict).validate()
    refuse_while_training(run, "evaluate")
    cfg = replace(cfg, allow_patient_overlap=True)   # scoring a trained model: overlap was settled at training
    task, store, _ = prepare(cfg)
    refuse_changed_task(run, cfg, task)
    if cfg.folds:
        from wsi_ncmi.train.cv import evaluate_folds, plan_folds

        agg = evaluate_folds(cfg, plan_folds(cfg, task), store, run)
    else:
        agg = aggregate(evaluate_seeds(cfg, task, store, run, run / "evaluate"), cfg, task, run / "evaluate")
    print((run / "evaluate" / "metrics.md").read_text())
    return agg


def evaluate_seeds(cfg: TrainConfig, task: Task, store: BagStore, trained: Path, out: Path) -> list[dict]:
    """Re-score every seed trained in ``trained`` (a run folder or a fold folder) into ``out``."""
    cfg = replace(cfg, lr=recorded_lr(cfg, trained))
    per_seed = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        sdir = trained / f"seed_{seed}"
        if not (sdir / "best.pt").exists():
            raise WsiNcmiError(f"{sdir}: no best.pt; finish training with `wsi-ncmi train ... --resume`")
        trainer = Trainer(cfg, task, store, seed, sdir)
        trainer.score_spread = saved_score_spread(sdir)    # a run scored before the pooled score keeps its own
        edir = out / f"seed_{seed}"
        edir.mkdir(parents=True, exist_ok=True)
        trainer.history = []
        per_seed.append(write_seed_outputs(trainer, trainer.final_scores(), edir))
    return per_seed
