"""The packed layouts' attention: FlexAttention compiled once, for every row length (the
training step's layout and a reward model's rows, on CUDA), and per-part SDPA (both, elsewhere).

torchtune compiles ``flex_attention`` at import with ``dynamic=False``
(``torchtune/modules/attention_utils.py``): every new micro-batch shape compiles it again, and
after Dynamo's recompile limit (8) the call runs *unfused*, materialising the ``[b, heads, L, L]``
scores in every layer -- the memory the packed layout exists to save. Our micro-batches have a
new length nearly every step (the pairs' lengths, unpadded), so :func:`use_packed_attention` gives
every torchtune ``MultiHeadAttention`` of a model our own attention call instead:

- a ``BlockMask`` goes to :func:`packed_flex_attention`: ``flex_attention`` compiled ONCE, with
  dynamic shapes (``torch.compile(dynamic=True)``: the row length is a symbol, not a constant)
  and ``fullgraph=True``, so that Dynamo never runs it uncompiled: past its recompile limit it
  raises (``FailOnRecompileLimitHit``), which we turn into an error saying why, instead of
  Dynamo's silent fallback to the unfused implementation;
- a :class:`SharedPrefixRows` (off CUDA: the training step's packed pairs, a reward model's
  rows of one prompt and its k responses) goes to :func:`shared_prefix_attention`: one SDPA call
  for each shared prefix and one for each part (chosen, rejected; a response) against the
  prefix's keys and its own. It computes only the query/key pairs a part may attend, where a
  dense ``[L, L]`` mask makes SDPA compute all ``L^2`` of the row, and needs no compile (the
  CPU has no FlexAttention backward in torch 2.13, and its compiled forward was slower there);
- any other mask (the padded layout, a dense bool mask) goes to torchtune's own SDPA call,
  unchanged.

Why one dynamic compile and not a fixed-shape compile per length (torchtune's: one per distinct
length, hundreds in a run) or a fixed token budget per row (one static shape, but every
micro-batch padded to the longest one a run can have): see ``docs/packing.md``; the measured
figures are in ``benchmarks/results/packing.md`` and ``benchmarks/results/generation.md``.

What the compiled call sees is always one row (``B = 1``): :func:`prefopt.packing.packed_attention_mask`
builds the ``BlockMask`` over the ``R x L`` positions of the micro-batch laid end to end (rows
never attend to each other), and a batch of ``R > 1`` rows (the model's ``max_seq_len`` exceeded)
is viewed as one row of ``R x L`` here, so that ``B`` never changes either (Dynamo specialises a
size of 1, so ``B`` 1 -> 2 would be a second compile). Rows are at least 256 positions
(:data:`prefopt.packing.MIN_FLEX_LEN`, two 128-blocks): one block would be a size of 1 as well,
and below 128 inductor lowers to its decoding kernel. Duck sizing is off while it compiles (a
first length equal to the head dim would be compiled as that equality).

Stated count: **one compile per process** (one more after each ``torch._dynamo.reset()``), for
any mix of lengths; :func:`flex_compile_count` reads it, and every compile after the first is
logged as a warning. Its backward is compiled with it (on CUDA; the CPU has none in torch 2.13).
"""

import logging
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = ["use_packed_attention", "packed_flex_attention", "flex_compile_count", "FLEX_COMPILES", "SharedPrefixRows",
           "shared_prefix_attention"]

log = logging.getLogger(__name__)

#: the stated number of compiles of :func:`packed_flex_attention` per process, for any mix of lengths
FLEX_COMPILES = 1

_compiled = None
_seen = 0  # compiled variants (Dynamo cache entries) of _flex seen after the last call


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    # our own code object: its Dynamo cache (and recompile limit) is not shared with torchtune's
    # compiled ``flex_attention``
    return flex_attention(q, k, v, block_mask=block_mask)


