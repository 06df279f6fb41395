"""Preference metrics under the names TRL's CPO/SimPO and princeton's trainer log.

:class:`PreferenceMetrics` keeps per-example *sums* on the device (no host sync per micro-batch)
and divides by the example count only in :meth:`PreferenceMetrics.compute`, so a step's
figures are example-weighted means over all of its gradient-accumulation micro-batches and,
when ``all_reduce`` is used, over all ranks -- whatever the micro-batch sizes were.
"""

from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from prefopt.step import PreferenceOutput

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
        extra_names (Sequence[str]): the loss's own metrics (its ``metric_names``, e.g. ORPO's
            ``nll_loss``, ``log_odds_ratio``, ``log_odds_chosen``), logged beside the base ones.
            Use :meth:`for_loss` to take them from the loss module.
    """

    def __init__(self, device: torch.device, extra_names: Sequence[str] = ()) -> None:
        self.names = _BASE + tuple(extra_names)
        self._sums = torch.zeros(len(self.names) + 1, device=device, dtype=torch.float64)

    @classmethod
    def for_loss(cls, loss_fn: nn.Module, device: torch.device) -> "PreferenceMetrics":
        """Metrics matching ``loss_fn``: the base ones plus its ``metric_names``."""
        return cls(device, extra_names=tuple(getattr(loss_fn, "metric_names", ())))

    @torch.no_grad()
    def update(self, out: "PreferenceOutput") -> None:
        """Add one micro-batch: the :class:`prefopt.step.PreferenceOutput` of its forward.

        Raises:
            KeyError: if the output lacks one of the loss's metrics.
        """
        cr, rr = out.chosen_rewards, out.rejected_rewards
        cols = [
            out.losses,
            cr,
            rr,
            (cr > rr).to(torch.float64),
            cr - rr,
            out.chosen.logps,
            out.rejected.logps,
            out.chosen.logits_mean,
            out.rejected.logits_mean,
        ] + [out.metrics[name] for name in self.names[len(_BASE):]]
        stacked = torch.stack([c.detach().to(torch.float64) for c in cols])  # [n_metrics, b]
        self._sums[:-1] += stacked.sum(-1)
        self._sums[-1] += out.losses.shape[0]

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
