"""Per-sequence log-probabilities of response tokens, without a float32 copy of the logits.

The naive way (``log_softmax(logits.float()).gather(...)``, as TRL and princeton do) keeps a
float32 ``[batch, seq, vocab]`` log-softmax alive for backward next to the logits themselves,
which is most of a preference step's peak memory at realistic vocab sizes. Here the model
returns its logits in chunks along the sequence (``model.set_num_output_chunks(n)``, in the
model's dtype), and each chunk goes through :class:`_TokenLogps`, an autograd function that
saves only the chunk itself and a ``[batch, chunk]`` log-sum-exp: the float32 softmax exists
for one chunk at a time, in forward and again in backward.
"""

from typing import List, NamedTuple, Sequence, Union

import torch

__all__ = ["SequenceLogps", "sequence_logps", "token_logps"]


class _TokenLogps(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits), computed in float32 and saving only
    the input logits (in their own dtype) and the log-sum-exp for backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits_f = logits.float()
        lse = torch.logsumexp(logits_f, dim=-1)
        out = logits_f.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        # d/dlogits [logit_t - lse] = onehot(t) - softmax; softmax is rebuilt from lse in place.
        grad = torch.exp(logits.float() - lse.unsqueeze(-1))
        grad.mul_(-grad_out.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_out.unsqueeze(-1))
        return grad.to(logits.dtype), None


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``targets`` under ``logits`` (float32 result, float32 softmax math).

    Args:
        logits (torch.Tensor): ``[..., vocab]``, any floating dtype.
        targets (torch.Tensor): ``[...]`` integer token ids in ``[0, vocab)``.

    Returns:
        torch.Tensor: ``[...]`` float32 log-probs; differentiable w.r.t. ``logits``.
    """
    return _TokenLogps.apply(logits, targets)


class SequenceLogps(NamedTuple):
    """Output of :func:`sequence_logps`.

    Attributes:
        logps: ``[b]`` float32 average (or sum) log-prob of each row's response tokens.
        num_tokens: ``[b]`` int64 number of response tokens per row.
        logits_mean: ``[b]`` float32, detached mean of the row's logits over all positions and
            the vocabulary (TRL's ``logits/chosen`` / ``logits/rejected`` statistic).
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    logits_mean: torch.Tensor


def sequence_logps(
    logits: Union[torch.Tensor, Sequence[torch.Tensor]],
    labels: torch.Tensor,
    *,
    average: bool = True,
    ignore_index: int = -100,
) -> SequenceLogps:
    """Per-sequence average (SimPO) or summed log-probs of the labelled response tokens.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]`` (the usual causal shift); tokens
    whose label is ``ignore_index`` (prompt and padding) are not counted.

    Args:
        logits: ``[b, s, v]``, or a list of chunks ``[b, s_i, v]`` along the sequence with
            ``sum(s_i) == s`` (what a torchtune model returns after ``set_num_output_chunks``).
            Any floating dtype: the softmax is computed in float32 one chunk at a time.
        labels (torch.Tensor): ``[b, s]`` token ids, ``ignore_index`` where not scored.
        average (bool): mean over response tokens (True, SimPO's length-normalised reward) or sum.
        ignore_index (int): label value of unscored positions. Default -100.

    Returns:
        SequenceLogps: ``logps`` [b] (differentiable), ``num_tokens`` [b], ``logits_mean`` [b].

    Raises:
        ValueError: if the chunks' sequence lengths do not add up to ``labels``' length, if
            batch sizes differ, or if a row has no response token (naming the rows; a mean over
            zero tokens would otherwise be NaN, or a silent 0 with an epsilon).
    """
    chunks: List[torch.Tensor] = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    bsz, seq_len = labels.shape
    chunk_lens = [c.shape[1] for c in chunks]
    if any(c.dim() != 3 or c.shape[0] != bsz for c in chunks) or sum(chunk_lens) != seq_len:
        raise ValueError(
            f"logits chunks {[tuple(c.shape) for c in chunks]} do not match labels {tuple(labels.shape)}"
        )
    # Shift the labels instead of the logits, so that chunks need no re-slicing: the target of
    # position t is labels[t + 1]; the last position predicts nothing.
    targets = torch.cat(
        [labels[:, 1:], labels.new_full((bsz, 1), ignore_index)], dim=1
    )
    mask = targets != ignore_index
    num_tokens = mask.sum(-1)
    empty = (num_tokens == 0).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"rows {empty.tolist()} of the batch have no response tokens (every label is "
            f"{ignore_index}): their average log-prob is undefined. Drop such examples in the "
            "dataset (prefopt.data.preference_dataset does) or check the data's truncation."
        )
    safe_targets = targets.masked_fill(~mask, 0)

    total = labels.new_zeros((bsz,), dtype=torch.float32)
    logits_sum = labels.new_zeros((bsz,), dtype=torch.float32)
    start = 0
    for chunk, n in zip(chunks, chunk_lens):
        tok = token_logps(chunk, safe_targets[:, start : start + n])
        total = total + (tok * mask[:, start : start + n]).sum(-1)
        with torch.no_grad():
            logits_sum += chunk.detach().sum(dim=(1, 2), dtype=torch.float32)
        start += n
    logps = total / num_tokens if average else total
    vocab = chunks[0].shape[-1]
    return SequenceLogps(logps, num_tokens, logits_sum / (seq_len * vocab))
