"""Training pictures: loss, validation metrics and NCMI versus accuracy across epochs; confusion
matrix and ROC curves of a split. PNG files meant to be read at a glance (and put in a paper)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _finish(fig, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path, title: str = "") -> Path:
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(ep, [h["train_loss"] for h in history], "o-", ms=3)
    ax[0].set(title="training loss", xlabel="epoch")
    for k, lab in (("val_macro_f1", "macro-F1"), ("val_auc", "AUC"), ("val_balanced_accuracy", "balanced acc.")):
        ax[1].plot(ep, [h[k] for h in history], "o-", ms=3, label=lab)
    ax[1].set(title="validation", xlabel="epoch", ylim=(0, 1.02))
    ax[1].legend(fontsize=8)
    sc = ax[2].scatter([h["val_accuracy"] for h in history], [h["val_ncmi"] for h in history], c=ep, cmap="viridis")
    fig.colorbar(sc, ax=ax[2], label="epoch")
    ax[2].set(title="validation NCMI vs accuracy", xlabel="accuracy", ylabel="NCMI (concentration / separation)")
    return _finish(fig, path, title)


def plot_confusion_roc(y: np.ndarray, scores: np.ndarray, confusion: list[list[int]], classes: list[str],
                       path: Path, title: str = "") -> Path:
    from sklearn.metrics import roc_curve

    cm = np.asarray(confusion)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    ax[0].imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax[0].text(j, i, str(cm[i, j]), ha="center", va="center",
                       color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=9)
    ax[0].set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
              title="confusion matrix")
    ax[0].set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax[0].set_yticklabels(classes, fontsize=8)
    for k, name in enumerate(classes):
        pos = y == k
        if 0 < pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(pos, scores[:, k])
            ax[1].plot(fpr, tpr, label=name)
    ax[1].plot([0, 1], [0, 1], "k:", lw=0.8)
    ax[1].set(title="ROC (one vs rest)", xlabel="false positive rate", ylabel="true positive rate")
    ax[1].legend(fontsize=8)
    return _finish(fig, path, title)
