"""Preference-optimization losses.

The reference-free family is prefopt's own: ``SimPOLoss`` (torchtune 0.6 removed its
``SimPOLoss``; CPO-SimPO and AlphaPO are options of it), ``CPOLoss`` (CPO, its hinge variant and
IPO on the policy alone) and ``ORPOLoss``. ``DPOLoss``, ``RSOLoss`` and ``PPOLoss`` are
torchtune's, re-exported unchanged so that a config can name every loss of the family as
``prefopt.loss.<Name>``.

Every loss here is a pure ``nn.Module``: hyper-parameters in ``__init__``, per-example losses
and detached rewards out of ``forward``; no reduction, no logging, no device moves.

**What a reference-free loss tells the step** (``prefopt.step.preference_forward`` reads these
attributes and never names a loss class):

- ``logps_reduction``: ``"average"`` (mean over each response's tokens) or ``"sum"``: how the
  step reduces each sequence's response-token log-probs into ``policy_*_logps``.
- ``chosen_nll``: ``None`` (no NLL term), ``"sequence"`` or ``"token"``. When not ``None`` the
  step passes ``chosen_nll=<[b] tensor>``, a per-example NLL whose mean over all examples of the
  optimizer step (all micro-batches, all ranks) is, for ``"sequence"``, the mean of each chosen
  response's token-mean NLL (``chosen_nll_i = -avg_logp_i``) and, for ``"token"``, the step's
  total chosen-token NLL over its total chosen tokens
  (``chosen_nll_i = -sum_logp_i * n_examples_in_step / n_chosen_tokens_in_step``). The step does
  that normalisation; the loss only weights the term.
- ``metric_names``: the extra per-example metrics ``metrics(...)`` returns (TRL's names).
"""

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.rlhf.loss import DPOLoss, PPOLoss, RSOLoss

__all__ = ["SimPOLoss", "CPOLoss", "ORPOLoss", "DPOLoss", "RSOLoss", "PPOLoss", "log1mexp"]

_LOSS_TYPES = ("sigmoid", "hinge")
_CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
_NLL_REDUCTIONS = ("sequence", "token")
_LN2 = math.log(2.0)


def _number(owner: str, name: str, value) -> float:
    """``value`` as a finite Python float: ints, floats, numpy scalars and 0-d / one-element
    tensors are numbers (torchtune 0.5 took them); bools, strings and NaN/inf are not."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: {name} must be a finite number, got {name}={value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {name}={value!r}")
    return value


def _check_choice(owner: str, name: str, value, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {name}={value!r}")
    return value


def _check_loss_type(owner: str, loss_type: str, choices: Tuple[str, ...], label_smoothing: float) -> None:
    """``loss_type`` one of ``choices``, and ``label_smoothing`` in [0, 0.5), non-zero only with
    the sigmoid loss (SimPO's and CPO's rule)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{owner}: label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")
    _check_choice(owner, "loss_type", loss_type, choices)
    if loss_type != "sigmoid" and label_smoothing > 0:
        raise ValueError(
            f"{owner}: label_smoothing applies to the sigmoid loss only; got "
            f"loss_type={loss_type!r} with label_smoothing={label_smoothing}"
        )


