"""NCMI loss: normalized conditional mutual information, minimised by alternating updates.

Ye, Chi, Plataniotis & Yang (2026), "NCMI: ..." arXiv:2601.02543. Related: CMIC-DL (Yang et al.,
IEEE TNNLS 2025), which adds a CMI constraint to cross-entropy.

A classifier is a Markov chain Y -> X -> P with P(x) the output distribution on the simplex.

* concentration  I(X; P | Y) ~ mean_x KL(P(x) || Q_y): how far a sample lies from its class centroid;
* separation     Gamma ~ mean_x  1/(C-1) sum_{k != y} KL(Q_k || P(x)): how far from the others';
* per sample     (KL(P || Q_y) + eps) / (mean_{k != y} KL(Q_k || P) + eps), averaged. No CE term.

Two departures from the method are the defaults, each an option that restores it (README, "NCMI's
centre and separation"; measured with ``benchmarks/ablation.py`` on five cohorts and confirmed on four
held-out ones, 5 seeds; ``benchmarks/ncmi_dynamics.py`` shows the mechanism):
* ``separation="harmonic"``: the rivals' divergences combine by their harmonic mean, i.e. the loss
  averages the pairwise ratios (``ncmi_ratio``). Under the method's arithmetic mean one far rival
  keeps the denominator large while two other classes merge (measured: training macro-F1 falling
  from 0.80 to 0.51 as classes 2 and 3 met at KL <= 0.001);
* ``centre="none"``: P is the NSF of the bag embedding normalised as it is. MIL classes here are
  set by how much tumour a bag holds; attention pooling puts a bag between the negative and positive
  instance embeddings, and a centre on that segment leaves (z - c) / ||z - c|| saying only which side
  of c the bag lies on, not how far along.

The simplex map is the normalised sigmoid NSF(u)_j = sigma(u_j) / sum_l sigma(u_l) (softmax
collapses to one mode under this objective). Centroids Q_k = NSF(w_k) are learnable, w_k
initialised to ``init_scale * e_k``. Training alternates on each mini-batch: a *network* step with
the centroids fixed, then a *centroid* step with the network output fixed (the authors' released
code never updates its centroids; ``centroids="fixed"`` reproduces that for comparison).

Where P lives is a design choice (``space``):
* ``"logit"``: NSF over the L2-normalised C class logits / T; C-dim centroids; no centring needed.
  The normalisation is required: with raw logits the ratio has a degenerate minimum (scale the
  logits up, P goes to a simplex vertex, every KL(Q_k || P) diverges and the loss falls towards 0
  whatever the class). Measured here: raw logits at lr 1e-3 trained gated ABMIL to a loss of 0.08
  with chance-level train accuracy; bounded as u = l / ||l|| / T it trains.
* ``"embedding"`` (the method's, and the default): NSF over the L2-normalised penultimate embedding,
  u = z / ||z|| / T; with ``centre="ema"`` (the method's) u = (z - c) / ||z - c|| / T, where the
  centre c is a *bias-corrected* EMA of batch-mean embeddings (Adam's correction, Kingma & Ba 2014,
  arXiv:1412.6980) whose decay is set from the epoch length, 1 - batch/N (``set_centre_window``):
  its memory is about one epoch whatever the batch size. The authors' decay of 0.9999 was set for
  batch means over many CIFAR steps; at one bag per step the first bag still weighed 0.86 of the
  centre after 1,500 steps.

Temperature (``T``, default 0.03 in embedding space, 0.3 in logit space or without standardised inputs:
``default_temperature``; the authors used 0.2-0.5 on CIFAR): u lies on the sphere of
radius 1/T. With a 512-wide embedding, T = 0.3 leaves each coordinate of u near 0.15, where the
sigmoid is almost linear: every P stays within a factor of two of uniform and the KL terms near 1e-3
(as measured on validation). At T = 0.03 a typical coordinate is about 1.5, the sigmoid's responsive
range. Measured with standardised inputs (``--feature-norm zscore``, the default) on five cohorts,
5 seeds each (README, NCMI temperature): test macro-F1 on the four real cohorts rose from T = 0.3
to 0.02-0.03; at 0.01 the demo fell while digits and breast_cancer still rose, so 0.03 is the
default. On the generated bags (2 ITC test slides) 0.1 did better. Without standardised inputs a
low T does not help (T = 0.3 beat 0.1 on five cohorts and 0.03 on four), nor in logit space, where u
has only C coordinates and every sigmoid saturates at radius 1/0.03: there the default stays 0.3.

The method predicts by the nearest class-mean centroid, argmin_k KL(P(x) || Qbar_k), Qbar_k the mean
of P over the training samples of class k recomputed each epoch in eval mode (``class_mean``). Class
scores (for AUC, the predictions CSV and information maps) are ``centroid_log_scores``: a Bayes
score from the method of types, computed in float64 log space. Which of the two decides the class
is ``--ncmi-predict`` (``train/scoring.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-8
TEMPERATURE = 0.03            # the default T: embedding space over standardised inputs (module docstring)
SEPARATIONS = ("mean", "harmonic", "min")   # how the rivals' KL(Q_k || P) combine (``ncmi_ratio``)
CENTRES = ("ema", "none")     # embedding space: subtract a running centre from z first, or not
TEMPERATURE_ELSEWHERE = 0.3   # the authors' T: logit space, or inputs as extracted (measured best there)


def default_temperature(space: str = "embedding", standardised: bool = True) -> float:
    """The T that ``--ncmi-temperature auto`` (the default) means: 0.03 measured best in embedding space
    over standardised inputs; elsewhere it was worse than the authors' 0.3 (README, NCMI temperature):
    in logit space u has only C coordinates, so at radius 1/0.03 every sigmoid saturates, and with
    inputs as extracted T = 0.3 beat 0.1 on five cohorts and 0.03 on four."""
    return TEMPERATURE if space == "embedding" and standardised else TEMPERATURE_ELSEWHERE


def nsf(u: torch.Tensor) -> torch.Tensor:
    """Normalised sigmoid function: sigma(u) / sum sigma(u), positive and summing to one."""
    s = torch.sigmoid(u)
    return s / s.sum(dim=-1, keepdim=True)


def kl_matrix(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p_i || q_k) for every row pair: (N, m) x (K, m) -> (N, K)."""
    lp, lq = p.clamp_min(EPS).log(), q.clamp_min(EPS).log()
    return (p * lp).sum(-1, keepdim=True) - p @ lq.T


