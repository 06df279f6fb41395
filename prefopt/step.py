"""One preference step's forward, written once: tokens -> per-sequence log-probs -> loss ->
rewards and metric inputs. Both recipes, the parity tests and the benchmarks call
:func:`preference_forward`; the recipes keep the loop around it.

The step reads what the loss needs from the loss object and never names a loss class:

- ``loss_fn.logps_reduction``: ``"average"`` (default: SimPO's length-normalised log-probs) or
  ``"sum"`` (CPO) -- how each sequence's response-token log-probs become ``policy_*_logps``;
- ``loss_fn.chosen_nll``: ``None`` (default), ``"sequence"`` or ``"token"``; when set, the loss
  gets ``chosen_nll=[b]``, a per-example NLL term whose mean over all examples of the optimizer
  step is the mean of each chosen response's token-mean NLL (``"sequence"``), or the step's total
  chosen-token NLL over its total chosen tokens (``"token"``: princeton's sft term, TRL's
  ``cpo_alpha`` term) -- the step normalises, the loss only weights it;
- ``loss_fn.metric_names`` / ``loss_fn.metrics(...)``: the loss's own per-example metrics.
"""

from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from prefopt.attention import use_packed_attention
from prefopt.logprobs import SequenceLogps, model_sequence_logps
from prefopt.packing import packed_attention_mask, shared_prefix_rows

__all__ = ["PreferenceOutput", "preference_forward", "loss_needs"]

_REDUCTIONS = ("average", "sum")
_NLL = (None, "sequence", "token")


class PreferenceOutput(NamedTuple):
    """What one micro-batch's forward gives the loop.

    Attributes:
        losses: ``[b]`` per-pair losses (differentiable, not reduced).
        chosen_rewards, rejected_rewards: ``[b]`` detached rewards.
        chosen, rejected: :class:`~prefopt.logprobs.SequenceLogps` of the two halves (``logps``
            in the loss's reduction).
        metrics: the loss's own per-example metrics (``{name: [b]}``, detached).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen: SequenceLogps
    rejected: SequenceLogps
    metrics: Dict[str, torch.Tensor]


def loss_needs(loss_fn: nn.Module) -> Dict[str, Any]:
    """What ``loss_fn`` declares it needs (defaults: a torchtune-0.5-style ``SimPOLoss``).

    Raises:
        ValueError: for a declaration the step cannot provide, naming the loss and the value.
    """
    needs = {
        "logps_reduction": getattr(loss_fn, "logps_reduction", "average"),
        "chosen_nll": getattr(loss_fn, "chosen_nll", None),
        "metric_names": tuple(getattr(loss_fn, "metric_names", ())),
    }
    if needs["logps_reduction"] not in _REDUCTIONS:
        raise ValueError(f"{type(loss_fn).__name__}.logps_reduction must be one of {_REDUCTIONS}, got {needs['logps_reduction']!r}")
    if needs["chosen_nll"] not in _NLL:
        raise ValueError(f"{type(loss_fn).__name__}.chosen_nll must be one of {_NLL}, got {needs['chosen_nll']!r}")
    return needs


def preference_forward(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss_fn: nn.Module,
    *,
    device: torch.device,
    num_chunks: int = 16,
    chosen_tokens_per_pair: Optional[Union[float, torch.Tensor]] = None,
) -> PreferenceOutput:
    """Forward of one micro-batch of ``b`` pairs, padded or packed, and its loss.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (LoRA, FSDP2, compiled, AC alike).
        batch (Mapping[str, Any]): from :func:`prefopt.collate.padded_collate_preference` or
            :func:`prefopt.collate.packed_collate_preference` (the packed layout carries
            ``input_pos``, ``doc_pair`` and ``doc_kind``), on the CPU.
        loss_fn (nn.Module): a reference-free loss (see the module docstring for what it declares).
        device (torch.device): the training device; the batch is copied there without a sync.
        num_chunks (int): the scored positions are projected to the vocabulary in this many chunks.
        chosen_tokens_per_pair (Optional[float]): for a ``"token"`` NLL term, the scored
            chosen tokens of the whole optimizer step (all micro-batches and ranks) divided by its
            pairs; None uses this micro-batch's own (exact without accumulation on one process).

    Returns:
        PreferenceOutput: per-pair losses, rewards, both halves' log-probs, the loss's metrics.
    """
    needs = loss_needs(loss_fn)
    tokens = batch["tokens"].to(device, non_blocking=True)
    plan = batch["plan"].to(device, non_blocking=True)
    mask = input_pos = None
    if "input_pos" in batch:  # the packed, prefix-shared layout
        input_pos = batch["input_pos"].to(device, non_blocking=True)
        if torch.device(device).type == "cuda":  # a BlockMask, built on the device: FlexAttention
            mask = packed_attention_mask(
                batch["doc_pair"].to(device, non_blocking=True), batch["doc_kind"].to(device, non_blocking=True)
            )
        else:  # the layout's structure, read from the collate's CPU tensors: one SDPA call per part
            mask = shared_prefix_rows(batch["doc_pair"], batch["doc_kind"])
        use_packed_attention(model)  # prefopt.attention runs both
    out = model_sequence_logps(
        model, tokens, plan=plan, mask=mask, input_pos=input_pos, num_chunks=num_chunks, average=False
    )
    sums, n = out.logps, out.num_tokens  # [2b] summed log-probs, scored tokens
    logps = sums / n if needs["logps_reduction"] == "average" else sums
    b = n.shape[0] // 2
    chosen, rejected = out._replace(logps=logps).split(b)

    kwargs = {}
    if needs["chosen_nll"] == "sequence":
        kwargs["chosen_nll"] = -sums[:b] / n[:b]
    elif needs["chosen_nll"] == "token":
        # a Python float from the CPU counts: dividing by it needs no device sync
        per_pair = n[:b].sum() / b if chosen_tokens_per_pair is None else float(chosen_tokens_per_pair)
        kwargs["chosen_nll"] = -sums[:b] / per_pair
    losses, chosen_rewards, rejected_rewards = loss_fn(chosen.logps, rejected.logps, **kwargs)
    metrics = loss_fn.metrics(chosen.logps, rejected.logps, **kwargs) if needs["metric_names"] else {}
    return PreferenceOutput(losses, chosen_rewards, rejected_rewards, chosen, rejected, metrics)
