"""Tier 1: the reference-free losses (SimPO, CPO-SimPO, AlphaPO, CPO, IPO, ORPO), worked by hand;
SimPO's also against the seeds' numbers. Parity with TRL: tests/test_loss_family.py."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import prefopt.loss as L
from prefopt.loss import CPOLoss, ORPOLoss, SimPOLoss, log1mexp


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
        (dict(gamma=0.5, gamma_beta_ratio=0.25), "not both"),  # 0.5 is the default's value
        (dict(sft_reduction="mean"), "sft_reduction='mean'"),
        (dict(alpha=float("inf")), "alpha must be a finite number"),
        (dict(beta=True), "beta=True"),
        (dict(beta="2.0"), "beta='2.0'"),
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


# ---------------------------------------------------------------------------------------------
# SimPO: hyper-parameters as numpy / 0-d tensor numbers, the SFT term's reduction, AlphaPO


def test_numpy_and_tensor_hyper_parameters_are_numbers():
    # torchtune 0.5 took them (no validation); config-derived values are often numpy scalars.
    loss = SimPOLoss(beta=np.float32(2.0), gamma=torch.tensor(1.0), sft_weight=np.float64(0.0))
    assert type(loss.beta) is float and type(loss.gamma) is float and (loss.beta, loss.gamma) == (2.0, 1.0)
    assert_close(loss(t(-1.2), t(-2.5))[0], t(0.183901), atol=1e-5, rtol=0)
    assert CPOLoss(beta=np.float32(0.25), cpo_alpha=torch.tensor(0.5)).beta == 0.25
    assert ORPOLoss(beta=torch.tensor(0.2, dtype=torch.float64)).beta == 0.2
    with pytest.raises(ValueError, match="beta=tensor"):
        SimPOLoss(beta=torch.tensor([1.0, 2.0]))


def test_explicit_default_gamma_with_ratio_is_an_error_and_default_unchanged():
    with pytest.raises(ValueError, match="not both"):
        SimPOLoss(gamma=0.5, gamma_beta_ratio=0.25)
    assert SimPOLoss().gamma == 0.5 and type(SimPOLoss().gamma) is float
    assert SimPOLoss(beta=4.0, gamma_beta_ratio=0.25).gamma == 1.0


def test_simpo_declares_what_the_step_needs():
    assert SimPOLoss().logps_reduction == "average"
    assert SimPOLoss().chosen_nll is None and SimPOLoss().metric_names == ()
    assert SimPOLoss(sft_weight=0.1).chosen_nll == "token"  # the default: princeton's and TRL's term
    assert SimPOLoss(sft_weight=0.1, sft_reduction="sequence").chosen_nll == "sequence"
    assert SimPOLoss(sft_weight=0.1).metric_names == ("nll_loss",)


def test_simpo_sft_term_weights_the_given_chosen_nll():
    # base: beta=2, gamma=1 -> -log sigmoid(1.6) = 0.183901; plus 0.5 * chosen_nll.
    loss = SimPOLoss(beta=2.0, gamma=1.0, sft_weight=0.5)
    c, r = t(-1.2, -1.2), t(-2.5, -2.5)
    losses = loss(c, r, chosen_nll=t(3.0, 0.2))[0]
    assert_close(losses, t(0.183901 + 1.5, 0.183901 + 0.1), atol=1e-5, rtol=0)
    # torchtune 0.5's two-argument call: the "sequence" term -c = 1.2, whatever sft_reduction says.
    assert_close(loss(c, r)[0], t(0.183901 + 0.6, 0.183901 + 0.6), atol=1e-5, rtol=0)
    assert_close(loss.metrics(c, r, chosen_nll=t(3.0, 0.2))["nll_loss"], t(3.0, 0.2))
    assert_close(loss.metrics(c, r)["nll_loss"], t(1.2, 1.2))
    # sft_weight 0: chosen_nll is ignored, no metric.
    assert_close(SimPOLoss(beta=2.0, gamma=1.0)(c, r, chosen_nll=t(3.0, 0.2))[0], t(0.183901, 0.183901), atol=1e-5, rtol=0)
    assert SimPOLoss().metrics(c, r) == {}


def test_simpo_alphapo_by_hand():
    # alpha=0.5, beta=2, gamma=0: r(s) = (1 - exp(s)^-0.5) / 0.5 on the average log-probs
    # r(-1) = 2 * (1 - e^0.5) = -1.297443, r(-2) = 2 * (1 - e^1) = -3.436564
    # -log sigmoid(2 * 2.139121) = -log sigmoid(4.278242) = 0.0137717; rewards 2 * r.
    losses, cr, rr = SimPOLoss(beta=2.0, gamma=0.0, alpha=0.5)(t(-1.0), t(-2.0))
    assert_close(losses, t(0.0137717), atol=1e-6, rtol=0)
    assert_close(cr, t(-2.594885), atol=1e-5, rtol=0)
    assert_close(rr, t(-6.873127), atol=1e-5, rtol=0)
    # alpha -> 0 is plain SimPO (r -> s)
    c, r = t(-1.0, -0.3), t(-2.0, -0.4)
    assert_close(SimPOLoss(alpha=1e-6)(c, r)[0], SimPOLoss()(c, r)[0], atol=1e-5, rtol=0)


def test_alphapo_stays_finite_where_exp_underflows():
    # exp(-200) underflows to 0 in fp32: TRL's exp(s).pow(-alpha) is inf there; -expm1(-alpha*s)/alpha
    # is (1 - e^20)/0.1 = -4.8517e9.
    losses, cr, _ = CPOLoss(beta=0.1, alpha=0.1, cpo_alpha=0.0)(t(-200.0), t(-201.0))
    assert torch.isfinite(losses).all() and torch.isfinite(cr).all()
    assert_close(cr, t(0.1 * (1 - math.exp(20.0)) / 0.1), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# CPO / IPO


def test_cpo_declares_what_the_step_needs():
    assert CPOLoss().logps_reduction == "sum" and CPOLoss(loss_type="hinge").logps_reduction == "sum"
    assert CPOLoss(loss_type="ipo").logps_reduction == "average"  # TRL: average_log_prob for ipo/simpo
    assert CPOLoss().chosen_nll == "token" and CPOLoss().metric_names == ("nll_loss",)  # TRL's cpo_alpha=1.0
    assert CPOLoss(cpo_alpha=0.0).chosen_nll is None and CPOLoss(cpo_alpha=0.0).metric_names == ()
    assert CPOLoss(nll_reduction="sequence").chosen_nll == "sequence"


def test_cpo_sigmoid_by_hand():
    # beta=0.1, summed log-probs -10 and -15: -log sigmoid(0.1 * 5) = 0.474077; + 1.0 * nll 2.0
    losses, cr, rr = CPOLoss(beta=0.1)(t(-10.0), t(-15.0), chosen_nll=t(2.0))
    assert_close(losses, t(2.474077), atol=1e-6, rtol=0)
    assert_close(cr, t(-1.0)) and assert_close(rr, t(-1.5))
    # label smoothing 0.2: 0.8 * 0.474077 + 0.2 * (0.474077 + 0.5) (since -log sigmoid(-z) = -log sigmoid(z) + z)
    smoothed = CPOLoss(beta=0.1, label_smoothing=0.2, cpo_alpha=0.0)(t(-10.0), t(-15.0))[0]
    assert_close(smoothed, t(0.474077 + 0.2 * 0.5), atol=1e-6, rtol=0)
    assert_close(CPOLoss(beta=0.1).metrics(t(-10.0), t(-15.0), chosen_nll=t(2.0))["nll_loss"], t(2.0))


def test_cpo_hinge_and_ipo_by_hand():
    # hinge: relu(1 - 0.1 * 5) = 0.5 ; relu(1 - 0.1 * 12) = 0
    hinge = CPOLoss(beta=0.1, loss_type="hinge", cpo_alpha=0.0)(t(-10.0, -3.0), t(-15.0, -15.0))[0]
    assert_close(hinge, t(0.5, 0.0), atol=1e-6, rtol=0)
    # ipo on average log-probs, beta = tau = 0.1: (1 - 1/0.2)^2 = 16 ; (0.5 - 5)^2 = 20.25 ; + 0.5 * nll
    ipo = CPOLoss(beta=0.1, loss_type="ipo", cpo_alpha=0.5)(t(-1.0, -1.0), t(-2.0, -1.5), chosen_nll=t(1.0, 0.0))[0]
    assert_close(ipo, t(16.5, 20.25), atol=1e-5, rtol=0)


def test_cpo_alphapo_by_hand():
    # alpha=0.1 on summed log-probs: r(-10) = (1 - e^1)/0.1 = -17.182818, r(-15) = (1 - e^1.5)/0.1
    # = -34.816891; -log sigmoid(0.1 * 17.634072) = 0.1582505; rewards 0.1 * r.
    losses, cr, rr = CPOLoss(beta=0.1, alpha=0.1, cpo_alpha=0.0)(t(-10.0), t(-15.0))
    assert_close(losses, t(0.1582505), atol=1e-6, rtol=0)
    assert_close(cr, t(-1.7182818), atol=1e-6, rtol=0)
    assert_close(rr, t(-3.4816891), atol=1e-6, rtol=0)


def test_cpo_needs_chosen_nll_when_weighted():
    with pytest.raises(ValueError, match="cpo_alpha=1.0 > 0 needs chosen_nll"):
        CPOLoss()(t(-10.0), t(-15.0))
    with pytest.raises(ValueError, match="needs chosen_nll"):
        CPOLoss().metrics(t(-10.0), t(-15.0))
    assert_close(CPOLoss(cpo_alpha=0.0)(t(-10.0), t(-15.0))[0], t(0.474077), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# ORPO


def test_log1mexp_is_stable():
    x64 = torch.tensor([-1e-7, -1e-3, -0.5, -math.log(2), -1.0, -20.0, -50.0], dtype=torch.float64)
    # float64 reference (each form where it is exact in double): log(-expm1(x)) near 0, log1p(-exp(x)) far
    exact = torch.tensor(
        [math.log(-math.expm1(v)) if v > -1 else math.log1p(-math.exp(v)) for v in x64.tolist()], dtype=torch.float64
    )
    got = log1mexp(x64.float())
    assert_close(got.double(), exact, rtol=1e-6, atol=0)  # relative: -1.9287e-22 at -50
    assert_close(got[0], t(-16.118096)[0], rtol=1e-6, atol=0)
    # the naive form loses it near 0: in fp32 log1p(-exp(-1e-7)) = -15.94 (exact -16.118), and
    # log1p(-exp(-1e-9)) = log1p(-1) = -inf (exact -20.723; ours below)
    assert abs(torch.log1p(-torch.exp(t(-1e-7))).item() - (-16.118096)) > 0.1
    assert torch.isinf(torch.log1p(-torch.exp(t(-1e-9))))[0]
    assert_close(log1mexp(t(-1e-9)), t(math.log(1e-9)), rtol=1e-6, atol=0)
    # gradients finite on both sides of the branch point (no NaN leaking through torch.where)
    x = torch.tensor([-1e-7, -0.69, -0.7, -50.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    assert_close(x.grad[1:3], -torch.exp(x[1:3].detach()) / (1 - torch.exp(x[1:3].detach())))


def test_orpo_declares_what_the_step_needs():
    loss = ORPOLoss()
    assert loss.logps_reduction == "average" and loss.chosen_nll == "token" and loss.beta == 0.1
    assert loss.metric_names == ("nll_loss", "log_odds_ratio", "log_odds_chosen")
    assert ORPOLoss(nll_reduction="sequence").chosen_nll == "sequence"


def test_orpo_by_hand():
    # s_w = -0.5, s_l = -1.0: log(1 - e^-0.5) = -0.932752, log(1 - e^-1) = -0.458675
    # log_odds = 0.5 - (-0.932752 + 0.458675) = 0.974077; log sigmoid(0.974077) = -0.320300
    # loss = nll 0.7 - 0.1 * (-0.320300) = 0.732030; rewards 0.1 * s.
    c, r, nll = t(-0.5), t(-1.0), t(0.7)
    loss = ORPOLoss(beta=0.1)
    losses, cr, rr = loss(c, r, chosen_nll=nll)
    assert_close(losses, t(0.7320300), atol=1e-6, rtol=0)
    assert_close(cr, t(-0.05)) and assert_close(rr, t(-0.1))
    m = loss.metrics(c, r, chosen_nll=nll)
    assert set(m) == set(loss.metric_names)
    assert_close(m["log_odds_chosen"], t(0.974077), atol=1e-6, rtol=0)
    assert_close(m["log_odds_ratio"], t(-0.320300), atol=1e-6, rtol=0)
    assert_close(m["nll_loss"], nll)
    with pytest.raises(ValueError, match="ORPOLoss: needs chosen_nll"):
        loss(c, r)


def test_orpo_gradient_closed_form():
    # d/ds_w [-lam * log sigmoid(L)] = -lam * sigmoid(-L) * dL/ds_w, dL/ds_w = 1 + e^s/(1-e^s) = 1/(1-e^s)
    lam = 0.25
    c = torch.tensor([-0.5], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    nll = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    ORPOLoss(beta=lam)(c, r, chosen_nll=nll)[0].sum().backward()
    s = torch.sigmoid(torch.tensor(-0.9740769841801067, dtype=torch.float64))
    assert_close(c.grad, (-lam * s / (1 - math.exp(-0.5))).reshape(1))
    assert_close(r.grad, (lam * s / (1 - math.exp(-1.0))).reshape(1))
    assert_close(nll.grad, torch.ones(1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# all three: gradcheck, shapes, unreduced outputs, detached rewards


FAMILY = [
    (SimPOLoss, dict(beta=2.5, gamma=1.0, alpha=0.25, sft_weight=0.3)),
    (SimPOLoss, dict(beta=2.0, gamma=0.5, sft_weight=0.3, sft_reduction="sequence")),
    (CPOLoss, dict(beta=0.1, label_smoothing=0.1)),
    (CPOLoss, dict(beta=0.5, loss_type="ipo", alpha=-0.2)),
    (CPOLoss, dict(beta=0.1, alpha=0.05, cpo_alpha=0.0)),
    (ORPOLoss, dict(beta=0.2)),
]


@pytest.mark.parametrize("cls, kwargs", FAMILY)
def test_family_gradcheck_and_outputs(cls, kwargs):
    torch.manual_seed(0)
    loss = cls(**kwargs)
    c = (-torch.rand(5, dtype=torch.float64) - 0.05).requires_grad_()  # average log-probs in (-1.05, -0.05)
    r = (-torch.rand(5, dtype=torch.float64) * 2 - 0.05).requires_grad_()
    nll = torch.rand(5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, n: loss(a, b, chosen_nll=n)[0], (c, r, nll))
    losses, cr, rr = loss(c, r, chosen_nll=nll)
    assert losses.shape == (5,) and losses.requires_grad
    assert not cr.requires_grad and not rr.requires_grad
    m = loss.metrics(c, r, chosen_nll=nll)
    assert tuple(m) == loss.metric_names and all(v.shape == (5,) and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("cls, kwargs", FAMILY)
def test_family_shape_mismatch_is_an_error(cls, kwargs):
    loss = cls(**kwargs)
    with pytest.raises(ValueError, match="same shape"):
        loss(t(-1.0, -2.0), t(-1.0), chosen_nll=t(1.0, 1.0))
    with pytest.raises(ValueError, match="chosen_nll must have the shape"):
        loss(t(-1.0, -2.0), t(-1.0, -3.0), chosen_nll=t(1.0))


@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (CPOLoss, dict(beta=0.0), "beta=0.0"),
        (CPOLoss, dict(beta=-0.1), "beta=-0.1"),
        (CPOLoss, dict(label_smoothing=0.5), "label_smoothing=0.5"),
        (CPOLoss, dict(loss_type="simpo"), "loss_type='simpo'"),
        (CPOLoss, dict(loss_type="hinge", label_smoothing=0.1), "loss_type='hinge'"),
        (CPOLoss, dict(loss_type="ipo", label_smoothing=0.1), "loss_type='ipo'"),
        (CPOLoss, dict(cpo_alpha=-1.0), "cpo_alpha=-1.0"),
        (CPOLoss, dict(nll_reduction="sum"), "nll_reduction='sum'"),
        (CPOLoss, dict(alpha=float("nan")), "alpha must be a finite number"),
        (CPOLoss, dict(beta=np.bool_(True)), "beta must be a finite number"),
        (ORPOLoss, dict(beta=0.0), "beta=0.0"),
        (ORPOLoss, dict(beta=float("inf")), "beta must be a finite number"),
        (ORPOLoss, dict(nll_reduction="mean"), "nll_reduction='mean'"),
    ],
)
def test_family_bad_hyper_parameters_name_argument_and_value(cls, kwargs, needle):
    with pytest.raises(ValueError) as e:
        cls(**kwargs)
    assert needle in str(e.value) and cls.__name__ in str(e.value)
