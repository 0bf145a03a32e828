"""Losses against values worked out by hand, and the uncertainty weighting's behaviour."""
import math

import pytest
import torch

from classify.errors import ConfigError
from classify.training.losses import MultiTaskLoss, focal_loss, make_loss, soft_f1_loss, task_targets
from classify.metrics import macro_f1, scores

LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
Y = torch.tensor([0, 2])


def _ce_by_hand():
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = 1 / (math.e + 2)
    return -(math.log(p0) + math.log(p1)) / 2, p0, p1


def test_ce_smooth_and_focal_match_hand_values():
    ce, p0, p1 = _ce_by_hand()
    assert make_loss("ce")(LOGITS, Y).item() == pytest.approx(ce, rel=1e-6)
    # smoothing 0.3 over 3 classes: target = 0.8 on the label, 0.1 elsewhere
    logp = torch.log_softmax(LOGITS, 1)
    by_hand = -(0.8 * logp[0, 0] + 0.1 * (logp[0, 1] + logp[0, 2]) + 0.8 * logp[1, 2] + 0.1 * (logp[1, 0] + logp[1, 1])) / 2
    assert make_loss("smooth", smoothing=0.3)(LOGITS, Y).item() == pytest.approx(by_hand.item(), rel=1e-6)
    focal = -((1 - p0) ** 2 * math.log(p0) + (1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(LOGITS, Y, gamma=2).item() == pytest.approx(focal, rel=1e-6)
    assert focal_loss(LOGITS, Y, gamma=0).item() == pytest.approx(ce, rel=1e-6)


def test_soft_f1_is_near_zero_when_right_and_large_when_wrong():
    y = torch.tensor([0, 1, 2, 1])
    right = torch.nn.functional.one_hot(y, 3).float() * 30
    wrong = torch.nn.functional.one_hot((y + 1) % 3, 3).float() * 30
    assert soft_f1_loss(right, y).item() < 1e-3
    assert soft_f1_loss(wrong, y).item() > 0.99
    with pytest.raises(ConfigError):
        make_loss("hinge")


def test_task_targets_decode_labels():
    t = task_targets(torch.tensor([0, 8, 17, 10]))
    assert t["mask"].tolist() == [0, 1, 2, 1]
    assert t["gender"].tolist() == [0, 0, 1, 1]
    assert t["age"].tolist() == [0, 2, 2, 1]


def test_uncertainty_weights_learn_inverse_loss_and_do_not_collapse():
    """With fixed task losses L_t, minimising exp(-s_t) L_t + s_t drives exp(-s_t) to 1/L_t, not to 0."""
    crit = MultiTaskLoss(lambda out, y: out.mean(), ("label", "mask"), weighting="uncertainty")
    opt = torch.optim.Adam(crit.parameters(), lr=0.05)
    outs = {"label": torch.tensor([[4.0]]), "mask": torch.tensor([[0.5]])}
    for _ in range(1500):
        total, _ = crit(outs, torch.tensor([0]))
        opt.zero_grad()
        total.backward()
        opt.step()
    w = torch.exp(-crit.log_vars).detach()
    assert w[0].item() == pytest.approx(1 / 4.0, rel=0.05) and w[1].item() == pytest.approx(1 / 0.5, rel=0.05)


def test_mixed_targets_weight_both_labels():
    crit = MultiTaskLoss(make_loss("ce"))
    logits = {"label": torch.randn(3, 18)}
    a, b = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    mixed, _ = crit(logits, a, b, lam=0.25)
    la, _ = crit(logits, a)
    lb, _ = crit(logits, b)
    assert mixed.item() == pytest.approx(0.25 * la.item() + 0.75 * lb.item(), rel=1e-6)


def test_macro_f1_matches_hand_computation():
    y = [0, 0, 1, 1, 2]
    p = [0, 1, 1, 1, 0]
    # class 0: tp1 fp1 fn1 → 0.5; class 1: tp2 fp1 fn0 → 0.8; class 2: tp0 fn1 → 0
    assert macro_f1(y, p, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    s = scores([0, 8, 17], [0, 8, 16])
    assert s["acc"] == pytest.approx(2 / 3) and s["mask_acc"] == 1.0 and s["age_acc"] == pytest.approx(2 / 3)


def test_class_weighted_ce_weighs_each_sample_by_its_rarity_and_splits_exactly():
    from classify.training.losses import class_weights

    counts = [6, 2, 0]  # 8 samples, 2 classes present: weights 8/(2*6), 8/(2*2), absent 0
    w = class_weights(counts)
    assert w.tolist() == pytest.approx([8 / 12, 2.0, 0.0])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 0])
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    by_hand = (per * torch.tensor([8 / 12, 2.0, 2.0, 8 / 12])).sum() / 4
    fn = make_loss("wce", class_counts=counts)
    assert fn(logits, y).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # the mean of two halves' losses is the whole batch's (what DDP and --accum rely on)
    assert ((fn(logits[:2], y[:2]) + fn(logits[2:], y[2:])) / 2).item() == pytest.approx(fn(logits, y).item(), rel=1e-6)
