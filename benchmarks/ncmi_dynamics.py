"""How an NCMI training unfolds, epoch by epoch: does it keep every class apart, or merge some?

    python benchmarks/ncmi_dynamics.py --labels /tmp/ablation/cohorts/breast_cancer/labels.csv \\
        --features /tmp/ablation/cohorts/breast_cancer/features --epochs 12
    python benchmarks/ncmi_dynamics.py ... --set ncmi_separation=mean --set ncmi_centre=ema   # the method's

One seed of the default recipe (plus any ``--set KEY=VALUE``), gated ABMIL: its first ``--epochs``
epochs of the recipe's schedule (cosine over 40), with no early stopping. After each epoch the training and validation splits are scored as the run
would score them (``Trainer.score``: class means from an exact pass over the training set, the
prediction rule chosen on validation), and printed:
- the training loss, and training and validation macro-F1 (validation AUC too);
- the nearest and the farthest pair of training class means Qbar_k, by KL(Qbar_i || Qbar_j):
  a nearest pair near zero means the model no longer tells those two classes apart.

Why it exists: the README's "NCMI's centre and separation" section. With the method's
arithmetic-mean separation and centre, the training macro-F1 on breast_cancer fell while the loss
still fell, because pushing one class far from the rest keeps the mean separation large while the
others merge; with the defaults (harmonic separation, no centre) it did not. The cohorts
are those of ``benchmarks/ablation.py`` (its ``--workdir``/cohorts), or any CSV cohort.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from wsi_ncmi.losses.ncmi import class_mean, kl_matrix  # noqa: E402
from wsi_ncmi.train.config import TrainConfig  # noqa: E402
from wsi_ncmi.train.run import prepare  # noqa: E402
from wsi_ncmi.train.trainer import Trainer  # noqa: E402


def _setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    field = TrainConfig.__dataclass_fields__.get(key)
    if field is None or not value:
        raise SystemExit(f"--set {text}: give a TrainConfig field and a value, e.g. ncmi_separation=mean")
    if isinstance(field.default, bool):
        return key, value.lower() == "true"
    if isinstance(field.default, (int, float)) and not isinstance(field.default, bool):
        return key, type(field.default)(value)
    return key, value


def class_mean_pairs(p: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[tuple, tuple]:
    """((i, j, KL) of the nearest pair of class means, the same of the farthest pair)."""
    qbar = class_mean(p.double(), y, num_classes)
    d = kl_matrix(qbar, qbar)
    pairs = [(i, j, float(d[i, j])) for i in range(num_classes) for j in range(num_classes) if i != j]
    return min(pairs, key=lambda t: t[2]), max(pairs, key=lambda t: t[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, help="a cohort CSV (slide_id,label,split)")
    ap.add_argument("--features", required=True, help="its folder of HDF5 feature files")
    ap.add_argument("--epochs", type=int, default=12, help="epochs to run, of the recipe's schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss", default="ncmi")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting to change")
    args = ap.parse_args()
    settings = dict(_setting(s) for s in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(task="csv", labels=args.labels, features=args.features, out=tmp, loss=args.loss,
                          progress=False, **settings).validate()
        with contextlib.redirect_stdout(io.StringIO()):
            task, store, _ = prepare(cfg)
        trainer = Trainer(cfg, task, store, args.seed, Path(tmp) / f"seed_{args.seed}")
        trainer.fit_input_norm()
        C = task.num_classes
        print(f"{args.loss}, {', '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'}; seed {args.seed}; "
              f"classes {task.classes}")
        print("epoch  train loss  train macro-F1  val macro-F1  val AUC  nearest class means (KL)  farthest")
        for epoch in range(min(args.epochs, cfg.epochs)):
            loss = trainer.train_epoch(epoch)
            outs = {"train": trainer.forward_split(trainer.train_set), "val": trainer.forward_split(trainer.val_set)}
            scored = trainer.score(outs, outs["train"], outs["val"])
            tr, va = scored["train"]["metrics"], scored["val"]["metrics"]
            (a, b, near), (c, d, far) = class_mean_pairs(outs["train"]["p"], outs["train"]["y"], C)
            print(f"{epoch + 1:5d}  {loss:10.4f}  {tr['macro_f1']:14.3f}  {va['macro_f1']:12.3f}  {va['auc']:7.3f}  "
                  f"{a}-{b} {near:.4f}{'':>14}  {c}-{d} {far:.3f}", flush=True)


if __name__ == "__main__":
    main()
