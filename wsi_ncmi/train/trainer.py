"""Training one model with one seed: the epoch loop, model selection, checkpoints and scoring.

* AdamW + cosine schedule on the network; for NCMI with alternating centroids, a second optimizer
  (Adam) on the centroids, stepped right after the network on the same mini-batch.
* Each epoch: shuffled bags (order and sub-sampling drawn from a generator seeded by seed and
  epoch), then an eval-mode pass over val (metrics, NCMI diagnostics); NCMI's class-mean centroids
  come from the outputs of the training pass (``--ncmi-means running``) or from an eval-mode pass
  over train (``exact``). The best epoch on the validation criterion is kept (never the test split), and
  training stops after ``patience`` epochs without improvement, but never before ``min_epochs``.
  The criterion (``select_metric``) is compared with a tie-break: ``loss`` (the default, the
  validation NLL of the class scores: smooth, it moves with every slide's score rather than with
  the few slides that flip a macro-F1 on 60 bags), then macro-F1; ``auc`` then macro-F1;
  ``macro_f1`` then AUC. The choice was measured (benchmarks/recipe.py, README "Training recipe").
* ``last.pt`` (atomic) holds everything to continue, RNG states included, so a killed run resumed
  with ``--resume`` ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from wsi_ncmi.device import resolve_device
from wsi_ncmi.distributed import World, gather
from wsi_ncmi.errors import WsiNcmiError
from wsi_ncmi.losses import create_objective, ncmi_value
from wsi_ncmi.losses.pc_softmax import class_priors
from wsi_ncmi.mil.models import create_mil_model
from wsi_ncmi.tasks.base import SlideRecord, Task
from wsi_ncmi.train.checkpoint import load_checkpoint, save_checkpoint
from wsi_ncmi.train.config import TrainConfig
from wsi_ncmi.train.data import BagStore, collate
from wsi_ncmi.train.metrics import classification_metrics
from wsi_ncmi.train.scoring import Scorer, fit_scorer

_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIE_BREAK = {"loss": "macro_f1", "auc": "macro_f1", "macro_f1": "auc", "balanced_accuracy": "auc", "accuracy": "auc"}


def selection_value(metrics: dict, key: str) -> list[float]:
    """The validation criterion as a list compared lexicographically (higher is better): the metric
    (``loss`` = validation NLL, negated) then its tie-break. Non-finite values rank last."""
    def val(k: str) -> float:
        v = -metrics["nll"] if k == "loss" else metrics[k]
        return float(v) if np.isfinite(v) else -math.inf
    return [val(key), val(TIE_BREAK[key])]


def improves(new: list[float], best) -> bool:
    if not isinstance(best, list):              # runs checkpointed before the tie-break: a float
        best = [best, -math.inf]
    return new[0] > best[0] + 1e-9 or (abs(new[0] - best[0]) <= 1e-9 and new[1] > best[1] + 1e-9)


def resolve_train_device(cfg: TrainConfig) -> tuple[torch.device, str]:
    dev = resolve_device(cfg.device)
    prec = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    return dev, prec


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def fused_if_possible(optimizer, params, **kwargs) -> torch.optim.Optimizer:
    """``optimizer(params, fused=True, **kwargs)`` where torch has a fused kernel for the parameters'
    device (CPU since torch 2.4, CUDA), else the default implementation.

    Why: a MIL step on a CPU is small; the default per-tensor Adam took 4.3 ms of a 14 ms gated-ABMIL
    step on a 160-patch bag here, the fused one 1.1 ms, so an epoch runs about a fifth faster. Same
    update rule, different float rounding. On ``--resume`` a checkpoint keeps its update rule and
    moments, with this process's implementation (``load_optimizer_state``).
    """
    params = list(params)
    try:
        return optimizer(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):   # no fused kernel for this device or torch
        return optimizer(params, **kwargs)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)``, keeping ``opt``'s own implementation (fused or not).

    Why: the saved param groups carry the flags of the optimizer that wrote them, and would win. A
    run resumed on another device (``--device`` may change on resume) would then ask for a fused
    kernel that device lacks, and a run from before ``fused_if_possible`` would stay on the slow path.
    """
    groups = [dict(g, **{k: opt.defaults[k] for k in ("fused", "foreach") if k in opt.defaults})
              for g in state["param_groups"]]
    opt.load_state_dict(dict(state, param_groups=groups))


