"""PC-softmax, MI-learned and CMI-constrained losses against hand-computed values."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_ncmi.losses import create_objective
from wsi_ncmi.losses.cmi_ce import SEPARATION_FLOOR, CMIPenalty
from wsi_ncmi.losses.mi import MutualInformationLoss, marginal_entropy, mutual_information
from wsi_ncmi.losses.pc_softmax import PCSoftmaxLoss, class_priors, pointwise_mi

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.2, 2.5], [1.0, 1.0, 0.0]])
Y = torch.tensor([0, 1, 2, 1])


def _kl(a, b):
    return sum(a[j] * math.log(a[j] / b[j]) for j in range(len(a)))


def test_pc_softmax_matches_the_formula():
    pri = torch.tensor([0.6, 0.3, 0.1])
    hand = []
    for f, y in zip(LOGITS.tolist(), Y.tolist()):
        z = sum(pri[k] * math.exp(f[k]) for k in range(3))
        hand.append(-math.log(pri[y] * math.exp(f[y]) / z))
    assert float(PCSoftmaxLoss(pri)(LOGITS, Y)) == pytest.approx(np.mean(hand), rel=1e-6)
    # the MI estimate is the authors' un-normalised form: log exp f_y / sum_k pi_k exp f_k
    mi = [f[y] - math.log(sum(pri[k] * math.exp(f[k]) for k in range(3))) for f, y in zip(LOGITS.tolist(), Y.tolist())]
    assert pointwise_mi(LOGITS, Y, pri).tolist() == pytest.approx(mi, rel=1e-6)


def test_pc_softmax_equals_ce_when_priors_are_uniform():
    uniform = class_priors([0, 1, 2, 0, 1, 2], 3)
    assert torch.allclose(uniform, torch.full((3,), 1 / 3))
    assert float(PCSoftmaxLoss(uniform)(LOGITS, Y)) == pytest.approx(float(F.cross_entropy(LOGITS, Y)), rel=1e-6)
    assert float(class_priors([0, 0, 0, 1], 3)[2]) > 0        # an absent class still gets a pseudo-count


def test_mi_loss_is_ce_plus_the_label_entropy_cross_entropy():
    loss = MutualInformationLoss(3, weight=0.7, window=0)
    p = torch.softmax(LOGITS, 1).numpy()
    pbar = p.mean(0)
    prior = np.bincount(Y.numpy(), minlength=3) / 4
    hy = -sum(prior[k] * math.log(pbar[k]) for k in range(3))
    ce = float(F.cross_entropy(LOGITS, Y))
    assert float(loss(LOGITS, Y)) == pytest.approx(ce + 0.7 * hy, rel=1e-6)


def test_mi_label_entropy_estimate_is_the_entropy_of_the_batch_marginal():
    p = torch.softmax(LOGITS, 1)
    pbar = p.mean(0).numpy()
    assert float(marginal_entropy(p)) == pytest.approx(-sum(v * math.log(v) for v in pbar), rel=1e-6)
    # where the model's marginal equals the label distribution the loss term is exactly that entropy
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [0.5, 0.5, 1e-9]]))
    y = torch.tensor([0, 1, 2, 0])
    ce, hy = MutualInformationLoss(3, window=0).terms(logits, y)
    assert float(hy) == pytest.approx(float(marginal_entropy(torch.softmax(logits, 1))), rel=1e-5)
    ph = torch.softmax(logits, 1)
    h_cond = float(-(ph * ph.clamp_min(1e-8).log()).sum(1).mean())
    assert float(mutual_information(ph)) == pytest.approx(float(marginal_entropy(ph)) - h_cond, rel=1e-6)


def test_mi_window_pools_recent_samples_and_resumes_from_state():
    loss = MutualInformationLoss(3, window=3)
    loss.train()
    for i in range(4):                                     # the 4th sample overwrites the 1st
        loss(LOGITS[i:i + 1], Y[i:i + 1])
    assert int(loss.win_n) == 3
    assert sorted(loss.win_y.tolist()) == sorted(Y[1:].tolist())
    clone = MutualInformationLoss(3, window=3)
    clone.load_state_dict(loss.state_dict())
    x, y = torch.tensor([[0.3, -0.2, 0.9]]), torch.tensor([2])
    assert float(clone.terms(x, y)[1]) == pytest.approx(float(loss.terms(x, y)[1]))
    p = torch.cat([torch.softmax(LOGITS[1:], 1), torch.softmax(x, 1)]).mean(0)
    pri = np.bincount(torch.cat([Y[1:], y]).numpy(), minlength=3) / 4
    assert float(loss.terms(x, y)[1]) == pytest.approx(-sum(pri[k] * math.log(p[k]) for k in range(3)), rel=1e-6)
    loss.eval()
    loss(x, y)
    assert int(loss.win_pos) == 1                          # evaluation never writes the window


@pytest.mark.parametrize("scale", [1.0, 12.0])          # 12: saturated outputs, where the floor binds
def test_cmi_ce_is_ce_plus_lambda_concentration_minus_beta_floored_separation(scale):
    obj = create_objective("cmi_ce", 3, 8, cmi_lambda=0.4, cmi_beta=0.2)
    q = obj.cmi.centroids().detach().numpy()
    logits = LOGITS * scale
    p = torch.softmax(logits.double(), 1).numpy()
    conc = np.mean([_kl(p[i], q[y]) for i, y in enumerate(Y.tolist())])
    pf = np.maximum(p, SEPARATION_FLOOR)
    sep = np.mean([np.mean([_kl(q[k], pf[i]) for k in range(3) if k != y]) for i, y in enumerate(Y.tolist())])
    assert sep <= math.log(1 / SEPARATION_FLOOR) + 1e-9
    ce = float(F.cross_entropy(logits, Y))
    loss, pp = obj.network_loss(logits, None, Y)
    assert float(loss) == pytest.approx(ce + 0.4 * conc - 0.2 * sep, rel=1e-4)
    assert obj.alternating and obj.centroid_parameters() == [obj.cmi.centroid_logits]


def test_cmi_centroid_step_converges_to_the_class_means():
    torch.manual_seed(0)
    pen = CMIPenalty(3)
    p = torch.softmax(torch.randn(60, 3) * 2, 1)
    y = torch.arange(60) % 3
    opt = torch.optim.Adam([pen.centroid_logits], lr=0.05)
    for _ in range(800):
        opt.zero_grad()
        pen(p, y, "centroid").backward()
        opt.step()
    means = torch.stack([p[y == k].mean(0) for k in range(3)])
    assert torch.allclose(pen.centroids().detach(), means, atol=2e-3)


@pytest.mark.parametrize("name", ["pc_softmax", "mi", "cmi_ce"])
def test_information_losses_predict_with_the_softmax_head(name):
    obj = create_objective(name, 3, 8, [0, 0, 1, 2])
    assert not obj.predicts_by_centroid
    assert torch.allclose(obj.distribution(LOGITS, None), torch.softmax(LOGITS, 1))


def test_weighted_ce_weights_a_single_bag_step():
    """One bag per step is the MIL default: the class weight must survive it."""
    obj = create_objective("weighted_ce", 3, 8, [0, 0, 0, 0, 1, 2])
    w = obj.base.weight
    assert float((w[torch.tensor([0, 0, 0, 0, 1, 2])]).mean()) == pytest.approx(1.0)
    one = float(obj.network_loss(LOGITS[1:2], None, Y[1:2])[0])
    assert one == pytest.approx(float(w[1]) * float(F.cross_entropy(LOGITS[1:2], Y[1:2])), rel=1e-6)
    batch = float(obj.network_loss(LOGITS, None, Y)[0])
    per = F.cross_entropy(LOGITS, Y, reduction="none")
    assert batch == pytest.approx(float((per * w[Y]).mean()), rel=1e-6)
