"""Tier 1: the SimPO loss, worked by hand against the seeds' numbers."""

import math

import pytest
import torch
from torch.testing import assert_close

import prefopt.loss as L
from prefopt.loss import SimPOLoss


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def test_loss_guide_example_1():
    # simpo_loss_functions_guide "Example 1": beta=2, gamma/beta=0.5, chosen -1.2, rejected -2.5.
    # logits = 1.3 - 0.5 = 0.8; -log sigmoid(1.6) = 0.18390
    loss = SimPOLoss(beta=2.0, gamma_beta_ratio=0.5)
    losses, cr, rr = loss(t(-1.2), t(-2.5))
    assert_close(losses, t(0.183901), atol=1e-5, rtol=0)
    assert_close(cr, t(-2.4))
    assert_close(rr, t(-5.0))
    # The same loss in reward units (gamma = 0.5 * 2 = 1.0), the torchtune/TRL convention.
    assert_close(SimPOLoss(beta=2.0, gamma=1.0)(t(-1.2), t(-2.5))[0], losses)
    assert SimPOLoss(beta=2.0, gamma_beta_ratio=0.5).gamma == 1.0


def test_loss_guide_example_2_is_corrected():
    # The guide's "Example 2" (beta=2.5, gamma/beta=0.5, sft_weight=0.1) reuses 0.184, which was
    # computed at beta=2.0, and reports 0.304. The math at beta=2.5: -log sigmoid(2.5*0.8) =
    # -log sigmoid(2.0) = 0.126928; plus 0.1 * 1.2 = 0.246928. The seed is wrong; the math wins.
    loss = SimPOLoss(beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.1)
    value = loss(t(-1.2), t(-2.5))[0]
    assert_close(value, t(0.126928 + 0.12), atol=1e-5, rtol=0)
    assert abs(value.item() - 0.2469) < 5e-5
    assert abs(value.item() - 0.304) > 0.05


def test_explainer_margin_example():
    # simpo_explained_with_trl: r_w = -0.5, r_l = -1.2, gamma = 0.5 -> -log sigmoid(0.2) = 0.598.
    # Rewards are beta * logps: with beta = 2, logps -0.25 and -0.6.
    losses, cr, rr = SimPOLoss(beta=2.0, gamma=0.5)(t(-0.25), t(-0.6))
    assert_close(cr - rr, t(0.7))
    assert_close(losses, t(-math.log(1 / (1 + math.exp(-0.2)))), atol=1e-6, rtol=0)
    assert round(losses.item(), 3) == 0.598


def test_hinge_by_hand():
    loss = SimPOLoss(beta=2.0, gamma=1.0, loss_type="hinge")
    # logits = (-1.0 + 1.2) - 0.5 = -0.3 -> relu(1 + 0.6) = 1.6 ; margin met -> 0
    assert_close(loss(t(-1.0, -1.2), t(-1.2, -2.5))[0], t(1.6, 0.0), atol=1e-6, rtol=0)


def test_label_smoothing_by_hand():
    # eps = 0.1: 0.9 * -log sigmoid(1.6) + 0.1 * -log sigmoid(-1.6) = 0.9*0.183901 + 0.1*1.783901
    loss = SimPOLoss(beta=2.0, gamma=1.0, label_smoothing=0.1)
    assert_close(loss(t(-1.2), t(-2.5))[0], t(0.343901), atol=1e-5, rtol=0)


def test_rewards_are_detached_and_losses_unreduced():
    c = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    r = torch.tensor([-1.5, -1.0, -3.0], requires_grad=True)
    losses, cr, rr = SimPOLoss()(c, r)
    assert losses.shape == (3,) and losses.requires_grad
    assert not cr.requires_grad and not rr.requires_grad


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=2.0, gamma=0.5),
        dict(beta=2.5, gamma=1.4, label_smoothing=0.2),
        dict(beta=10.0, gamma_beta_ratio=0.3, sft_weight=0.5),
        dict(beta=2.0, gamma=0.5, loss_type="hinge", sft_weight=0.1),
    ],
)
def test_gradcheck_float64(kwargs):
    torch.manual_seed(0)
    loss = SimPOLoss(**kwargs)
    c = (torch.randn(6, dtype=torch.float64) - 1).requires_grad_()
    r = (torch.randn(6, dtype=torch.float64) - 2).requires_grad_()
    if kwargs.get("loss_type") == "hinge":  # keep away from the kink at beta*logits == 1
        with torch.no_grad():
            z = kwargs["beta"] * ((c - r) - loss.gamma / loss.beta)
            c += torch.where((z - 1).abs() < 1e-2, 0.1, 0.0)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b)[0], (c, r))


def test_gradient_matches_closed_form():
    # dL/dc = -beta * sigmoid(-beta*logits) for the sigmoid loss without smoothing.
    beta, gamma = 2.0, 1.0
    c = torch.tensor([-1.2], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-2.5], dtype=torch.float64, requires_grad=True)
    SimPOLoss(beta=beta, gamma=gamma)(c, r)[0].sum().backward()
    expected = -beta * torch.sigmoid(torch.tensor(-1.6, dtype=torch.float64))
    assert_close(c.grad, expected.reshape(1))
    assert_close(r.grad, -expected.reshape(1))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(beta=0.0), "beta=0.0"),
        (dict(beta=-1.0), "beta=-1.0"),
        (dict(gamma=-0.1), "gamma=-0.1"),
        (dict(label_smoothing=0.5), "label_smoothing=0.5"),
        (dict(label_smoothing=-0.1), "label_smoothing=-0.1"),
        (dict(loss_type="ipo"), "loss_type='ipo'"),
        (dict(loss_type="hinge", label_smoothing=0.1), "loss_type='hinge'"),
        (dict(gamma=1.0, gamma_beta_ratio=0.5), "not both"),
        (dict(gamma_beta_ratio=-0.5), "gamma_beta_ratio=-0.5"),
        (dict(sft_weight=-1.0), "sft_weight=-1.0"),
        (dict(beta=float("nan")), "beta must be a finite number"),
    ],
)
def test_bad_hyper_parameters_name_argument_and_value(kwargs, needle):
    with pytest.raises(ValueError, match=None) as e:
        SimPOLoss(**kwargs)
    assert needle in str(e.value)


def test_torchtune_05_signature_compatible():
    # torchtune 0.5: SimPOLoss(beta=2.0, gamma=0.5, label_smoothing=0.0), forward(policy_chosen_logps, policy_rejected_logps)
    loss = SimPOLoss(2.0, 0.5, 0.0)
    out = loss(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-2.0))
    assert len(out) == 3
    assert (SimPOLoss().beta, SimPOLoss().gamma, SimPOLoss().label_smoothing) == (2.0, 0.5, 0.0)


def test_other_losses_reachable():
    import torchtune.rlhf.loss as ttl

    assert L.DPOLoss is ttl.DPOLoss and L.PPOLoss is ttl.PPOLoss and L.RSOLoss is ttl.RSOLoss
    # and they are the working modules: DPO on identical policy/reference gives log 2.
    losses, _, _ = L.DPOLoss(beta=0.1)(t(-1.0), t(-2.0), t(-1.0), t(-2.0))
    assert_close(losses, t(math.log(2)))
