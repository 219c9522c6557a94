"""How a trained model turns its outputs into a prediction and class scores: one rule per run.

Two rules, chosen by the loss:

* ``softmax`` (every loss but NCMI): prediction argmax of the logits, log scores log-softmax.
* ``centroid`` (NCMI): log scores the Bayes score of ``losses.ncmi.centroid_log_scores`` with one
  pooled spread for every class (the mean of the training spreads s_k), its temperature fit on
  validation inside ``TAU_BOUNDS``. The prediction (``--ncmi-predict``) is either the method's
  nearest training class mean, argmin_k KL(P || Qbar_k) (``nearest``), or the argmax of the Bayes
  score with each class's own spread s_k (``bayes``). ``auto`` (the default) takes, per trained
  model, the rule with the higher validation macro-F1, ``nearest`` on a tie. Why not one fixed
  rule: measured on five cohorts (README, "NCMI's prediction rule"), ``bayes`` lifted test macro-F1
  by about +0.27 on the generated CAMELYON-like bags, whose ITC class spreads 3 to 32 times as wide
  as the macro class, and cost up to 0.05 on the demo, whose wide micro-class spread draws negative
  and ITC nodes into it; validation tells the two apart on most seeds.

Why the scores pool the spread while ``bayes`` keeps each class's own: a score also ranks slides
against each other within a class (AUC), a prediction only picks a class within a slide, and
dividing each class's column by its own s_k puts the columns on unequal scales. Measured (README,
"The class score"): re-scoring trained models, the pooled score met a rule fixed beforehand on a
second held-out set (mean AUC 0.972 against 0.961); retrained on 13 cohorts (the validation NLL
that picks each epoch reads the score), mean AUC +0.005 and macro-F1 -0.002, with iris +0.026 AUC
and the five development cohorts -0.004 / -0.002. ``score_spread`` says which a run uses: runs
scored before this read back as ``class`` and keep their scores.

Scores are float64 log-probabilities everywhere: AUC ranks them (exp() of a float32 score saturated
to hard 0 and 1 and tied slides that the log scores still order), and ECE / Brier read exp() of
them. ``includes_prior`` says whether a score is a posterior (it holds the training class prior)
or a prior-free, balanced score (PC-softmax, inverse-frequency weighted CE, legacy NCMI scores):
the information maps turn either into the log posterior and subtract log pi once.

The rule is fit once per trained model (``fit_scorer``) and saved to ``seed_<s>/scoring.pt``, so
``evaluate``, ``heatmap`` and ``predict`` score a slide exactly as training did (``evaluate
--ncmi-predict`` refits it with another prediction rule on request).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wsi_ncmi.losses.ncmi import TAU_BOUNDS, centroid_log_scores, class_mean, class_spread, fit_temperature, kl_matrix
from wsi_ncmi.train.checkpoint import load_checkpoint
from wsi_ncmi.train.config import NCMI_PREDICT_BEFORE, NCMI_PREDICT_RULES
from wsi_ncmi.train.metrics import macro_f1

PRIOR_FREE_LOSSES = ("pc_softmax", "weighted_ce")   # trained to balanced (prior-free) class scores
SCORE_SPREADS = ("pooled", "class")


@dataclass
class Scorer:
    kind: str                                  # "softmax" or "centroid"
    includes_prior: bool = True
    qbar: torch.Tensor | None = None           # centroid: training class means of P
    spread: torch.Tensor | None = None         # centroid: mean training KL to the own class mean (None: legacy)
    log_prior: torch.Tensor | None = None      # centroid: log training class frequencies
    tau: float = 1.0
    rule: str = "nearest"                      # centroid: prediction by "nearest" mean or "bayes" score
    score_spread: str = "pooled"               # centroid scores: one "pooled" spread, or each "class"'s own

    def log_scores(self, logits: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        """(N, C) float64 log class scores."""
        if self.kind == "softmax":
            return torch.log_softmax(logits.double(), dim=1)
        if self.spread is None:                # runs trained before the Bayes score: softmax(-KL / tau)
            return torch.log_softmax(-kl_matrix(p.double(), self.qbar.double()) / self.tau, dim=1)
        return centroid_log_scores(p, self.qbar, self.score_spreads(), self.log_prior, self.tau)[0]

    def pooled_spread(self) -> torch.Tensor:
        """The mean of the training spreads s_k, once per class."""
        return self.spread.double().mean().expand_as(self.spread)

    def score_spreads(self) -> torch.Tensor:
        """The spreads the class scores divide by (``score_spread``)."""
        return self.pooled_spread() if self.score_spread == "pooled" else self.spread.double()

    def map_log_scores(self, logits: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        """The class scores the information maps read: NCMI's Bayes score with one pooled spread (the
        mean of the s_k) for every class, whichever spread the run's ``log_scores`` use.

        The instance map scores one-patch bags, far from the training bags the spreads were measured
        on. There -KL / s_k ranks the classes by their spreads alone, the widest class winning whatever
        the patch shows: on generated bags with known tumour instances, once the positive bags spread
        wider than the negative ones (no centre in NCMI's space), the typical normal patch spoke for the
        positive class. With one pooled spread the score compares the patch's distance to each class
        mean, as the ``nearest`` rule does, and it still holds the prior once. The removal map reads the
        same score, so the two estimators stay comparable.
        """
        if self.kind == "centroid" and self.spread is not None:
            return centroid_log_scores(p, self.qbar, self.pooled_spread(), self.log_prior, self.tau)[0]
        return self.log_scores(logits, p)

    def predict(self, logits: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "softmax":
            return logits.argmax(1)
        if self.rule == "bayes":      # each class's own spread; argmax does not depend on tau
            return centroid_log_scores(p, self.qbar, self.spread, self.log_prior)[0].argmax(1)
        return kl_matrix(p.double(), self.qbar.double()).argmin(1)

    def state(self) -> dict:
        return {"kind": self.kind, "includes_prior": self.includes_prior, "qbar": self.qbar, "spread": self.spread,
                "log_prior": self.log_prior, "tau": self.tau, "rule": self.rule, "score_spread": self.score_spread}

    @classmethod
    def from_state(cls, st: dict) -> "Scorer":
        if "kind" not in st:                   # scoring.pt of earlier runs: {"qbar", "tau"}, prior-free scores
            return cls("centroid", includes_prior=False, qbar=st["qbar"], tau=float(st["tau"]))
        return cls(st["kind"], bool(st["includes_prior"]), st["qbar"], st["spread"], st["log_prior"], float(st["tau"]),
                   st.get("rule", NCMI_PREDICT_BEFORE),    # scoring.pt from before --ncmi-predict
                   st.get("score_spread", "class"))        # scoring.pt from before the pooled score


def fit_scorer(loss: str, by_centroid: bool, train: dict, val: dict, priors: torch.Tensor,
               rule: str = "auto", score_spread: str = "pooled") -> Scorer:
    """The scoring rule of a trained model from its training and validation outputs ({"p", "y", ...}).

    ``rule`` is NCMI's prediction rule (``NCMI_PREDICT_RULES``); ``auto`` resolves it here on ``val``.
    ``score_spread`` is the spread NCMI's class scores use, and the temperature is fit on: ``pooled``
    for new runs, ``saved_score_spread`` when ``evaluate`` re-scores a run trained before.
    """
    if not by_centroid:
        return Scorer("softmax", includes_prior=loss not in PRIOR_FREE_LOSSES)
    if rule not in NCMI_PREDICT_RULES:
        raise ValueError(f"rule must be one of {NCMI_PREDICT_RULES}, not {rule!r}")
    if score_spread not in SCORE_SPREADS:
        raise ValueError(f"score_spread must be one of {SCORE_SPREADS}, not {score_spread!r}")
    C = len(priors)
    qbar = class_mean(train["p"], train["y"], C).double()
    spread = class_spread(train["p"], train["y"], qbar)
    log_prior = priors.double().log()
    scorer = Scorer("centroid", True, qbar, spread, log_prior, 1.0, "nearest" if rule == "auto" else rule,
                    score_spread)
    raw = centroid_log_scores(val["p"], qbar, scorer.score_spreads(), log_prior)[0]
    scorer.tau = fit_temperature(raw, val["y"], TAU_BOUNDS)
    if rule == "auto" and len(val["y"]):
        scorer.rule = choose_rule(scorer, val)
    return scorer


def saved_score_spread(seed_dir: Path) -> str:
    """The spread a trained seed's class scores use: its ``scoring.pt``'s (``class`` if written before
    the pooled score), or ``pooled`` where it has none (``evaluate`` writes one beside its outputs)."""
    path = seed_dir / "scoring.pt"
    return Scorer.from_state(load_checkpoint(path)).score_spread if path.is_file() else "pooled"


def choose_rule(scorer: Scorer, val: dict) -> str:
    """``bayes`` if its validation macro-F1 beats the nearest mean's, else ``nearest`` (the method's rule)."""
    f1 = {r: macro_f1(val["y"].numpy(), replace(scorer, rule=r).predict(None, val["p"]).numpy())
          for r in ("nearest", "bayes")}
    return "bayes" if f1["bayes"] > f1["nearest"] else "nearest"


def log_posterior(log_scores: torch.Tensor, log_prior: torch.Tensor, includes_prior: bool) -> torch.Tensor:
    """log p(c | x): the score itself when it holds the prior, else log pi_c s_c - log sum_k pi_k s_k."""
    if includes_prior:
        return log_scores
    z = log_scores + log_prior.to(log_scores)[None]
    return z - torch.logsumexp(z, dim=1, keepdim=True)
