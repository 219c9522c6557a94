"""Probability-corrected softmax (PC-softmax): the classifier as a mutual-information estimator.

Qin, Kim, Gedeon et al. (2019/2021), "Rethinking Softmax with Cross-Entropy: Neural Network
Classifier as Mutual Information Estimator", arXiv:1911.10688 (also arXiv:2106.10471).

Softmax cross-entropy is a variational bound on I(X; Y) only when classes are balanced. With the
training priors pi_k folded into the normaliser, the logits f become pointwise-MI estimates:

    i(x; y) ~ f_y(x) - log sum_k pi_k exp f_k(x),        I(X; Y) ~ mean over samples.

Training minimises -log [pi_y exp f_y / sum_k pi_k exp f_k] = CE(f + log pi, y). The authors' code
drops pi_y from the numerator; that only shifts each sample's loss by the constant -log pi_y (the
gradients are identical), and keeping it makes the loss a proper NLL that equals CE when the priors
are uniform. Prediction is argmax_k f_k (= argmax of pointwise MI), and softmax(f) is the
prior-free ("balanced") posterior used as class scores: CAMELYON-17's 318/36/59/87 slide classes
are the imbalanced case the correction is for.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def class_priors(labels, num_classes: int, counts: bool = False) -> torch.Tensor:
    """Training-split class frequencies from labels (or per-class ``counts``); an empty class counts 1."""
    counts = torch.as_tensor(labels, dtype=torch.float) if counts else \
        torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).float()
    counts = counts.clamp_min(1)
    return counts / counts.sum()


def pointwise_mi(logits: torch.Tensor, y: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate i(x; y) = f_y - log sum_k pi_k exp f_k (nats); its mean estimates I(X; Y)."""
    f = logits.float()
    return f.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(f + priors.log(), dim=1)


class PCSoftmaxLoss(nn.Module):
    alternating = False

    def __init__(self, priors: torch.Tensor):
        super().__init__()
        self.register_buffer("log_prior", priors.float().log())

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.log_prior, y)
