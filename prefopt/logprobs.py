"""Per-sequence log-probabilities of response tokens, without a float32 copy of the logits.

Two entry points:

* :func:`model_sequence_logps` (what the recipes use) runs a torchtune ``TransformerDecoder`` and
  projects to the vocabulary only the positions whose next token is scored (the response
  tokens, about half of a preference batch), through :class:`_LinearTokenLogps`, which keeps
  no logits at all for backward: it saves the hidden states, the output weight and a log-sum-exp
  per token, and recomputes each chunk's logits in backward. The output layer is most of a
  small model's step and most of any model's activation memory at 128k-152k vocabularies.
* :func:`sequence_logps` takes logits the caller already has (whole or as chunks).

The naive way (``log_softmax(logits.float()).gather(...)``, as TRL and princeton do) keeps a
float32 ``[batch, seq, vocab]`` log-softmax alive for backward next to the logits themselves,
which is most of a preference step's peak memory at realistic vocab sizes. For logits in hand
(e.g. chunks from ``model.set_num_output_chunks(n)``), each chunk goes through
:class:`_TokenLogps`, an autograd function that saves only the chunk itself and a log-sum-exp:
the float32 softmax exists for one chunk at a time, in forward and again in backward.
"""

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torchtune.modules import TiedLinear

__all__ = [
    "SequenceLogps",
    "ScorePlan",
    "score_plan_from_labels",
    "scored_token_logps",
    "model_sequence_logps",
    "sequence_logps",
    "token_logps",
    "linear_token_logps",
]


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


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets [b, s], mask [b, s], num_tokens [b]): position t's target is labels[t + 1] (the
    labels are shifted instead of the logits, so chunks need no re-slicing; the last position
    predicts nothing). Raises ValueError naming the rows with no labelled token: a mean over
    zero tokens would be NaN, or a silent 0 with an epsilon."""
    bsz = labels.shape[0]
    targets = torch.cat([labels[:, 1:], labels.new_full((bsz, 1), ignore_index)], dim=1)
    mask = targets != ignore_index
    num_tokens = mask.sum(-1)
    empty = (num_tokens == 0).nonzero().flatten()
    if empty.numel() > 0:
        raise _empty_rows_error(empty.tolist(), ignore_index)
    return targets, mask, num_tokens


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

    def split(self, b: int) -> Tuple["SequenceLogps", "SequenceLogps"]:
        """(first ``b`` sequences, the rest): the chosen and rejected halves of a batch."""
        return SequenceLogps(*(t[:b] for t in self)), SequenceLogps(*(t[b:] for t in self))


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
    targets, mask, num_tokens = _shifted_targets(labels, ignore_index)
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


# ------------------------------------------------------------------------------------------------
# Output projection fused with the log-prob, at the scored positions only.


# A chunk of the scored positions is at least this many rows (fewer when there are fewer): each
# chunk's matmuls read the whole [V, d] output weight, three times per step, so tiny chunks (a
# short-response batch in 16 chunks: ~9 rows each) cost weight bandwidth for little work. The
# extra memory is one [128, V] float32 block (64 MB at V = 128k).
MIN_CHUNK_ROWS = 128


def _chunk_bounds(n: int, num_chunks: int) -> List[Tuple[int, int]]:
    size = max(1, -(-n // max(1, num_chunks)), min(MIN_CHUNK_ROWS, n))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(h @ W.T)[target] for the rows of ``h``, one chunk of rows at a time.

    Saves ``h``, ``W`` (both already alive: the activation and the parameter) and a float32
    log-sum-exp per row; backward recomputes each chunk's logits (one extra ``[chunk, d] x [d, V]``
    matmul) instead of keeping ``[N, V]`` logits from forward.

    Each pass allocates one float32 ``[chunk, V]`` buffer (plus one in the model's dtype for a
    low-precision model) and reuses it for every chunk, doing the softmax arithmetic in place:
    a fresh vocab-sized tensor per chunk and per op costs page faults (CPU) or allocator churn.

    With a logit soft-cap ``c`` (Gemma 2) each chunk's logits become ``c * tanh(z / c)`` before
    the log-softmax, in forward and in the recomputation of backward, which keeps ``tanh(z / c)``
    in one more float32 buffer for the chain rule (``d/dz = 1 - tanh(z / c)^2``).
    """

    @staticmethod
    def _logits_into(h_chunk, weight_t, buf, fbuf):
        """float32 logits of ``h_chunk`` written into the reused buffer(s); returns the view."""
        n = h_chunk.shape[0]
        torch.mm(h_chunk, weight_t, out=buf[:n])
        if fbuf is None:
            return buf[:n]
        return fbuf[:n].copy_(buf[:n])

    @staticmethod
    def _buffers(h, weight, bounds):
        """The reused ``[chunk, V]`` buffer(s) for the largest (first) chunk of ``bounds``."""
        rows = bounds[0][1] - bounds[0][0] if bounds else 0
        buf = torch.empty(rows, weight.shape[0], dtype=h.dtype, device=h.device)
        fbuf = None if h.dtype == torch.float32 else torch.empty(buf.shape, dtype=torch.float32, device=h.device)
        return buf, fbuf

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_chunks: int,
                logit_soft_cap: Optional[float] = None):
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        bounds = _chunk_bounds(h.shape[0], num_chunks)
        buf, fbuf = _LinearTokenLogps._buffers(h, weight, bounds)
        # W.T as a view: a contiguous [d, V] copy made MKL's GEMM ~20% faster on CPU but added a
        # weight-sized buffer to the peak; memory first.
        weight_t = weight.t()
        for s, e in bounds:
            logits = _LinearTokenLogps._logits_into(h[s:e], weight_t, buf, fbuf)
            if logit_soft_cap is not None:
                logits.div_(logit_soft_cap).tanh_().mul_(logit_soft_cap)
            picked = logits.gather(-1, targets[s:e, None]).squeeze(-1)
            # log-sum-exp in place: max, subtract, exp, sum (the buffer is overwritten).
            m = logits.amax(dim=-1)
            lse[s:e] = logits.sub_(m[:, None]).exp_().sum(dim=-1).log_().add_(m)
            out[s:e] = picked - lse[s:e]
        del buf, fbuf
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.num_chunks = num_chunks
        ctx.logit_soft_cap = logit_soft_cap
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        # Accumulate the weight gradient over chunks in float32: with a bf16 weight, adding
        # num_chunks partial products in bf16 would round each time (one matmul would not).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        bounds = _chunk_bounds(h.shape[0], ctx.num_chunks)
        buf, fbuf = _LinearTokenLogps._buffers(h, weight, bounds)
        cap = ctx.logit_soft_cap
        tanh_buf = None if cap is None else torch.empty(buf.shape, dtype=torch.float32, device=h.device)
        weight_t = weight.t()
        for s, e in bounds:
            # d/dlogits [logit_t - lse] = onehot(t) - softmax, scaled by the incoming gradient.
            g = _LinearTokenLogps._logits_into(h[s:e], weight_t, buf, fbuf)
            if cap is not None:
                t = torch.tanh(g.div_(cap), out=tanh_buf[: e - s])
                g = torch.mul(t, cap, out=g)  # the capped logits, as in forward
            g.sub_(lse[s:e, None]).exp_().mul_(-grad_out[s:e, None])
            g.scatter_add_(-1, targets[s:e, None], grad_out[s:e, None])
            if cap is not None:
                g.mul_(t.square_().neg_().add_(1))  # through the cap: d(c tanh(z/c))/dz = 1 - tanh^2
            g_low = g if fbuf is None else buf[: e - s].copy_(g)
            if need_h:
                torch.mm(g_low, weight, out=grad_h[s:e])
            if need_w:
                if g_low.is_cuda and g_low.dtype != torch.float32:
                    # bf16 x bf16 on the tensor cores, float32 out; accumulated in float32 across
                    # chunks (a float32 GEMM runs without tensor cores when TF32 is off, torchtune's
                    # default: ~+30-40% step time for a 1B full run, estimated)
                    grad_w.add_(torch.mm(g_low.t(), h[s:e], out_dtype=torch.float32))
                else:
                    grad_w.addmm_(g.t(), h[s:e].float())
        del buf, fbuf, tanh_buf
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_chunks: int = 16,
    logit_soft_cap: Optional[float] = None,
) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[targets]`` without keeping the logits for backward.

    With ``logit_soft_cap`` c, ``log_softmax(c * tanh(hidden @ weight.T / c))[targets]``: Gemma 2's
    final soft-cap applies to each logit before the log-softmax, chunk by chunk.

    Args:
        hidden (torch.Tensor): ``[N, d]`` hidden states (any floating dtype).
        weight (torch.Tensor): ``[V, d]`` output projection weight (no bias), same dtype.
        targets (torch.Tensor): ``[N]`` integer token ids in ``[0, V)``.
        num_chunks (int): rows are processed in this many chunks; peak extra memory is one
            ``[N / num_chunks, V]`` float32 block (two in backward with a soft-cap).
        logit_soft_cap (Optional[float]): the final logit soft-cap (> 0), or None for none.

    Returns:
        torch.Tensor: ``[N]`` float32 log-probs, differentiable w.r.t. ``hidden`` and ``weight``.

    Raises:
        ValueError: if the shapes do not fit together.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, d] and [V, d]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] with N = {hidden.shape[0]}")
    if logit_soft_cap is not None and not logit_soft_cap > 0:
        raise ValueError(f"logit_soft_cap must be > 0 or None, got {logit_soft_cap}")
    return _LinearTokenLogps.apply(hidden, weight, targets, num_chunks, logit_soft_cap)