def _divergences(p: torch.Tensor, q: torch.Tensor, y: torch.Tensor):
    """KL(p || q_y) as (N, 1), KL(q_k || p) as (N, K), and the (N, K) mask of the rivals k != y."""
    conc = kl_matrix(p, q).gather(1, y[:, None])
    rev = kl_matrix(q, p).T
    return conc, rev, torch.ones_like(rev).scatter_(1, y[:, None], 0.0)


def ncmi_terms(p: torch.Tensor, q: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample concentration KL(p || q_y) and separation mean_{k != y} KL(q_k || p)."""
    conc, rev, other = _divergences(p, q, y)
    return conc.squeeze(1), (rev * other).sum(1) / max(q.shape[0] - 1, 1)


def ncmi_ratio(p: torch.Tensor, q: torch.Tensor, y: torch.Tensor, eps: float = EPS,
               separation: str = "mean") -> torch.Tensor:
    """The NCMI loss: mean over samples of (concentration + eps) / (separation + eps).

    ``separation`` says how the C - 1 rival divergences KL(q_k || p) make the denominator
    (``SEPARATIONS``; ``benchmarks/ncmi_dynamics.py`` shows the mean letting classes merge):
    * ``mean``, the method's Gamma: their arithmetic mean;
    * ``harmonic``: their harmonic mean, so the loss is the mean over rivals of the pairwise ratio
      (concentration + eps) / (KL(q_k || p) + eps). A rival that merges with the sample's class sends
      it up however far the other rivals are; under the arithmetic mean one far rival hides it;
    * ``min``: the nearest rival alone.
    """
    if separation == "mean":
        conc, sep = ncmi_terms(p, q, y)
        return ((conc + eps) / (sep + eps)).mean()
    if separation not in SEPARATIONS:
        raise ValueError(f"separation must be one of {', '.join(SEPARATIONS)}, not {separation!r}")
    conc, rev, other = _divergences(p, q, y)
    if separation == "min":
        sep = rev.masked_fill(other == 0, math.inf).min(1, keepdim=True).values
        return ((conc + eps) / (sep + eps)).mean()
    return (((conc + eps) / (rev + eps)) * other).sum(1).div(max(q.shape[0] - 1, 1)).mean()


def ncmi_value(p: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Diagnostic NCMI of a set of outputs: Q = class means of P itself (any model, any loss).

    Needs a few samples per class: with one, its class mean is itself and concentration is 0.
    """
    q = class_mean(p, y, num_classes)
    conc, sep = ncmi_terms(p, q, y)
    c, s = max(0.0, float(conc.mean())), max(0.0, float(sep.mean()))   # KL >= 0; negatives are round-off
    return {"concentration": c, "separation": s, "ncmi": c / s if s > 0 else math.inf}


def class_mean(p: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of P per class (uniform for a class with no sample)."""
    q = torch.full((num_classes, p.shape[1]), 1.0 / p.shape[1], dtype=p.dtype, device=p.device)
    for k in range(num_classes):
        sel = y == k
        if sel.any():
            q[k] = p[sel].mean(0)
    return q


class NCMILoss(nn.Module):
    """NCMI objective with its own learnable centroids (and, with ``centre="ema"``, a feature centre).

    ``forward(logits, embedding, y, step)``: ``step="network"`` uses detached centroids (gradients
    reach the network only), ``step="centroid"`` uses the detached output (gradients reach the
    centroids only). ``distribution`` maps network outputs to P (used for prediction too).
    """

    alternating_default = True

    def __init__(self, num_classes: int, embed_dim: int | None = None, space: str = "embedding",
                 temperature: float | None = None, centroids: str = "alternating", ema_decay: float = 0.99,
                 init_scale: float = 10.0, eps: float = EPS, separation: str = "harmonic", centre: str = "none"):
        super().__init__()
        if space not in ("logit", "embedding"):
            raise ValueError(f"space must be 'logit' or 'embedding', not {space!r}")
        if centroids not in ("alternating", "fixed"):
            raise ValueError(f"centroids must be 'alternating' or 'fixed', not {centroids!r}")
        if separation not in SEPARATIONS:
            raise ValueError(f"separation must be one of {', '.join(SEPARATIONS)}, not {separation!r}")
        if centre not in CENTRES:
            raise ValueError(f"centre must be one of {', '.join(CENTRES)}, not {centre!r}")
        if space == "embedding" and (embed_dim is None or embed_dim < num_classes):
            raise ValueError("embedding-space NCMI needs embed_dim >= num_classes")
        self.num_classes, self.space, self.centroid_mode, self.eps = num_classes, space, centroids, eps
        self.separation, self.centring = separation, centre
        self.temperature = temperature if temperature is not None else default_temperature(space)
        m = num_classes if space == "logit" else int(embed_dim)
        w = torch.zeros(num_classes, m)
        w[torch.arange(num_classes), torch.arange(num_classes)] = init_scale
        self.centroid_logits = nn.Parameter(w, requires_grad=centroids == "alternating")
        self.ema_decay = ema_decay
        self.register_buffer("centre_sum", torch.zeros(m if space == "embedding" else 0))   # biased EMA
        self.register_buffer("centre_weight", torch.zeros((), dtype=torch.float64))          # 1 - decay^t

    def set_centre_window(self, steps_per_epoch: int) -> None:
        """Decay of the centre's EMA for an epoch of ``steps_per_epoch`` steps: 1 - 1/steps."""
        self.ema_decay = 1.0 - 1.0 / max(int(steps_per_epoch), 2)

    @property
    def centre(self) -> torch.Tensor:
        """Bias-corrected EMA of the batch-mean embeddings (zeros before the first step)."""
        w = float(self.centre_weight)
        return self.centre_sum / w if w > 0 else self.centre_sum

    @property
    def alternating(self) -> bool:
        return self.centroid_mode == "alternating"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints from before the bias-corrected centre held ``centre`` (+ ``centre_ready``)."""
        if prefix + "centre" in state_dict:
            old = state_dict.pop(prefix + "centre")
            ready = state_dict.pop(prefix + "centre_ready", torch.tensor(True))
            state_dict[prefix + "centre_sum"] = old
            state_dict[prefix + "centre_weight"] = torch.tensor(1.0 if bool(ready) else 0.0, dtype=torch.float64)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def centroids(self) -> torch.Tensor:
        return nsf(self.centroid_logits)

    def distribution(self, logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """P for a batch; in training mode with ``centre="ema"`` this also updates the EMA centre."""
        if self.space == "logit":   # bounded like the embedding space: see the module docstring
            u = logits.float()
            return nsf(u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6) / self.temperature)
        z = embedding.float()
        if self.centring == "none":
            return nsf(z / z.norm(dim=-1, keepdim=True).clamp_min(1e-6) / self.temperature)
        if self.training:
            with torch.no_grad():
                d = self.ema_decay
                self.centre_sum.mul_(d).add_(z.mean(0), alpha=1 - d)
                self.centre_weight.mul_(d).add_(1 - d)
        u = z - self.centre
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6) / self.temperature
        return nsf(u)

    def forward(self, p: torch.Tensor, y: torch.Tensor, step: str = "network") -> torch.Tensor:
        if step == "network":
            return ncmi_ratio(p, self.centroids().detach(), y, self.eps, self.separation)
        if step == "centroid":
            return ncmi_ratio(p.detach(), self.centroids(), y, self.eps, self.separation)
        raise ValueError(f"step must be 'network' or 'centroid', not {step!r}")


def class_spread(p: torch.Tensor, y: torch.Tensor, qbar: torch.Tensor) -> torch.Tensor:
    """s_k: mean KL(P(x) || Qbar_k) over the training samples of class k (float64, floored at 1e-6)."""
    d = kl_matrix(p.double(), qbar.double())
    s = torch.ones(qbar.shape[0], dtype=torch.float64)
    for k in range(qbar.shape[0]):
        sel = y == k
        if sel.any():
            s[k] = d[sel, k].mean()
    return s.clamp_min(1e-6)


def centroid_log_scores(p: torch.Tensor, qbar: torch.Tensor, spread: torch.Tensor, log_prior: torch.Tensor,
                        tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 log class scores, the KL matrix) of an NCMI model: a Bayes score from the method of types.

    Sanov / the method of types make the KL of a sample's P to its class centroid the exponent of
    its likelihood; modelling KL(P || Qbar_k) within class k as exponential with the training mean
    s_k gives log p(x | k) = -log s_k - KL / s_k + const, and with the training prior pi_k the
    posterior score log pi_k - log s_k - KL(P || Qbar_k) / s_k, normalised (log-softmax, divided by
    a temperature ``tau`` fit on validation for calibration). Everything is float64 and stays in
    log space: softmax(-KL / tau) in float32 saturated to exact 0 or 1 on separable validation sets
    (tau at the grid floor) and understated AUC by up to 0.07. The score includes the prior (so the
    information maps subtract log pi once). With each class's own s_k its argmax is the ``bayes``
    prediction rule (the method's nearest centroid, argmin_k KL, is the ``nearest`` one); with one
    pooled s for every class it is the score a run ranks and calibrates by (``train/scoring.py``).
    """
    d = kl_matrix(p.double(), qbar.double())
    s = spread.double()
    raw = log_prior.double()[None] - s.log()[None] - d / s[None]
    return torch.log_softmax(raw / tau, dim=1), d


def nearest_centroid(p: torch.Tensor, qbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction argmin_k KL(p || qbar_k), the KL matrix) for NCMI-trained models."""
    d = kl_matrix(p, qbar)
    return d.argmin(1), d


TAU_BOUNDS = (0.05, 20.0)


def fit_temperature(neg_dist: torch.Tensor, y: torch.Tensor, bounds: tuple[float, float] | None = None) -> float:
    """Temperature tau minimising the NLL of softmax(neg_dist / tau) on (validation) labels.

    A 1-D search on a log grid then golden refinement: robust, no optimiser state, deterministic,
    in float64. ``bounds`` (tau_min, tau_max) keeps a separable validation set from driving tau to
    the floor (scores then overflow to hard 0/1); unbounded, the grid spans e^-10 .. e^6.
    """
    if len(y) == 0:
        return 1.0
    neg_dist = neg_dist.double()
    lo_b, hi_b = (math.log(bounds[0]), math.log(bounds[1])) if bounds else (-10.0, 6.0)

    def nll(log_tau: float) -> float:
        return float(F.cross_entropy(neg_dist / math.exp(min(max(log_tau, lo_b), hi_b)), y))

    grid = [lo_b + (hi_b - lo_b) * i / 64 for i in range(65)]
    best = min(grid, key=nll)
    step = (hi_b - lo_b) / 64
    lo, hi = max(best - step, lo_b), min(best + step, hi_b)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return math.exp(min(max((lo + hi) / 2, lo_b), hi_b))
