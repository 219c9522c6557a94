"""Per-patch pointwise mutual information with each class: what a patch tells the model.

The infoCAM idea of Qin, Kim, Gedeon et al. (2019), "Rethinking Softmax with Cross-Entropy: Neural
Network Classifier as Mutual Information Estimator", arXiv:1911.10688, carried to bags. With
s(c | bag) the model's class score (softmax, or NCMI's centroid scores) and pi_c the training prior,
two estimators of i(patch; c):

* ``instance`` (default): the patch kept alone, i(x; c) = log s(c | {x}) - log pi_c, the pointwise
  MI of the classifier read at instance level (Qin et al.'s PMI estimate). One batched forward pass
  of N one-patch bags; every aggregator accepts them.
* ``removal``: the patch removed from its slide, i(x; c) = log s(c | bag) - log s(c | bag \\ {x}),
  through the model's own masking: the patch's contribution in context. Blind to redundant evidence
  (with three tumour patches, removing any one changes little) and N forward passes of N patches;
  above ``max_evals`` patches, spatially adjacent patches are removed together in blocks and each
  patch gets its block's value.

Priors are counted once for every loss: a score that holds the class prior (a posterior: CE, focal,
NCMI's Bayes score...) gives i = log s(c | .) - log pi_c; a prior-free one (PC-softmax, weighted CE)
is first turned into the posterior pi_c s_c / sum_k pi_k s_k (``train.scoring.log_posterior``). Then
sum_c pi_c exp i(x; c) = 1 for every patch, whatever the loss (tested per loss).

The map drawn for a class is infoCAM's contrast, i(x; c) - mean_{k != c} i(x; k): high where the
patch speaks for the class and against the others.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from wsi_ncmi.mil.models.base import MILModel, MILOutput

ESTIMATORS = ("instance", "removal")
LogScores = Callable[[MILOutput], torch.Tensor]


def removal_groups(coords: np.ndarray | None, n: int, max_evals: int) -> np.ndarray:
    """Group id per patch: singletons when n <= max_evals, else square blocks of the patch grid."""
    if n <= max_evals or coords is None:
        return np.arange(n)
    c = np.asarray(coords, np.int64)
    step = np.diff(np.unique(c[:, 0]))
    step = int(step[step > 0].min()) if (step > 0).any() else 1
    g = (c - c.min(0)) // step
    side = max(1, int(math.sqrt(n / max_evals)))
    while True:
        _, ids = np.unique(g // side, axis=0, return_inverse=True)
        if ids.max() + 1 <= max_evals:
            return ids.reshape(-1)
        side += 1


@torch.no_grad()
def instance_information(model: MILModel, log_scores: LogScores, x: torch.Tensor, priors: torch.Tensor,
                         chunk: int = 4096, includes_prior: bool = True) -> np.ndarray:
    """(N, C) i(x; c) = log p(c | {x}) - log pi_c, each patch scored as a one-patch bag."""
    from wsi_ncmi.train.scoring import log_posterior

    model.eval()
    log_prior = priors.double().log()
    rows = [log_posterior(log_scores(model(x[i:i + chunk, None, :])).double().cpu(), log_prior, includes_prior)
            for i in range(0, x.shape[0], chunk)]
    return (torch.cat(rows) - log_prior[None]).numpy()


@torch.no_grad()
def removal_information(model: MILModel, log_scores: LogScores, x: torch.Tensor, coords: np.ndarray | None = None,
                        max_evals: int = 2048, chunk: int | None = None, priors: torch.Tensor | None = None,
                        includes_prior: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """((N, C) i(x; c) = log p(c | bag) - log p(c | bag without x), group id per patch)."""
    from wsi_ncmi.train.scoring import log_posterior

    model.eval()
    n = x.shape[0]
    if not includes_prior and priors is None:
        raise ValueError("prior-free scores need the class priors to become posteriors")
    log_prior = priors.double().log() if priors is not None else None
    post = (lambda ls: log_posterior(ls.double().cpu(), log_prior, False)) if not includes_prior else \
        (lambda ls: ls.double().cpu())
    full = post(log_scores(model(x[None])))[0]
    groups = removal_groups(coords, n, max_evals)
    ng = int(groups.max()) + 1
    members = torch.from_numpy(groups)
    pmi_g = torch.zeros(ng, full.shape[0])
    if ng == 1:                      # removing the whole bag leaves nothing to score
        return pmi_g[members].numpy(), groups
    chunk = chunk or max(1, min(32, 200_000 // max(n, 1)))
    for start in range(0, ng, chunk):
        ids = torch.arange(start, min(start + chunk, ng))
        mask = members[None, :] != ids[:, None]                     # (B, N): False where removed
        out = model(x[None].expand(len(ids), -1, -1), mask)
        pmi_g[ids] = (full[None] - post(log_scores(out))).float()
    return pmi_g[members].numpy(), groups


def info_contrast(pmi: np.ndarray, c: int) -> np.ndarray:
    """infoCAM contrast for class c: i(x; c) - mean_{k != c} i(x; k)."""
    others = np.delete(pmi, c, axis=1)
    return pmi[:, c] - (others.mean(1) if others.shape[1] else 0.0)