class ScorePlan(NamedTuple):
    """Which hidden states score which tokens, built on the CPU from the batch (no device sync).

    A batch holds ``nseq`` sequences (rows ``[:b]`` chosen, ``[b:]`` rejected, in both layouts)
    laid out in ``tokens`` ``[R, L]``: one sequence per row (the padded layout) or several pairs
    per row with each prompt once (the packed layout, :mod:`prefopt.packing`).

    Attributes:
        score_index: ``[N]`` int64, flat index into ``tokens.view(-1)`` of the position whose
            hidden state predicts each scored token (a shared prompt's last position appears
            twice: once for the chosen response's first token, once for the rejected one's).
        score_targets: ``[N]`` int64 token ids being scored.
        score_seq: ``[N]`` int64 sequence (0 .. nseq-1) each scored token belongs to.
        seq_num_tokens: ``[nseq]`` int64 scored tokens per sequence.
        pos_segment: ``[R * L]`` int64 segment of each position (``num_segments`` for padding);
            a sequence's positions are the union of its segments.
        seg_to_seq: ``[num_segments, nseq]`` float32 0/1, which segments make up which sequence.
        seq_positions: ``[nseq]`` int64 positions of each sequence (its own, not padding).
    """

    score_index: torch.Tensor
    score_targets: torch.Tensor
    score_seq: torch.Tensor
    seq_num_tokens: torch.Tensor
    pos_segment: torch.Tensor
    seg_to_seq: torch.Tensor
    seq_positions: torch.Tensor

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "ScorePlan":
        return ScorePlan(*(t.to(device, non_blocking=non_blocking) for t in self))

    @property
    def num_sequences(self) -> int:
        return self.seg_to_seq.shape[1]