def _pairwise_losses(loss_type: str, z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """SimPO's and CPO's sigmoid (with label smoothing) or hinge loss of the scaled margin
    ``z = β · logits``, per example."""
    if loss_type == "sigmoid":
        return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return torch.relu(1 - z)


def _check_inputs(owner: str, chosen: torch.Tensor, rejected: torch.Tensor, chosen_nll: Optional[torch.Tensor]) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"{owner}: policy_chosen_logps and policy_rejected_logps must have the same shape, "
            f"got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    if chosen_nll is not None and chosen_nll.shape != chosen.shape:
        raise ValueError(
            f"{owner}: chosen_nll must have the shape of policy_chosen_logps {tuple(chosen.shape)}, "
            f"got {tuple(chosen_nll.shape)}"
        )


def _alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape ``(1 - p^(-alpha)) / alpha`` with ``p = exp(logps)``, written as
    ``-expm1(-alpha * logps) / alpha`` (the same number; TRL's ``exp(logps).pow(-alpha)`` turns into
    inf once ``exp(logps)`` underflows, e.g. summed log-probs below about -104 in fp32). It tends
    to ``logps`` as ``alpha -> 0``."""
    return -torch.expm1(-alpha * logps) / alpha


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable everywhere (Mächler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): ``log(-expm1(x))`` for ``x > -log 2`` (where ``1 - exp(x)`` would cancel)
    and ``log1p(-exp(x))`` below (where ``expm1`` would lose the small ``exp(x)``). Both branches
    are evaluated on clamped inputs so that neither produces a NaN gradient through ``where``."""
    near = x > -_LN2
    x_near = torch.where(near, x, torch.full_like(x, -_LN2))
    x_far = torch.where(near, torch.full_like(x, -_LN2), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


class SimPOLoss(nn.Module):
    r"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng, Xia and Chen,
    2024, https://arxiv.org/abs/2405.14734), with CPO-SimPO's NLL term and AlphaPO's reward shape.

    A drop-in for torchtune 0.5's ``torchtune.rlhf.loss.SimPOLoss`` (same constructor defaults,
    same ``forward(policy_chosen_logps, policy_rejected_logps)`` and 3-tuple output), plus
    princeton-nlp/SimPO's ``loss_type``, ``sft_weight`` and ``gamma_beta_ratio``, the reduction of
    the SFT term (``sft_reduction``) and AlphaPO's ``alpha``.

    The implicit reward of a response is its length-normalised log-likelihood scaled by β:
    ``r(x, y) = β · s(y)`` with ``s(y) = 1/|y| · Σ_i log π(y_i | x, y_<i)`` (the *average*
    log-prob, ``logps_reduction = "average"``). With ``logits = (s_w - s_l) - γ/β``:

    - ``sigmoid``: ``-logσ(β·logits)·(1-ε) - logσ(-β·logits)·ε``  (ε = ``label_smoothing``)
    - ``hinge``:   ``relu(1 - β·logits)``

    and each example's loss gains ``sft_weight · chosen_nll``.

    **AlphaPO** (Gupta et al. 2025, https://arxiv.org/abs/2501.03884; TRL's ``CPOConfig.alpha``):
    with ``alpha != 0`` the average log-prob ``s`` is replaced, before β and γ are applied, by
    ``(1 - p^(-α)) / α`` with ``p = exp(s)`` (the per-token geometric-mean probability), exactly as
    TRL's ``cpo_loss``; the rewards are β times the shaped value. ``alpha = 0`` is plain SimPO.
    TRL's ``loss_type="alphapo"`` is ``SimPOLoss(alpha=..., sft_weight=0)``.

    **γ convention.** ``gamma`` is the target reward margin in *reward units* (the paper's γ,
    and the convention of torchtune 0.5, TRL's ``simpo_gamma`` and Liger): the loss is
    ``-logσ(r_w - r_l - γ)``. princeton-nlp/SimPO's configs give ``gamma_beta_ratio`` = γ/β
    instead; pass it here and ``gamma`` is derived as ``gamma_beta_ratio · β``. Giving both is
    an error (also ``gamma=0.5`` given explicitly), because one would silently override the other.

    **SFT term** (``sft_weight > 0``; ``chosen_nll`` then tells the step ``sft_reduction``):

    - ``"token"`` (default): the step's total chosen-response NLL over its number of chosen
      response tokens. This is what both references compute: princeton-nlp/SimPO's
      ``get_batch_loss_metrics`` adds ``sft_weight · nn.CrossEntropyLoss()(chosen logits,
      chosen_labels)`` and TRL's ``CPOTrainer`` adds ``cpo_alpha · `` the same cross-entropy
      (``concatenated_forward``'s ``nll_loss``), both a mean over all chosen response tokens of
      the batch (tests/test_loss_family.py checks TRL's to 1e-6). The references take that mean
      per micro-batch and per rank; the step takes it over the whole optimizer step, which is the
      same at one micro-batch on one rank and does not change with gradient accumulation or the
      number of ranks.
    - ``"sequence"``: each example's own token-mean NLL, ``-policy_chosen_logps`` (the SimPO loss
      guide's formulation; weights short and long responses alike).

    Called without ``chosen_nll`` (torchtune 0.5's two-argument call), the SFT term falls back to
    ``-policy_chosen_logps``, the ``"sequence"`` term, whatever ``sft_reduction`` says.

    Args:
        beta (float): reward scale β (> 0). Default 2.0 (the paper uses 2.0-10).
        gamma (Optional[float]): target reward margin γ in reward units (>= 0). ``None`` (the
            default) is 0.5, or ``gamma_beta_ratio · beta`` when that is given.
        label_smoothing (float): ε in [0, 0.5): probability that a label is flipped (sigmoid only).
        loss_type (str): ``"sigmoid"`` (default) or ``"hinge"``.
        sft_weight (float): weight λ >= 0 of the chosen-response NLL term. Default 0.
        gamma_beta_ratio (Optional[float]): princeton's γ/β; if given, ``gamma`` must not be, and
            ``gamma = gamma_beta_ratio · beta``.
        sft_reduction (str): ``"token"`` (default) or ``"sequence"``, see above.
        alpha (float): AlphaPO's reward-shape parameter; 0 (default) is plain SimPO.

    Hyper-parameters may be Python, numpy or 0-d tensor numbers.

    Raises:
        ValueError: naming the argument and value, if β <= 0, γ < 0, γ/β < 0, label smoothing
            is outside [0, 0.5), ``loss_type`` or ``sft_reduction`` is unknown, hinge is combined
            with label smoothing, ``sft_weight`` < 0, any value is not a finite number, or both
            ``gamma`` and ``gamma_beta_ratio`` are given.
    """

    logps_reduction = "average"

    def __init__(
        self,
        beta: float = 2.0,
        # None, not 0.5: an explicit gamma=0.5 next to gamma_beta_ratio must be an error
        gamma: Optional[float] = None,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        sft_weight: float = 0.0,
        gamma_beta_ratio: Optional[float] = None,
        sft_reduction: str = "token",
        alpha: float = 0.0,
    ) -> None:
        super().__init__()
        owner = "SimPOLoss"
        gamma_given = gamma is not None
        beta = _number(owner, "beta", beta)
        gamma = _number(owner, "gamma", gamma) if gamma_given else 0.5
        label_smoothing = _number(owner, "label_smoothing", label_smoothing)
        sft_weight = _number(owner, "sft_weight", sft_weight)
        alpha = _number(owner, "alpha", alpha)
        if beta <= 0:
            raise ValueError(f"{owner}: beta must be > 0, got beta={beta}")
        if gamma_beta_ratio is not None:
            gamma_beta_ratio = _number(owner, "gamma_beta_ratio", gamma_beta_ratio)
            if gamma_given:
                raise ValueError(
                    f"{owner}: give either gamma (reward units) or gamma_beta_ratio (princeton's "
                    f"gamma/beta), not both: got gamma={gamma}, gamma_beta_ratio={gamma_beta_ratio}"
                )
            if gamma_beta_ratio < 0:
                raise ValueError(f"{owner}: gamma_beta_ratio must be >= 0, got gamma_beta_ratio={gamma_beta_ratio}")
            gamma = gamma_beta_ratio * beta
        if gamma < 0:
            raise ValueError(f"{owner}: gamma must be >= 0, got gamma={gamma}")
        _check_loss_type(owner, loss_type, _LOSS_TYPES, label_smoothing)
        if sft_weight < 0:
            raise ValueError(f"{owner}: sft_weight must be >= 0, got sft_weight={sft_weight}")
        _check_choice(owner, "sft_reduction", sft_reduction, _NLL_REDUCTIONS)
        self.beta = beta
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.loss_type = loss_type
        self.sft_weight = sft_weight
        self.sft_reduction = sft_reduction
        self.alpha = alpha
        self.chosen_nll: Optional[str] = sft_reduction if sft_weight > 0 else None
        self.metric_names: Tuple[str, ...] = ("nll_loss",) if sft_weight > 0 else ()

    @property
    def gamma_beta_ratio(self) -> float:
        """princeton's γ/β for this loss."""
        return self.gamma / self.beta

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
            f"loss_type={self.loss_type!r}, sft_weight={self.sft_weight}, "
            f"sft_reduction={self.sft_reduction!r}, alpha={self.alpha}"
        )

    def _scores(self, logps: torch.Tensor) -> torch.Tensor:
        return logps if self.alpha == 0 else _alphapo_reward(logps, self.alpha)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            policy_chosen_logps (torch.Tensor): average log-probs of the chosen responses, [b].
            policy_rejected_logps (torch.Tensor): average log-probs of the rejected responses, [b].
            chosen_nll (Optional[torch.Tensor]): the step's per-example chosen NLL term [b] in the
                ``sft_reduction`` convention (see the class docstring); ignored when
                ``sft_weight == 0``; ``-policy_chosen_logps`` when not given.

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: per-example ``losses`` [b] (not
            reduced), and the detached ``chosen_rewards`` and ``rejected_rewards`` [b]
            (β · logps, or β · the AlphaPO-shaped value).

        Raises:
            ValueError: if the inputs differ in shape.
        """
        _check_inputs("SimPOLoss", policy_chosen_logps, policy_rejected_logps, chosen_nll)
        chosen, rejected = self._scores(policy_chosen_logps), self._scores(policy_rejected_logps)
        logits = (chosen - rejected) - self.gamma / self.beta
        losses = _pairwise_losses(self.loss_type, self.beta * logits, self.label_smoothing)
        if self.sft_weight > 0:
            nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
            losses = losses + self.sft_weight * nll
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()

    def metrics(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``{"nll_loss": chosen_nll}`` (TRL's name; the unweighted term, detached, [b]) when
        ``sft_weight > 0``, else ``{}``."""
        _check_inputs("SimPOLoss", policy_chosen_logps, policy_rejected_logps, chosen_nll)
        if self.sft_weight == 0:
            return {}
        nll = -policy_chosen_logps if chosen_nll is None else chosen_nll
        return {"nll_loss": nll.detach()}


class CPOLoss(nn.Module):
    r"""Contrastive Preference Optimization (Xu et al. 2024, "Contrastive Preference Optimization:
    Pushing the Boundaries of LLM Performance in Machine Translation",
    https://arxiv.org/abs/2401.08417), as TRL's ``CPOTrainer`` computes it for ``loss_type``
    ``"sigmoid"`` / ``"hinge"`` / ``"ipo"`` (TRL's ``"simpo"`` is :class:`SimPOLoss`).

    The DPO loss with the reference model dropped (β → 0 in the paper's bound) plus a
    behaviour-cloning NLL term on the chosen responses. With ``s_w``/``s_l`` the chosen/rejected
    log-probs and ``logits = s_w - s_l``:

    - ``sigmoid`` (CPO, eq. 3 of the paper): ``-logσ(β·logits)·(1-ε) - logσ(-β·logits)·ε``
    - ``hinge`` (SLiC-style): ``relu(1 - β·logits)``
    - ``ipo`` (Azar et al. 2023, eq. 17, without the reference): ``(logits - 1/(2β))²``, β being
      IPO's τ

    and each example's loss gains ``cpo_alpha · chosen_nll``. The rewards are ``β · s``.

    **Log-prob convention** (``logps_reduction``): *summed* over the response tokens for sigmoid
    and hinge, *averaged* for ipo, exactly as TRL (``concatenated_forward`` passes
    ``average_log_prob=self.loss_type in ["ipo", "simpo"]``).

    **NLL term** (``cpo_alpha``, TRL's name, default 1.0 as TRL; the paper's L_NLL): with
    ``nll_reduction="token"`` (default), the step's total chosen-response NLL over its chosen
    response tokens, which is TRL's ``nn.CrossEntropyLoss()`` over the chosen labels (TRL takes it
    per micro-batch and rank; the step over the optimizer step: the same at one micro-batch on one
    rank). ``"sequence"``: each chosen response's token-mean NLL. A loss with ``cpo_alpha > 0``
    needs ``chosen_nll`` in ``forward``: with summed log-probs ``-policy_chosen_logps`` is not a
    mean, so there is no fallback.

    **AlphaPO** (``alpha != 0``, TRL's ``CPOConfig.alpha``, which "works with all loss types"):
    ``s`` is replaced by ``(1 - exp(s)^(-α)) / α`` before β (see :class:`SimPOLoss`); with summed
    log-probs that is the whole-sequence probability's power, as in TRL.

    Args:
        beta (float): β > 0 (TRL's default 0.1; the paper uses 0.1).
        label_smoothing (float): ε in [0, 0.5), sigmoid only (TRL ignores it with a warning for
            hinge/ipo; here that is an error).
        loss_type (str): ``"sigmoid"`` (default), ``"hinge"`` or ``"ipo"``.
        cpo_alpha (float): weight >= 0 of the NLL term. Default 1.0.
        nll_reduction (str): ``"token"`` (default) or ``"sequence"``.
        alpha (float): AlphaPO's reward-shape parameter; 0 (default) is off.

    Raises:
        ValueError: naming the argument and value, if β <= 0, ε is outside [0, 0.5) or given with
            hinge/ipo, ``loss_type``/``nll_reduction`` is unknown, ``cpo_alpha`` < 0, or any value
            is not a finite number.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        cpo_alpha: float = 1.0,
        nll_reduction: str = "token",
        alpha: float = 0.0,
    ) -> None:
        super().__init__()
        owner = "CPOLoss"
        beta = _number(owner, "beta", beta)
        label_smoothing = _number(owner, "label_smoothing", label_smoothing)
        cpo_alpha = _number(owner, "cpo_alpha", cpo_alpha)
        alpha = _number(owner, "alpha", alpha)
        if beta <= 0:
            raise ValueError(f"{owner}: beta must be > 0, got beta={beta}")
        _check_loss_type(owner, loss_type, _CPO_LOSS_TYPES, label_smoothing)
        if cpo_alpha < 0:
            raise ValueError(f"{owner}: cpo_alpha must be >= 0, got cpo_alpha={cpo_alpha}")
        _check_choice(owner, "nll_reduction", nll_reduction, _NLL_REDUCTIONS)
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.loss_type = loss_type
        self.cpo_alpha = cpo_alpha
        self.nll_reduction = nll_reduction
        self.alpha = alpha
        self.logps_reduction: str = "average" if loss_type == "ipo" else "sum"
        self.chosen_nll: Optional[str] = nll_reduction if cpo_alpha > 0 else None
        self.metric_names: Tuple[str, ...] = ("nll_loss",) if cpo_alpha > 0 else ()

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, label_smoothing={self.label_smoothing}, loss_type={self.loss_type!r}, "
            f"cpo_alpha={self.cpo_alpha}, nll_reduction={self.nll_reduction!r}, alpha={self.alpha}"
        )

    def _scores(self, logps: torch.Tensor) -> torch.Tensor:
        return logps if self.alpha == 0 else _alphapo_reward(logps, self.alpha)

    def _nll(self, chosen_nll: Optional[torch.Tensor]) -> torch.Tensor:
        if chosen_nll is None:
            raise ValueError(
                f"CPOLoss: cpo_alpha={self.cpo_alpha} > 0 needs chosen_nll (the step's "
                f"{self.nll_reduction!r} NLL term, [b]); got chosen_nll=None"
            )
        return chosen_nll

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            policy_chosen_logps (torch.Tensor): chosen log-probs [b], reduced as ``logps_reduction``.
            policy_rejected_logps (torch.Tensor): rejected log-probs [b], likewise.
            chosen_nll (Optional[torch.Tensor]): the per-example NLL term [b] (required when
                ``cpo_alpha > 0``, ignored otherwise).

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``losses`` [b] (not reduced),
            detached ``chosen_rewards`` and ``rejected_rewards`` [b].

        Raises:
            ValueError: if the inputs differ in shape, or ``chosen_nll`` is missing.
        """
        _check_inputs("CPOLoss", policy_chosen_logps, policy_rejected_logps, chosen_nll)
        chosen, rejected = self._scores(policy_chosen_logps), self._scores(policy_rejected_logps)
        logits = chosen - rejected
        if self.loss_type == "ipo":
            losses = (logits - 1 / (2 * self.beta)) ** 2
        else:
            losses = _pairwise_losses(self.loss_type, self.beta * logits, self.label_smoothing)
        if self.cpo_alpha > 0:
            losses = losses + self.cpo_alpha * self._nll(chosen_nll)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()

    def metrics(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``{"nll_loss": chosen_nll}`` (detached, [b]) when ``cpo_alpha > 0``, else ``{}``."""
        _check_inputs("CPOLoss", policy_chosen_logps, policy_rejected_logps, chosen_nll)
        if self.cpo_alpha == 0:
            return {}
        return {"nll_loss": self._nll(chosen_nll).detach()}


class ORPOLoss(nn.Module):
    r"""ORPO: Monolithic Preference Optimization without Reference Model (Hong, Lee and Thorne,
    2024, https://arxiv.org/abs/2403.07691), as TRL's ``ORPOTrainer.odds_ratio_loss``.

    With ``s_w``/``s_l`` the chosen/rejected *average* log-probs (``logps_reduction =
    "average"``; ``exp(s)`` is the paper's length-normalised ``P(y|x)``), the log odds ratio is

    ``log_odds = (s_w - s_l) - (log1mexp(s_w) - log1mexp(s_l))``, ``log1mexp(s) = log(1 - e^s)``

    (eqs. 4 and 7, with ``log odds(y|x) = s - log(1 - e^s)``), and each example's loss is

    ``chosen_nll - λ · logσ(log_odds)``   (L_SFT + λ·L_OR, eq. 6).

    ``log1mexp`` is computed stably (:func:`log1mexp`): ``log1p(-exp(s))`` alone loses all
    precision as ``s → 0``. The rewards are ``λ · s`` (TRL's ``chosen_rewards``).

    **NLL term** (``chosen_nll``, always on: ORPO's L_SFT has weight 1): with
    ``nll_reduction="token"`` (default), the step's total chosen NLL over its chosen tokens, like
    TRL's ``nn.CrossEntropyLoss()`` over the chosen sequences (per micro-batch and rank in TRL,
    over the optimizer step here). Note that TRL (like the authors' code) scores the *prompt and
    the response* tokens of the chosen sequence in that NLL (``labels`` = the input ids where the
    attention mask is 1), whereas the step's ``chosen_nll`` covers what it scores, the response
    tokens; the loss weights whatever term it is given (tests/test_loss_family.py checks both).
    ``"sequence"``: each chosen response's token-mean NLL. ``forward`` needs ``chosen_nll``.

    Metrics (TRL's names, per example; their means are TRL's logged values): ``nll_loss`` (the
    NLL term), ``log_odds_ratio`` (``logσ(log_odds)``) and ``log_odds_chosen`` (``log_odds``).

    Args:
        beta (float): λ > 0, the weight of the odds-ratio term (TRL's ``beta``, default 0.1; the
            authors' ``alpha``).
        nll_reduction (str): ``"token"`` (default) or ``"sequence"``.

    Raises:
        ValueError: naming the argument and value, if λ <= 0 or is not a finite number, or
            ``nll_reduction`` is unknown.
    """

    logps_reduction = "average"
    metric_names: Tuple[str, ...] = ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def __init__(self, beta: float = 0.1, nll_reduction: str = "token") -> None:
        super().__init__()
        beta = _number("ORPOLoss", "beta", beta)
        if beta <= 0:
            raise ValueError(f"ORPOLoss: beta must be > 0, got beta={beta}")
        _check_choice("ORPOLoss", "nll_reduction", nll_reduction, _NLL_REDUCTIONS)
        self.beta = beta
        self.nll_reduction = nll_reduction
        self.chosen_nll: Optional[str] = nll_reduction

    def extra_repr(self) -> str:
        return f"beta={self.beta}, nll_reduction={self.nll_reduction!r}"

    def _nll(self, chosen_nll: Optional[torch.Tensor]) -> torch.Tensor:
        if chosen_nll is None:
            raise ValueError(
                f"ORPOLoss: needs chosen_nll (the step's {self.nll_reduction!r} NLL term, [b]); "
                "got chosen_nll=None"
            )
        return chosen_nll

    @staticmethod
    def log_odds(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor) -> torch.Tensor:
        """Per-example ``log(odds(y_w|x) / odds(y_l|x))`` from average log-probs, in float32 at
        least (TRL upcasts to float32; float64 stays float64)."""
        dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
        chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
        return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            policy_chosen_logps (torch.Tensor): average log-probs of the chosen responses, [b] (< 0).
            policy_rejected_logps (torch.Tensor): average log-probs of the rejected responses, [b].
            chosen_nll (torch.Tensor): the per-example NLL term [b] (required).

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``losses`` [b] (not reduced),
            detached ``chosen_rewards`` and ``rejected_rewards`` (λ · logps) [b].

        Raises:
            ValueError: if the inputs differ in shape, or ``chosen_nll`` is missing.
        """
        _check_inputs("ORPOLoss", policy_chosen_logps, policy_rejected_logps, chosen_nll)
        nll = self._nll(chosen_nll)
        losses = nll - self.beta * F.logsigmoid(self.log_odds(policy_chosen_logps, policy_rejected_logps))
        return (
            losses,
            self.beta * policy_chosen_logps.detach().to(losses.dtype),
            self.beta * policy_rejected_logps.detach().to(losses.dtype),
        )

    def metrics(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-example, detached: ``nll_loss``, ``log_odds_ratio`` (logσ(log_odds)) and
        ``log_odds_chosen`` (log_odds)."""
        _check_inputs("ORPOLoss", policy_chosen_logps, policy_rejected_logps, chosen_nll)
        with torch.no_grad():
            log_odds = self.log_odds(policy_chosen_logps.detach(), policy_rejected_logps.detach())
            return {
                "nll_loss": self._nll(chosen_nll).detach(),
                "log_odds_ratio": F.logsigmoid(log_odds),
                "log_odds_chosen": log_odds,
            }
