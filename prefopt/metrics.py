"""Preference metrics under the names TRL's CPO/SimPO and princeton's trainer log.

:class:`PreferenceMetrics` keeps per-example *sums* on the device (no host sync per micro-batch)
and divides by the example count only in :meth:`PreferenceMetrics.compute`, so a step's
figures are example-weighted means over all of its gradient-accumulation micro-batches and,
when ``all_reduce`` is used, over all ranks -- whatever the micro-batch sizes were.
"""

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from prefopt.logprobs import SequenceLogps

__all__ = ["PreferenceMetrics"]

_BASE = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


class PreferenceMetrics:
    """Accumulator of per-example preference statistics.

    Args:
        device (torch.device): where the running sums live (the training device).
        include_sft (bool): also report ``sft_loss`` (the chosen responses' mean NLL, the term
            ``sft_weight`` multiplies). Use :meth:`for_loss` to decide it from the loss module.
    """

    def __init__(self, device: torch.device, include_sft: bool = False) -> None:
        self.names = _BASE + (("sft_loss",) if include_sft else ())
        self._sums = torch.zeros(len(self.names) + 1, device=device, dtype=torch.float64)

    @classmethod
    def for_loss(cls, loss_fn: nn.Module, device: torch.device) -> "PreferenceMetrics":
        """Metrics matching ``loss_fn``: ``sft_loss`` is included when it has ``sft_weight > 0``."""
        return cls(device, include_sft=float(getattr(loss_fn, "sft_weight", 0.0)) > 0)

    @torch.no_grad()
    def update(
        self,
        losses: torch.Tensor,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        chosen: SequenceLogps,
        rejected: SequenceLogps,
    ) -> None:
        """Add one micro-batch.

        Args:
            losses (torch.Tensor): per-example losses [b] (unreduced).
            chosen_rewards, rejected_rewards (torch.Tensor): [b].
            chosen, rejected (SequenceLogps): the log-prob outputs of the two halves of the batch.
        """
        cols = [
            losses,
            chosen_rewards,
            rejected_rewards,
            (chosen_rewards > rejected_rewards).to(torch.float64),
            chosen_rewards - rejected_rewards,
            chosen.logps,
            rejected.logps,
            chosen.logits_mean,
            rejected.logits_mean,
        ]
        if "sft_loss" in self.names:
            cols.append(-chosen.logps)
        stacked = torch.stack([c.detach().to(torch.float64) for c in cols])  # [n_metrics, b]
        self._sums[:-1] += stacked.sum(-1)
        self._sums[-1] += losses.shape[0]

    @property
    def count(self) -> torch.Tensor:
        """Number of examples accumulated (a 0-d tensor; reading it syncs)."""
        return self._sums[-1]

    def compute(self, all_reduce: bool = False, group: Optional[dist.ProcessGroup] = None) -> Dict[str, float]:
        """Example-weighted means since the last :meth:`reset` (one host sync; call on logging
        steps only). With ``all_reduce=True`` the sums are added across the process group
        first, so every rank returns the same global figures.

        Raises:
            RuntimeError: if nothing was accumulated.
        """
        sums = self._sums.clone()
        if all_reduce:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        values = sums.tolist()
        n = values[-1]
        if n == 0:
            raise RuntimeError("PreferenceMetrics.compute() called with no accumulated examples")
        return {name: v / n for name, v in zip(self.names, values[:-1])}

    def reset(self) -> None:
        self._sums.zero_()
