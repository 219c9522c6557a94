"""Mutual-information learned classifiers (MILC).

Yi, Zhang, Chen, Liu & Shao (2022), "Mutual Information Learned Classifiers: an
Information-theoretic Viewpoint of Training Deep Learning Classification Systems", arXiv:2209.10058.

Cross-entropy learns only the conditional entropy H(Y|X). MILC learns I(X; Y) = H(Y) - H(Y|X) by also
learning the label entropy H(Y) from the model's own marginal p_theta(y) = E_x p_theta(y|x):

    loss = CE(y | x)  +  lambda * ( - sum_y pi_y log pbar_y )

with pbar the mean softmax output and pi the empirical label distribution of the same samples; the
second term is the cross-entropy estimate of H(Y), minimised (to H(Y)) when the model's marginal
matches the labels'. Slide-level MIL trains with one or a few bags per step, where a batch
marginal is a single prediction, so pbar and pi are taken over a running window of the last
``window`` training samples (detached) plus the current batch (with gradient); ``window=0`` is the
paper's pure batch estimate. The window lives in buffers, so checkpoints resume it exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last axis."""
    return -(p * p.clamp_min(EPS).log()).sum(-1)


def marginal_entropy(p: torch.Tensor) -> torch.Tensor:
    """The model's label-entropy estimate H(pbar), pbar the batch marginal of its outputs."""
    return entropy(p.mean(0))


def label_entropy_xent(pbar: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Cross-entropy -sum pi log pbar: MILC's H(Y) term, equal to H(pbar) when pbar = pi."""
    return -(prior * pbar.clamp_min(EPS).log()).sum()


def mutual_information(p: torch.Tensor) -> torch.Tensor:
    """Plug-in I(X; Y) of a set of outputs: H(pbar) - mean H(p(y|x))."""
    return marginal_entropy(p) - entropy(p).mean()


class MutualInformationLoss(nn.Module):
    alternating = False

    def __init__(self, num_classes: int, weight: float = 1.0, window: int = 64):
        super().__init__()
        self.num_classes, self.weight, self.window = num_classes, weight, int(window)
        self.register_buffer("win_p", torch.zeros(self.window, num_classes))
        self.register_buffer("win_y", torch.zeros(self.window, dtype=torch.long))
        self.register_buffer("win_n", torch.tensor(0))
        self.register_buffer("win_pos", torch.tensor(0))

    def terms(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional-entropy term CE, label-entropy term) on this batch and the window."""
        logp = F.log_softmax(logits.float(), dim=-1)
        ce = F.nll_loss(logp, y)
        p = logp.exp()
        n = int(self.win_n)
        pw, yw = self.win_p[:n], self.win_y[:n]
        pbar = (pw.sum(0) + p.sum(0)) / (n + len(p))
        prior = torch.bincount(torch.cat([yw, y]), minlength=self.num_classes).float() / (n + len(y))
        return ce, label_entropy_xent(pbar, prior)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce, hy = self.terms(logits, y)
        if self.training and self.window:
            self._remember(torch.softmax(logits.detach().float(), -1), y)
        return ce + self.weight * hy

    @torch.no_grad()
    def _remember(self, p: torch.Tensor, y: torch.Tensor) -> None:
        for pi, yi in zip(p[-self.window:], y[-self.window:]):
            k = int(self.win_pos)
            self.win_p[k], self.win_y[k] = pi, yi
            self.win_pos.fill_((k + 1) % self.window)
            self.win_n.fill_(min(int(self.win_n) + 1, self.window))