def flex_compile_count() -> int:
    """How many compiled variants of the packed FlexAttention Dynamo holds now (0 before its first
    call or after ``torch._dynamo.reset()``; :data:`FLEX_COMPILES` once it has run)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(_flex.__code__))


@torch.compiler.disable(recursive=False)
def packed_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """``flex_attention(q, k, v, block_mask=block_mask)``, compiled once with dynamic shapes.

    Outside any compiled region (``torch.compiler.disable``, as torchtune's own call: the
    decoder layers may be compiled, FlexAttention cannot be compiled inside them twice).

    Args:
        q, k, v (torch.Tensor): ``[R, H, L, D]`` (k, v already expanded to ``H`` heads).
        block_mask (BlockMask): over ``[R, L]`` or, from :func:`prefopt.packing.packed_attention_mask`,
            over one row of ``R x L`` (then the rows are viewed as that one row).

    Returns:
        torch.Tensor: ``[R, H, L, D]``.

    Raises:
        RuntimeError: when it would run uncompiled (Dynamo disabled, or its recompile limit hit):
            the unfused FlexAttention materialises ``[R, H, L, L]`` scores in every layer.
    """
    global _compiled, _seen
    if torch._dynamo.config.disable:
        raise RuntimeError(
            "the packed layout's FlexAttention would run uncompiled (torch._dynamo is disabled, "
            "TORCHDYNAMO_DISABLE?): unfused, it materialises [rows, heads, L, L] scores in every layer. "
            "Enable Dynamo, or set packed: False (training) / reward.flex_attention: False (scoring)."
        )
    if _compiled is None:
        _compiled = torch.compile(_flex, dynamic=True, fullgraph=True)
    R, H, L, D = q.shape
    flat = block_mask.seq_lengths[0] == R * L  # our mask: one row of R x L (R = 1 nearly always)
    if flat:
        # [R, H, L, D] -> [1, H, R*L, D], the rows end to end as the mask was built, always
        # through the same ops, so that the strides Dynamo guards on follow one pattern whichever
        # R (dim 0's stride is specialised, a size of 1: [0].unsqueeze(0) gives it one formula),
        # and as tensors that are not views (_unsafe_view: the same storage, no copy), or Dynamo
        # guards on their base's sizes too, R among them (1 vs >= 2: a second compile)
        q, k, v = (torch.ops.aten._unsafe_view(
            (x[0] if R == 1 else x.transpose(0, 1).reshape(H, R * L, x.shape[-1])).unsqueeze(0), (1, H, R * L, x.shape[-1]))
            for x in (q, k, v))
    try:
        # no duck sizing: a first row whose length equals the head dim (or any other size) would
        # otherwise be compiled as "L == head_dim", and the next length would compile again
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            out = _compiled(q, k, v, block_mask)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise RuntimeError(
            f"the packed layout's FlexAttention reached torch._dynamo's recompile limit "
            f"({torch._dynamo.config.recompile_limit}) after {flex_compile_count()} compiles (last shape "
            f"{tuple(q.shape)}): uncompiled it would materialise [rows, heads, L, L] scores in every layer, "
            f"so it stops here. It is meant to compile {FLEX_COMPILES}x per process; set packed: False to "
            f"train with the padded layout (reward.flex_attention: False to score with a dense mask)."
        ) from e
    n = flex_compile_count()
    if n != _seen:
        if n > FLEX_COMPILES:
            log.warning(f"packed FlexAttention compiled again ({n} variants, shape {tuple(q.shape)}): "
                        f"{FLEX_COMPILES} expected")
        else:
            log.info(f"packed FlexAttention compiled (dynamic shapes, first shape {tuple(q.shape)})")
        _seen = n
    if flat:
        out = out[0].view(H, R, L, -1).transpose(0, 1)
    return out


class SharedPrefixRows(NamedTuple):
    """An attention mask by its structure: rows of documents laid end to end, each document a
    prefix, then parts that each see the prefix and themselves (causally), never another part nor
    another document; positions in no document are padding. ``docs[r]``: row ``r``'s documents,
    each ``(start, prefix, parts)`` (its first position, its prefix's length, its parts' lengths).

    What :meth:`prefopt.reward.RewardModel.score_ids` passes for a prompt's k responses (a row,
    one document), and :func:`prefopt.packing.packed_attention_mask` off CUDA for the training
    step's packed layout (a document per pair: shared prefix, chosen, rejected)."""

    docs: Tuple[Tuple[Tuple[int, int, Tuple[int, ...]], ...], ...]