def _empty_rows_error(rows: Sequence[int], ignore_index: int) -> ValueError:
    return ValueError(
        f"rows {list(rows)} of the batch have no response tokens (every label is "
        f"{ignore_index}): their average log-prob is undefined. Drop such examples in the "
        "dataset (prefopt.data.preference_dataset does) or check the data's truncation."
    )


def score_plan_from_labels(
    labels: torch.Tensor, ignore_index: int = -100, seq_lens: Optional[torch.Tensor] = None
) -> ScorePlan:
    """The :class:`ScorePlan` of a padded batch: row ``i`` is sequence ``i``, position ``t``
    scores ``labels[i, t + 1]`` where that is not ``ignore_index``.

    Args:
        labels (torch.Tensor): ``[b, s]`` labels (on the CPU for a sync-free training step).
        ignore_index (int): label of unscored positions.
        seq_lens (Optional[torch.Tensor]): ``[b]`` real (non-padding) length of each row; None
            counts every position as the row's own (for ``logits_mean``).

    Raises:
        ValueError: naming the rows with no scored token.
    """
    bsz, seq_len = labels.shape
    targets, mask, num_tokens = _shifted_targets(labels, ignore_index)
    flat = mask.reshape(-1).nonzero().squeeze(1)
    if seq_lens is None:
        seq_lens = torch.full((bsz,), seq_len, dtype=torch.long, device=labels.device)
    pos = torch.arange(seq_len, device=labels.device)
    rows = torch.arange(bsz, device=labels.device)
    pos_segment = torch.where(pos[None, :] < seq_lens[:, None], rows[:, None], bsz).reshape(-1)
    return ScorePlan(
        score_index=flat,
        score_targets=targets.reshape(-1).index_select(0, flat),
        score_seq=flat // seq_len,
        seq_num_tokens=num_tokens,
        pos_segment=pos_segment,
        seg_to_seq=torch.eye(bsz, dtype=torch.float32, device=labels.device),
        seq_positions=seq_lens.to(torch.long),
    )


