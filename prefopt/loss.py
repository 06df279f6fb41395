"""Preference-optimization losses.

``SimPOLoss`` is prefopt's own (torchtune 0.6 removed its ``SimPOLoss``); ``DPOLoss``,
``RSOLoss`` and ``PPOLoss`` are torchtune's, re-exported unchanged so that a config can name
every loss of the family as ``prefopt.loss.<Name>``.

Every loss here is a pure ``nn.Module``: hyper-parameters in ``__init__``, per-example losses
and detached rewards out of ``forward``; no reduction, no logging, no device moves.
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.rlhf.loss import DPOLoss, PPOLoss, RSOLoss

__all__ = ["SimPOLoss", "DPOLoss", "RSOLoss", "PPOLoss"]

_LOSS_TYPES = ("sigmoid", "hinge")


class SimPOLoss(nn.Module):
    r"""SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng, Xia and Chen,
    2024, https://arxiv.org/abs/2405.14734).

    A drop-in for torchtune 0.5's ``torchtune.rlhf.loss.SimPOLoss`` (same constructor defaults,
    same ``forward`` signature and outputs), plus princeton-nlp/SimPO's ``loss_type``,
    ``sft_weight`` and ``gamma_beta_ratio``.

    The implicit reward of a response is its length-normalised log-likelihood scaled by β:
    ``r(x, y) = β / |y| · Σ_i log π(y_i | x, y_<i)``. With ``logits = (c - r) - γ/β`` where
    ``c``/``r`` are the chosen/rejected *average* log-probs:

    - ``sigmoid``: ``-logσ(β·logits)·(1-ε) - logσ(-β·logits)·ε``  (ε = ``label_smoothing``)
    - ``hinge``:   ``relu(1 - β·logits)``

    and each example's loss gains ``sft_weight · (-c)``.

    **γ convention.** ``gamma`` is the target reward margin in *reward units* (the paper's γ,
    and the convention of torchtune 0.5, TRL's ``simpo_gamma`` and Liger): the loss is
    ``-logσ(r_w - r_l - γ)``. princeton-nlp/SimPO's configs give ``gamma_beta_ratio`` = γ/β
    instead; pass it here and ``gamma`` is derived as ``gamma_beta_ratio · β``. Giving both is
    an error, because one would silently override the other.

    **SFT term.** ``sft_weight · (-policy_chosen_logps)`` uses the same per-sequence *average*
    log-prob as the reward (the SimPO loss guide's formulation), so each example's SFT term is
    its own token-mean NLL. princeton's trainer instead adds ``sft_weight`` × the cross-entropy
    of the chosen tokens averaged over *all* chosen tokens of the batch; the two agree when
    every chosen response in the batch has the same length and differ in how long and short
    responses are weighted otherwise.

    Args:
        beta (float): reward scale β (> 0). Default 2.0 (the paper uses 2.0-10).
        gamma (float): target reward margin γ in reward units (>= 0). Default 0.5.
        label_smoothing (float): ε in [0, 0.5): probability that a label is flipped (sigmoid only).
        loss_type (str): ``"sigmoid"`` (default) or ``"hinge"``.
        sft_weight (float): weight λ >= 0 of the chosen-response NLL term. Default 0.
        gamma_beta_ratio (Optional[float]): princeton's γ/β; if given, ``gamma`` must be left at
            its default and ``gamma = gamma_beta_ratio · beta``.

    Raises:
        ValueError: naming the argument and value, if β <= 0, γ < 0, γ/β < 0, label smoothing
            is outside [0, 0.5), ``loss_type`` is unknown, hinge is combined with label
            smoothing, ``sft_weight`` < 0, any value is not finite, or both ``gamma`` (non-default)
            and ``gamma_beta_ratio`` are given.
    """

    def __init__(
        self,
        beta: float = 2.0,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        sft_weight: float = 0.0,
        gamma_beta_ratio: Optional[float] = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("beta", beta),
            ("gamma", gamma),
            ("label_smoothing", label_smoothing),
            ("sft_weight", sft_weight),
        ) + ((("gamma_beta_ratio", gamma_beta_ratio),) if gamma_beta_ratio is not None else ()):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SimPOLoss: {name} must be a finite number, got {value!r}")
        if beta <= 0:
            raise ValueError(f"SimPOLoss: beta must be > 0, got beta={beta}")
        if gamma_beta_ratio is not None:
            if gamma != 0.5:
                raise ValueError(
                    f"SimPOLoss: give either gamma (reward units) or gamma_beta_ratio (princeton's "
                    f"gamma/beta), not both: got gamma={gamma}, gamma_beta_ratio={gamma_beta_ratio}"
                )
            if gamma_beta_ratio < 0:
                raise ValueError(
                    f"SimPOLoss: gamma_beta_ratio must be >= 0, got gamma_beta_ratio={gamma_beta_ratio}"
                )
            gamma = gamma_beta_ratio * beta
        if gamma < 0:
            raise ValueError(f"SimPOLoss: gamma must be >= 0, got gamma={gamma}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(
                f"SimPOLoss: label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}"
            )
        if loss_type not in _LOSS_TYPES:
            raise ValueError(
                f"SimPOLoss: loss_type must be one of {_LOSS_TYPES}, got loss_type={loss_type!r}"
            )
        if loss_type == "hinge" and label_smoothing > 0:
            raise ValueError(
                f"SimPOLoss: label_smoothing applies to the sigmoid loss only; got "
                f"loss_type='hinge' with label_smoothing={label_smoothing}"
            )
        if sft_weight < 0:
            raise ValueError(f"SimPOLoss: sft_weight must be >= 0, got sft_weight={sft_weight}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.loss_type = loss_type
        self.sft_weight = float(sft_weight)
        # What prefopt.step.preference_forward computes for this loss.
        self.chosen_nll = "sequence" if self.sft_weight > 0 else None
        self.metric_names = ("sft_loss",) if self.sft_weight > 0 else ()

    logps_reduction = "average"

    @property
    def gamma_beta_ratio(self) -> float:
        """princeton's γ/β for this loss."""
        return self.gamma / self.beta

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
            f"loss_type={self.loss_type!r}, sft_weight={self.sft_weight}"
        )

    def metrics(
        self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_nll: Optional[torch.Tensor] = None
    ) -> Dict[str, torch.Tensor]:
        """Per-example ``sft_loss`` (the chosen NLL term ``sft_weight`` multiplies), detached."""
        if self.sft_weight == 0:
            return {}
        nll = chosen_nll if chosen_nll is not None else -policy_chosen_logps
        return {"sft_loss": nll.detach()}

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

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: per-example ``losses`` [b] (not
            reduced), and the detached ``chosen_rewards`` and ``rejected_rewards`` (β · logps) [b].

        Raises:
            ValueError: if the two inputs differ in shape.
        """
        if policy_chosen_logps.shape != policy_rejected_logps.shape:
            raise ValueError(
                "SimPOLoss: policy_chosen_logps and policy_rejected_logps must have the same shape, "
                f"got {tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
            )
        logits = (policy_chosen_logps - policy_rejected_logps) - self.gamma / self.beta
        if self.loss_type == "sigmoid":
            losses = (
                -F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing)
                - F.logsigmoid(-self.beta * logits) * self.label_smoothing
            )
        else:
            losses = torch.relu(1 - self.beta * logits)
        if self.sft_weight > 0:
            nll = chosen_nll if chosen_nll is not None else -policy_chosen_logps
            losses = losses + self.sft_weight * nll
        chosen_rewards = self.beta * policy_chosen_logps.detach()
        rejected_rewards = self.beta * policy_rejected_logps.detach()
        return losses, chosen_rewards, rejected_rewards