def average_gradients(opt: torch.optim.Optimizer) -> None:
    """Data-parallel step: mean of every rank's gradient (a rank with none contributes zeros)."""
    world = torch.distributed.get_world_size()
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def sync_buffers(module: torch.nn.Module) -> None:
    for b in module.buffers():
        torch.distributed.broadcast(b, 0)


class Trainer:
    score_spread = "pooled"   # NCMI's class scores; `evaluate` sets a trained seed's own (saved_score_spread)

    def __init__(self, cfg: TrainConfig, task: Task, store: BagStore, seed: int, out: Path, ddp: World | None = None):
        self.cfg, self.task, self.store, self.seed, self.out = cfg, task, store, seed, out
        self.ddp = ddp if ddp is not None and ddp.distributed else None
        self.device, self.precision = resolve_train_device(cfg)
        out.mkdir(parents=True, exist_ok=True)
        self.train_set = task.split("train")
        self.val_set = task.split("val")          # Task.check() refuses a task without one
        seed_everything(seed, cfg.deterministic)
        C = task.num_classes
        self.model = create_mil_model(cfg.model, store.dim, C, dropout=cfg.dropout).to(self.device)
        self.objective = create_objective(
            cfg.loss, C, self.model.embed_dim, [r.label for r in self.train_set], focal_gamma=cfg.focal_gamma,
            label_smoothing=cfg.label_smoothing, ncmi_space=cfg.ncmi_space, ncmi_centroids=cfg.ncmi_centroids,
            ncmi_temperature=cfg.ncmi_temperature, ncmi_weight=cfg.ncmi_weight, mi_weight=cfg.mi_weight,
            mi_window=cfg.mi_window, cmi_lambda=cfg.cmi_lambda, cmi_beta=cfg.cmi_beta,
            ncmi_separation=cfg.ncmi_separation, ncmi_centre=cfg.ncmi_centre).to(self.device)
        if self.objective.ncmi is not None:   # the centre's EMA remembers about one epoch of steps
            per_rank = -(-len(self.train_set) // (self.ddp.size if self.ddp else 1))
            self.objective.ncmi.set_centre_window(-(-per_rank // cfg.batch_size))
        self.priors = class_priors([r.label for r in self.train_set], C)
        params = list(self.model.parameters()) + self.objective.network_parameters()
        self.opt = fused_if_possible(torch.optim.AdamW, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
        self.copt = fused_if_possible(torch.optim.Adam, self.objective.centroid_parameters(), lr=cfg.centroid_lr) \
            if self.objective.alternating else None
        self.history: list[dict] = []
        self.best = {"epoch": -1, "value": [-math.inf, -math.inf]}
        self.start_epoch = 0
        if self.ddp:      # same initial weights on every rank (same seed), then each rank its own dropout draws
            # (patch sub-sampling uses the epoch's generator, the same on every rank, over different bags)
            torch.manual_seed(seed + 7919 * self.ddp.rank)

    # ---- state ------------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "copt": self.copt.state_dict() if self.copt else None, "epoch": epoch, "history": self.history,
                "best": self.best, "rng": _rng_state(), "config": self.cfg.to_dict(), "seed": self.seed}

    def try_resume(self) -> bool:
        last = self.out / "last.pt"
        if not last.exists():
            return False
        st = load_checkpoint(last, self.device, self.model, self.objective)
        load_optimizer_state(self.opt, st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.sched.T_max = self.cfg.epochs   # --resume with more --epochs: the schedule stretches to them
        if self.copt and st["copt"]:
            load_optimizer_state(self.copt, st["copt"])
        self.history, self.best, self.start_epoch = st["history"], st["best"], st["epoch"] + 1
        _set_rng_state(st["rng"])
        return True

    # ---- one epoch --------------------------------------------------------------------------
    def _autocast(self):
        dt = _DT[self.precision]
        return torch.autocast(self.device.type, dtype=dt, enabled=dt != torch.float32)

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        self.objective.train()
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=gen).tolist()
        if self.ddp:      # equal-length disjoint shares (wrapped like DistributedSampler): steps stay in lockstep
            per = -(-len(order) // self.ddp.size)
            order = (order * 2)[:per * self.ddp.size][self.ddp.rank::self.ddp.size]
        bs = self.cfg.batch_size
        total, count = 0.0, 0
        running = self.uses_running_means
        seen_p, seen_y = [], []
        bar = tqdm(range(0, len(order), bs), desc=f"seed {self.seed} epoch {epoch + 1}/{self.cfg.epochs}",
                   unit="step", leave=False, disable=None if self.cfg.progress else True)
        for start in bar:
            recs = [self.train_set[i] for i in order[start:start + bs]]
            x, mask = collate([self.store.get(r.slide_id) for r in recs], self.device, self.cfg.max_patches, gen,
                               self.cfg.patch_dropout)
            y = torch.tensor([r.label for r in recs], device=self.device)
            with self._autocast():
                out = self.model(x, mask, y)
            loss, p = self.objective.network_loss(out.logits.float(), out.embedding.float(), y)
            if out.aux_loss is not None:
                loss = loss + self.model.aux_weight * out.aux_loss.float()
            if not torch.isfinite(loss):
                raise WsiNcmiError(
                    f"{self.out}: training diverged at epoch {epoch + 1} on slide {recs[0].slide_id} (loss {float(loss.detach())}); "
                    f"rerun with a lower --lr (now {self.cfg.lr}) or --precision fp32, into a new --out or with "
                    "--overwrite (a changed setting cannot --resume this run)")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.ddp:
                average_gradients(self.opt)
            if self.cfg.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
            self.opt.step()
            if self.copt is not None:   # centroid step on the same mini-batch, network output fixed
                self.copt.zero_grad(set_to_none=True)
                self.objective.centroid_loss(p, y).backward()
                if self.ddp:
                    average_gradients(self.copt)
                self.copt.step()
            if running:   # this step's P, for the epoch's class means without a second pass
                seen_p.append(p.detach().float().cpu())
                seen_y.append(y.cpu())
            total += float(loss.detach()) * len(recs)
            count += len(recs)
            bar.set_postfix(loss=f"{total / count:.4f}")
        self.sched.step()
        if self.ddp:      # buffers (EMA centre, MI window) from rank 0, so every rank scores the same model
            sync_buffers(self.objective)
            sync_buffers(self.model)
            total, count = (sum(v) for v in zip(*gather(self.ddp, (total, count))))
        if running:
            parts = [(torch.cat(seen_p), torch.cat(seen_y))]
            if self.ddp:
                parts = gather(self.ddp, parts[0])
            self.running_train = {"p": torch.cat([a for a, _ in parts]), "y": torch.cat([b for _, b in parts])}
        return total / max(count, 1)

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def forward_split(self, records: list[SlideRecord]) -> dict:
        self.model.eval()
        self.objective.eval()
        logits, dists, ent = [], [], []
        for r in records:
            x, _ = collate([self.store.get(r.slide_id)], self.device)
            with self._autocast():
                out = self.model(x)
            logits.append(out.logits.float().cpu())
            dists.append(self.objective.distribution(out.logits.float(), out.embedding.float()).cpu())
            a = out.attention.float().clamp_min(1e-12) if out.attention is not None else None
            n = x.shape[1]
            ent.append(float(-(a * a.log()).sum() / math.log(n)) if a is not None and n > 1 else float("nan"))
        return {"ids": [r.slide_id for r in records], "y": torch.tensor([r.label for r in records]),
                "logits": torch.cat(logits), "p": torch.cat(dists), "entropy": ent}

    def score(self, outs: dict[str, dict], ref_train: dict, ref_val: dict) -> dict[str, dict]:
        """Predictions and class scores per split by the run's scoring rule (``train/scoring.py``),
        fit on the training outputs (NCMI's class means) and validation (its temperature)."""
        scorer = fit_scorer(self.cfg.loss, self.objective.predicts_by_centroid, ref_train, ref_val, self.priors,
                            self.cfg.ncmi_predict, self.score_spread)
        return {k: self.score_with(scorer, o) for k, o in outs.items()}

    def score_with(self, scorer: Scorer, o: dict) -> dict:
        C = self.task.num_classes
        logs = scorer.log_scores(o["logits"], o["p"])
        r = dict(o, pred=scorer.predict(o["logits"], o["p"]), log_scores=logs, scores=logs.exp(), scorer=scorer)
        r["metrics"] = classification_metrics(r["y"].numpy(), r["pred"].numpy(), r["scores"].numpy(), C,
                                              log_scores=logs.numpy())
        r["metrics"].update(ncmi_value(o["p"], o["y"], C))
        return r

    @property
    def uses_running_means(self) -> bool:
        """``--ncmi-means running``, unless ``--patch-dropout`` makes the training pass see part-bags:
        their outputs are not the whole-bag outputs that validation is scored against. Measured at
        0.5 on five cohorts (README, Patch dropout): the exact pass gave NCMI +0.012 macro-F1 on
        average and a higher AUC on four."""
        return (self.objective.predicts_by_centroid and self.cfg.ncmi_means == "running"
                and not self.cfg.patch_dropout)

    def train_reference(self) -> dict | None:
        """The training outputs an epoch's NCMI class means come from (None for other losses).

        ``--ncmi-means exact``: an eval-mode pass over the training set, the model as it is now.
        ``running``: the P of each bag as the training pass met it (train mode, the model moving
        through the epoch), saving that pass. The final scores always use the exact pass.
        """
        if not self.objective.predicts_by_centroid:
            return None
        if self.uses_running_means and getattr(self, "running_train", None) is not None:
            return self.running_train
        return self.forward_split(self.train_set)

    def evaluate_epoch(self) -> dict[str, dict]:
        tr = self.train_reference()
        va = self.forward_split(self.val_set)
        return self.score({"val": va}, tr or va, va)

    # ---- the run ----------------------------------------------------------------------------
    def fit_input_norm(self) -> None:
        """``--feature-norm zscore``: the training split's statistics (validation and test stay unseen).
        Only before a fresh start: a resumed or reloaded model brings its own in the checkpoint."""
        if self.cfg.feature_norm == "zscore":
            mean, std = self.store.feature_stats([r.slide_id for r in self.train_set], progress=self.cfg.progress)
            self.model.input_norm.set_stats(torch.from_numpy(mean), torch.from_numpy(std))

    def fit(self) -> None:
        if self.cfg.resume and self.try_resume():
            print(f"seed {self.seed}: resuming after epoch {self.start_epoch} from {self.out / 'last.pt'}")
        else:
            self.fit_input_norm()
        key = self.cfg.select_metric
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if epoch >= self.cfg.min_epochs and epoch - self.best["epoch"] > self.cfg.patience and self.best["epoch"] >= 0:
                break
            t0 = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            value = improved = None
            if self.is_main:  # data-parallel: the ranks hold identical models, so only rank 0 validates
                val = self.evaluate_epoch()["val"]["metrics"]
                row = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - t0,
                       **{f"val_{k}": val[k] for k in ("nll", "macro_f1", "auc", "balanced_accuracy", "accuracy",
                                                       "ece", "concentration", "separation", "ncmi")}}
                self.history.append(row)
                value = selection_value(val, key)
                improved = improves(value, self.best["value"])
            if self.ddp:  # rank 0's decision, so the ranks never leave the loop apart
                value, improved = gather(self.ddp, (value, improved))[0]
            if improved:
                self.best = {"epoch": epoch, "value": value}
                if self.is_main:
                    save_checkpoint({"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                                  "epoch": epoch, "config": self.cfg.to_dict(), "seed": self.seed}, self.out / "best.pt")
            if not self.is_main:
                continue
            save_checkpoint(self._state(epoch), self.out / "last.pt")
            print(f"seed {self.seed} epoch {epoch + 1:3d}  loss {train_loss:.4f}  val NLL {val['nll']:.3f}  "
                  f"macro-F1 {val['macro_f1']:.3f}  AUC {val['auc']:.3f}  NCMI {val['ncmi']:.3f}"
                  f"{'  *' if improved else ''}", flush=True)
        if self.ddp:
            gather(self.ddp, None)   # barrier: best.pt and last.pt are written before anyone reads them

    @property
    def is_main(self) -> bool:
        return self.ddp is None or self.ddp.is_main

    def final_scores(self) -> dict[str, dict]:
        """Reload the best epoch (recorded in ``self.best``) and score every split."""
        st = load_checkpoint(self.out / "best.pt", self.device, self.model, self.objective)
        self.best["epoch"] = int(st["epoch"])
        outs = {sp: self.forward_split(self.task.split(sp)) for sp in ("train", "val", "oof", "test")
                if self.task.split(sp)}
        ref_val = outs.get("val", outs["train"])
        return self.score(outs, outs["train"], ref_val)