def _fusable_head(output: object) -> Optional[nn.Module]:
    """The module whose forward becomes the fused projection, for a bias-free linear output
    layer: ``nn.Linear`` (FSDP2's ``FSDPLinear`` included: it subclasses nn.Linear) or
    torchtune's ``TiedLinear`` (whose ``linear`` submodule takes the tied weight as an
    argument). None for anything else (LoRA on the output, NF4, a bias), which then runs as a
    module on chunks of the scored positions."""
    if isinstance(output, TiedLinear):
        return output.linear
    if isinstance(output, nn.Linear) and output.bias is None:
        weight = output.weight
        if type(weight) not in (torch.Tensor, nn.Parameter) and not _is_dtensor(weight):
            return None  # e.g. an NF4 tensor subclass
        return output
    return None


def _is_dtensor(t: object) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def _attr_replaced(obj: object, name: str, value) -> Iterator[None]:
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


def scored_token_logps(
    model: nn.Module,
    tokens: torch.Tensor,
    plan: ScorePlan,
    *,
    mask: Optional[object] = None,
    input_pos: Optional[torch.Tensor] = None,
    num_chunks: int = 16,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run a torchtune ``TransformerDecoder`` on ``tokens`` and return the log-prob of every
    scored token of ``plan`` and each sequence's summed logits.

    Only the ``N`` scored positions go through the output layer. For a bias-free linear output
    layer (soft-capped or not: an output with a ``logit_soft_cap`` attribute, Gemma 2's, has it
    applied to each chunk of logits) the projection is fused with the log-softmax (:func:`linear_token_logps`: no logits
    kept for backward) and runs as that layer's own forward, called inside the model's forward:
    FSDP2 gathers the output weight there once (whether the output layer is its own FSDP unit
    or part of the root), and reduces its gradient once. Other output layers run as modules
    on ``num_chunks`` chunks of the scored positions.

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder`` (LoRA, FSDP2, compiled per layer or
            activation-checkpointed alike).
        tokens (torch.Tensor): ``[R, L]`` token ids.
        plan (ScorePlan): on the tokens' device.
        mask: ``[R, L, L]`` boolean attention mask or a FlexAttention ``BlockMask`` (packed
            layout); None for the causal mask of the padded layout.
        input_pos (Optional[torch.Tensor]): ``[R, L]`` RoPE positions (packed layout).
        num_chunks (int): the scored positions are projected in this many chunks.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``[N]`` float32 token log-probs (differentiable) and
        ``[nseq]`` float32 detached sums of the logits over each sequence's positions and the
        vocabulary (for TRL's ``logits/*`` statistic; exact for any affine output layer; for a
        soft-capped one, the sum of the logits before the cap: the cap is not affine, and the
        capped sum would need every position's logits).
    """
    head = _fusable_head(model.output)
    cap = getattr(model.output, "logit_soft_cap", None)
    num_segments = plan.seg_to_seq.shape[0]
    result = {}

    def fused_forward(x, weight=None):
        # The output module's own forward: under FSDP2 its (or the root's) pre-forward hook has
        # gathered the weight, so module.weight is the plain unsharded tensor here.
        w = weight if weight is not None else head.weight
        with torch.no_grad():
            result["logits_sum"] = result.pop("h_sum") @ w.sum(dim=0, dtype=torch.float32)
        return linear_token_logps(x, w, plan.score_targets, num_chunks, logit_soft_cap=cap)

    def unembed(h: torch.Tensor):
        h = model.norm(h)  # [R, L, d]
        flat = h.reshape(-1, h.shape[-1])
        scored = flat.index_select(0, plan.score_index)  # [N, d]
        with torch.no_grad():
            seg = torch.zeros(num_segments + 1, flat.shape[1], dtype=torch.float32, device=flat.device)
            seg.index_add_(0, plan.pos_segment, flat.float())
            h_sum = plan.seg_to_seq.t() @ seg[:num_segments]  # [nseq, d]
        if head is not None:
            result["h_sum"] = h_sum
            if isinstance(model.output, TiedLinear):
                # TiedLinear's own call, minus a soft-cap wrapper's cap (fused_forward applies it)
                return head(scored, model.output.tied_module.weight)
            return model.output(scored)
        out = model.output
        tok = torch.cat([
            token_logps(out(scored[s:e]), plan.score_targets[s:e])
            for s, e in _chunk_bounds(scored.shape[0], num_chunks)
        ])
        with torch.no_grad():
            # sum_t f(h_t) = f(sum_t h_t) + (n - 1) f(0) for an affine f (a bias counted per position)
            f0 = out(h_sum.new_zeros(1, h_sum.shape[1]).to(h.dtype)).float().sum(-1)
            result["logits_sum"] = out(h_sum.to(h.dtype)).float().sum(-1) + (plan.seq_positions - 1) * f0
        return tok

    with contextlib.ExitStack() as ctx:
        ctx.enter_context(_attr_replaced(model, "unembed", unembed))
        if head is not None:
            ctx.enter_context(_attr_replaced(head, "forward", fused_forward))
        kwargs = {}
        if mask is not None:
            kwargs["mask"] = mask
        if input_pos is not None:
            kwargs["input_pos"] = input_pos
        tok = model(tokens, **kwargs)
    return tok, result["logits_sum"]


def reduce_to_sequences(tok: torch.Tensor, plan: ScorePlan) -> torch.Tensor:
    """``[nseq]`` summed log-probs of each sequence's scored tokens (differentiable)."""
    return torch.zeros(plan.num_sequences, dtype=tok.dtype, device=tok.device).index_add(0, plan.score_seq, tok)


def model_sequence_logps(
    model: nn.Module,
    tokens: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    plan: Optional[ScorePlan] = None,
    mask: Optional[object] = None,
    input_pos: Optional[torch.Tensor] = None,
    num_chunks: int = 16,
    average: bool = True,
    ignore_index: int = -100,
) -> SequenceLogps:
    """Run a torchtune ``TransformerDecoder`` and return per-sequence log-probs of the labelled
    tokens, projecting to the vocabulary only the positions that predict a labelled token.

    Equal to ``sequence_logps(model(tokens), labels)`` (to float rounding) in the padded layout,
    with the output layer applied to ``N`` scored positions instead of ``b * s``, and, for a
    bias-free linear output layer, no logits kept for backward (see :func:`scored_token_logps`).

    Args:
        model (nn.Module): a torchtune ``TransformerDecoder``.
        tokens (torch.Tensor): ``[R, L]`` token ids.
        labels (Optional[torch.Tensor]): ``[b, s]`` (padded layout, ``ignore_index`` where not
            scored); the plan is then built from them (one device sync). Give either this or
            ``plan``.
        plan (Optional[ScorePlan]): built by the collate function on the CPU (both layouts).
        mask, input_pos: the packed layout's attention mask and RoPE positions.
        num_chunks (int): the scored positions are projected in this many chunks.
        average (bool): mean over response tokens (SimPO) or sum.
        ignore_index (int): label value of unscored positions.

    Returns:
        SequenceLogps: ``logps`` [nseq] (differentiable), ``num_tokens`` [nseq], ``logits_mean``
        [nseq] (TRL's ``logits/*`` statistic: the mean logit over the sequence's positions and
        the vocabulary; with ``labels`` every position of the row counts, padding included).

    Raises:
        ValueError: if ``tokens`` and ``labels`` differ in shape, neither or both of ``labels``
            and ``plan`` are given, or a row has no labelled token (naming the rows).
    """
    if (labels is None) == (plan is None):
        raise ValueError("model_sequence_logps: give exactly one of labels or plan")
    if plan is None:
        if labels.dim() != 2 or tokens.shape != labels.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} must both be [batch, seq]")
        plan = score_plan_from_labels(labels, ignore_index)
    tok, logits_sum = scored_token_logps(
        model, tokens, plan, mask=mask, input_pos=input_pos, num_chunks=num_chunks
    )
    total = reduce_to_sequences(tok, plan)
    logps = total / plan.seq_num_tokens if average else total
    vocab = model.tok_embeddings.num_embeddings
    return SequenceLogps(logps, plan.seq_num_tokens, logits_sum / (plan.seq_positions * vocab))