@torch.compiler.disable(recursive=False)
def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: SharedPrefixRows) -> torch.Tensor:
    """Attention under a :class:`SharedPrefixRows` mask, one SDPA call per prefix and per part:
    the prefix causal, each part's queries against the prefix's keys and its own, causally (a
    ``[m, p + m]`` boolean mask: on the CPU SDPA runs its flash kernel with a mask, where
    ``torch.nn.attention.bias.causal_lower_right`` falls back to the unfused math path). Padding
    positions get 0. The pieces are concatenated, not written into a buffer, so that the backward
    pass has no per-piece copy of the whole output's gradient.

    Args:
        q, k, v (torch.Tensor): ``[R, H, L, D]`` (k, v already expanded to ``H`` heads).
        rows (SharedPrefixRows): ``R`` rows of documents within ``L`` positions, in order.

    Returns:
        torch.Tensor: ``[R, H, L, D]``.

    Raises:
        ValueError: rows that do not match ``q`` (count, documents overlapping or past ``L``).
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    R, H, L, D = q.shape
    if len(rows.docs) != R:
        raise ValueError(f"a SharedPrefixRows mask of {len(rows.docs)} rows for {R} rows of queries")

    def gap(n):
        return q.new_zeros(1, H, n, D)

    # in bf16/fp16 with gradients: the pieces in float32, so that the gradient of a prefix's keys
    # and values (the sum over its own call and every part's) is summed in float32, as the fused
    # kernel sums it under a dense mask, not rounded to 16 bits once per piece
    low = q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and q.requires_grad
    dtype = q.dtype
    if low:
        q, k, v = q.float(), k.float(), v.float()
    out = []
    for r, docs in enumerate(rows.docs):
        # [1, H, n, D] slices: SDPA's fused CPU kernel takes 4-d inputs (3-d ones run unfused)
        qr, kr, vr = q[r:r + 1], k[r:r + 1], v[r:r + 1]
        pieces, at = [], 0
        for start, p, parts in docs:
            if start < at or start + p + sum(parts) > L:
                raise ValueError(f"row {r}: a document at {start} of {p} + {sum(parts)} positions, after position "
                                 f"{at}, in a row of {L}")
            if start > at:
                pieces.append(gap(start - at))
            if p:
                pieces.append(sdpa(qr[:, :, start:start + p], kr[:, :, start:start + p], vr[:, :, start:start + p],
                                   is_causal=True))
            at = start + p
            for m in parts:
                if not m:
                    continue
                keys = torch.cat([kr[:, :, start:start + p], kr[:, :, at:at + m]], dim=2)
                values = torch.cat([vr[:, :, start:start + p], vr[:, :, at:at + m]], dim=2)
                causal = torch.ones(m, p + m, dtype=torch.bool, device=q.device).tril_(p)
                pieces.append(sdpa(qr[:, :, at:at + m], keys, values, attn_mask=causal))
                at += m
        if at < L:
            pieces.append(gap(L - at))
        out.append(torch.cat(pieces, dim=2))
    return torch.cat(out, dim=0).to(dtype)


_FALLBACK = None  # one instance of torchtune's attention call, shared (see _attention_call)


def _attention_call(q, k, v, mask, dropout_p: float, is_causal: bool) -> torch.Tensor:
    # One function object for every layer (Dynamo, compiling the layers, guards on it: one per
    # layer would be a guard failure, a recompile, per layer). Only the BlockMask branch leaves
    # the compiled layer; the padded layout's SDPA stays inside it.
    if isinstance(mask, BlockMask):
        if dropout_p > 0.0:
            raise ValueError("FlexAttention (the packed layout on CUDA) has no dropout: set attn_dropout to 0")
        return packed_flex_attention(q, k, v, mask)
    if isinstance(mask, SharedPrefixRows):
        if dropout_p > 0.0:
            raise ValueError("a reward model's rows are scored without dropout: set attn_dropout to 0")
        return shared_prefix_attention(q, k, v, mask)
    return _FALLBACK(q, k, v, mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def use_packed_attention(model: nn.Module) -> Optional[int]:
    """Give every torchtune ``MultiHeadAttention`` of ``model`` :func:`_attention_call` (idempotent):
    a ``BlockMask`` to :func:`packed_flex_attention`, a :class:`SharedPrefixRows` to
    :func:`shared_prefix_attention`, any other mask to torchtune's SDPA call.

    Returns:
        Optional[int]: how many modules were changed now (0 when already done).
    """
    global _FALLBACK
    from torchtune.modules import MultiHeadAttention
    from torchtune.modules.attention_utils import _sdpa_or_flex_attention

    if _FALLBACK is None:
        _FALLBACK = _sdpa_or_flex_attention()
    n = 0
    for m in model.modules():
        if isinstance(m, MultiHeadAttention) and m._attention_call is not _attention_call:
            m._attention_call = _attention_call
            n += 1
    return n
