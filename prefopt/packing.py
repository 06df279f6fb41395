"""The packed, prefix-shared layout of a preference batch: each prompt computed once, no padding
between pairs.

Each pair is laid out once as ``[shared][chosen suffix][rejected suffix]``, where ``shared`` is
the longest common prefix of the chosen and rejected token sequences (the prompt, and any
response tokens both start with). The rejected suffix takes RoPE positions continuing from the
end of ``shared`` (``input_pos``) and attends causally to ``shared`` and to earlier rejected
tokens, never to the chosen suffix, so every hidden state equals the one the padded layout
computes for the same token. The first token of each response is predicted from the last shared
position: that hidden state is simply scored twice (:class:`prefopt.logprobs.ScorePlan`), with
no repeated token. Several pairs share one row end to end, with no attention across pairs.

Why our own (torchtune's ``PreferenceDataset(packed=True)`` raises "not supported"; TRL's DPO
``padding_free`` is disabled; frankxwang/dpo-prefix-sharing is a research fork of TRL's DPO
trainer): nobody ships this for preference losses, and the layout must keep the micro-batch's
pairs exactly, so that the loss and every metric are the same quantities as in the padded layout.

:func:`row_layout` chooses the rows; :func:`prefopt.collate.packed_collate_preference` lays the
tokens out. The attention mask is described by two ``[R, L]`` tensors (``doc_pair``: which pair a position
belongs to, a unique id per padding position; ``doc_kind``: 0 shared, 1 chosen, 2 rejected,
3 padding: a position sees the earlier positions of its pair that are shared or of its own kind)
and built by :func:`packed_attention_mask`: a FlexAttention ``BlockMask`` on CUDA, run by
:mod:`prefopt.attention` (compiled once for every length: see there why); elsewhere its
structure, run as one SDPA call per shared prefix and per response (FlexAttention has no
backward on the CPU in torch 2.13, and SDPA under a dense ``[R, L, L]`` mask computes all ``L^2``
pairs of a row).
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["row_layout", "padding_share", "packed_share", "packed_attention_mask", "shared_prefix_rows",
           "packing_unsupported_reason", "MIN_FLEX_LEN", "SHARED", "CHOSEN", "REJECTED", "PAD"]

SHARED, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
# the shortest row of the one-row (FlexAttention) layout: two sparse blocks. One block would be
# compiled as a constant 1 (Dynamo specialises sizes of 1), and under 128 inductor lowers to its
# decoding kernel: either way a second compile
MIN_FLEX_LEN = 256
_FLEX_BLOCK = 128  # FlexAttention's sparse block size (create_block_mask's default)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-d arrays (pure)."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Rows of pair indices, each row's total length <= capacity (>= every single length)."""
    rows: List[List[int]] = []
    fill: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(fill):
            if f + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def _least_padded_layout(lengths: Sequence[int], limit: float, min_len: int):
    """(rows of pair indices, row length) with the fewest positions, rows x max(L, min_len), then
    the fewest rows: the whole batch in one unpadded row whenever it fits ``limit`` (no layout has
    fewer), else the best of the capacities from the longest pair up to ``limit``
    (first-fit-decreasing at each)."""
    longest, total = max(lengths), sum(lengths)
    if total <= limit:
        return _first_fit_decreasing(lengths, total), total
    caps = {min(int(longest * (1 + k / 4)), total) for k in range(0, 4 * len(lengths) + 1)} | {int(limit)}
    caps = sorted(caps)
    best = None
    for cap in caps:
        if cap > limit:
            break
        rows = _first_fit_decreasing(lengths, cap)
        length = max(sum(lengths[i] for i in r) for r in rows)
        cost = (len(rows) * max(length, min_len), len(rows))
        if best is None or cost < best[0]:
            best = (cost, rows, length)
    return best[1], best[2]


def row_layout(
    lengths: Sequence[int],
    *,
    pad_to_multiple_of: int = 1,
    row_len: Optional[int] = None,
    min_len: int = 1,
    max_seq_len: Optional[int] = None,
) -> Optional[Tuple[List[List[int]], int]]:
    """Which pairs share which row, and the row length (pure).

    By default the layout with the fewest positions, padding included: the attention of the
    packed layout costs the same whatever the rows (a FlexAttention ``BlockMask`` on CUDA skips the
    masked blocks; on the CPU one SDPA call per prompt and response, padding in none), so the
    padding, which the linear layers pay, is the only cost to weigh. That is ONE row of exactly
    the pairs' total length when it fits ``max_seq_len``; otherwise the capacity up to it whose
    first-fit-decreasing rows pad least (FlexAttention sees them as one row end to end).
    ``row_len`` fills rows first-fit-decreasing up to that capacity instead.

    Args:
        lengths: [b] each pair's packed length (shared prefix + both suffixes).
        pad_to_multiple_of (int): round the row length up to a multiple of this.
        row_len (Optional[int]): the row capacity; raised to the longest pair if smaller.
        min_len (int): the shortest row (:data:`MIN_FLEX_LEN` for FlexAttention, on CUDA).
        max_seq_len (Optional[int]): the model's longest input: no row is longer (torchtune's
            decoders refuse longer inputs).

    Returns:
        ``(rows of pair indices, row length)``, or None when a pair alone exceeds ``max_seq_len``.
    """
    limit = max_seq_len or float("inf")
    if max(lengths) > limit:
        return None
    if row_len is None:
        layout, seq_len = _least_padded_layout(lengths, limit, min_len)
    else:
        layout = _first_fit_decreasing(lengths, int(min(max(max(lengths), row_len), limit)))
        seq_len = max(sum(lengths[i] for i in row) for row in layout)
    seq_len = max(min_len, seq_len)
    seq_len += -seq_len % pad_to_multiple_of
    if seq_len > limit:  # the raising and rounding must not pass the model's limit
        seq_len = int(limit)
    return layout, seq_len


def _shuffled_batches(batch_size: int, seed: int, *lens: np.ndarray) -> List[np.ndarray]:
    """Each of ``lens`` ([n] per pair) as ``[n // batch_size, batch_size]`` int64, rows drawn in a
    seeded random order as a shuffling sampler does, the last partial batch left out (empty
    arrays when there is not one full batch)."""
    n = len(lens[0]) // batch_size * batch_size
    perm = np.random.default_rng(seed).permutation(len(lens[0]))[:n]
    return [np.asarray(x, dtype=np.int64)[perm].reshape(-1, batch_size) for x in lens]


def padding_share(chosen_lens: np.ndarray, rejected_lens: np.ndarray, batch_size: int, seed: int = 0) -> float:
    """Share of the tokens of :func:`prefopt.collate.padded_collate_preference` batches that are
    padding, for batches of ``batch_size`` pairs drawn in a seeded random order. Pure.

    Args:
        chosen_lens, rejected_lens (np.ndarray): [n] tokens of each pair's two sequences.
        batch_size (int): pairs per batch (each batch is 2 * batch_size rows).

    Returns:
        float: padding tokens / all tokens, 0.0 if there is not one full batch.
    """
    c, r = _shuffled_batches(batch_size, seed, chosen_lens, rejected_lens)
    if c.size == 0:
        return 0.0
    longest = np.maximum(c.max(1), r.max(1))
    return float(1.0 - (c.sum() + r.sum()) / (longest.sum() * 2 * batch_size))


def packed_share(prompt_lens: np.ndarray, chosen_lens: np.ndarray, rejected_lens: np.ndarray, batch_size: int,
                 seed: int = 0) -> float:
    """Positions the packed, prefix-shared layout computes (each prompt once, no padding between
    pairs; the padding at the end of its rows left out) as a share of the padded layout's, for
    batches as in :func:`padding_share`. Pure.

    Args:
        prompt_lens, chosen_lens, rejected_lens (np.ndarray): [n] tokens of each pair's prompt and
            responses (without the prompt).
        batch_size (int): pairs per batch.

    Returns:
        float: packed positions / padded positions, 1.0 if there is not one full batch.
    """
    p, c, r = _shuffled_batches(batch_size, seed, prompt_lens, chosen_lens, rejected_lens)
    if p.size == 0:
        return 1.0
    padded = (np.maximum((p + c).max(1), (p + r).max(1)) * 2 * batch_size).sum()
    return float((p + c + r).sum() / padded)


def _mask_mod(doc_pair: torch.Tensor, doc_kind: torch.Tensor):
    def mask_mod(b, h, q, kv):
        same = doc_pair[b, q] == doc_pair[b, kv]
        sees = (doc_kind[b, kv] == SHARED) | (doc_kind[b, kv] == doc_kind[b, q])
        return same & (kv <= q) & sees

    return mask_mod


def packed_attention_mask(doc_pair: torch.Tensor, doc_kind: torch.Tensor, *, block_mask: Optional[bool] = None):
    """The packed layout's attention mask, on the device of ``doc_pair``.

    Args:
        doc_pair (torch.Tensor): ``[R, L]`` pair id of each position (unique per padding position).
        doc_kind (torch.Tensor): ``[R, L]`` 0 shared, 1 chosen, 2 rejected, 3 padding; in general
            0 shared and any other value one part of the document (a reward model's k responses
            of one prompt: :meth:`prefopt.reward.RewardModel.score_ids`).
        block_mask (Optional[bool]): a FlexAttention ``BlockMask`` (True) or a dense boolean
            ``[R, L, L]`` (False, True = attend, torchtune's convention); default (None): the
            BlockMask on CUDA, elsewhere the mask's structure
            (:class:`prefopt.attention.SharedPrefixRows`: one SDPA call per shared prefix and
            per response, which computes only what may be attended, where SDPA under the dense
            mask computes all ``L^2`` pairs of a row; FlexAttention has no backward on the CPU in
            torch 2.13). The dense one serves the tests as the reference.

    Returns:
        A ``[R, L, L]`` bool tensor, a :class:`prefopt.attention.SharedPrefixRows`, or a
        ``BlockMask`` over the ``R`` rows laid end to end (one
        row of ``R x L`` positions: :func:`prefopt.attention.packed_flex_attention` views ``R``
        rows that way, so that FlexAttention always sees one row; see :mod:`prefopt.attention`):
        query ``q`` attends to key ``kv`` iff both belong to the same pair, ``kv <= q``, and
        ``kv`` is shared or of ``q``'s kind (a rejected token never sees the chosen response; a
        chosen one cannot see the rejected response, which comes after it).
    """
    if block_mask is None:
        if not doc_pair.is_cuda:
            return shared_prefix_rows(doc_pair, doc_kind)
        block_mask = True
    n_rows, seq_len = doc_pair.shape
    if block_mask:
        # copies, not views of [R, L] tensors: Dynamo would guard on the view's base's sizes
        return _flex_block_mask(doc_pair.reshape(-1).clone(), doc_kind.reshape(-1).clone())
    same = doc_pair[:, :, None] == doc_pair[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_pair.device).tril_()
    sees = (doc_kind[:, None, :] == SHARED) | (doc_kind[:, :, None] == doc_kind[:, None, :])
    return same & causal & sees


def shared_prefix_rows(doc_pair: torch.Tensor, doc_kind: torch.Tensor):
    """The packed layout's mask as its structure (:class:`prefopt.attention.SharedPrefixRows`):
    per row, each pair's run of positions as a document, its SHARED positions the prefix, its
    other kinds the parts, in order; PAD positions in none. Host-side (reads the tensors).

    Args:
        doc_pair, doc_kind (torch.Tensor): ``[R, L]``, as :func:`packed_attention_mask`'s.

    Raises:
        ValueError: a document that is not one prefix followed by its parts (a kind recurring
            after another, or a shared run after a part).
    """
    from prefopt.attention import SharedPrefixRows

    pair, kind = doc_pair.cpu().numpy(), doc_kind.cpu().numpy().astype(np.int64)
    rows = []
    for r in range(pair.shape[0]):
        # runs of equal (pair, kind)
        cut = np.flatnonzero((pair[r, 1:] != pair[r, :-1]) | (kind[r, 1:] != kind[r, :-1])) + 1
        starts = np.concatenate([[0], cut])
        ends = np.concatenate([cut, [pair.shape[1]]])
        docs, cur = [], None  # cur: [pair id, start, prefix, parts, kinds seen]
        for a, e in zip(starts.tolist(), ends.tolist()):
            pid, kd = int(pair[r, a]), int(kind[r, a])
            if kd == PAD:
                cur = None
                continue
            if cur is None or cur[0] != pid:
                cur = [pid, a, 0, [], set()]
                docs.append(cur)
            if kd in cur[4] or (kd == SHARED and cur[3]):
                raise ValueError(f"row {r}: pair {pid} is not one shared prefix followed by its parts "
                                 f"(kind {kd} again at position {a})")
            cur[4].add(kd)
            if kd == SHARED:
                cur[2] = e - a
            else:
                cur[3].append(e - a)
        rows.append(tuple((d[1], d[2], tuple(d[3])) for d in docs))
    return SharedPrefixRows(docs=tuple(rows))


def _flex_block_mask(pair: torch.Tensor, kind: torch.Tensor, chunk: int = 8 * _FLEX_BLOCK):
    """The ``BlockMask`` of one row of ``n`` positions (``pair``, ``kind``: ``[n]``).

    ``create_block_mask`` would evaluate the mask on all ``n x n`` positions at once (int64
    intermediates: 2 GiB each at n = 16k); here ``chunk`` query positions at a time, against
    the keys up to them (causal), reduced to 128 x 128 blocks: empty, full (no mask_mod call
    inside) or partial. No host sync: every size comes from the shapes.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n, bs = pair.shape[0], _FLEX_BLOCK
    nb = -(-n // bs)
    pad = nb * bs - n
    # positions past n (block padding): their own ids, below every real one, and never attended
    pair_p = torch.cat([pair, torch.arange(-pad, 0, device=pair.device, dtype=pair.dtype)]) if pad else pair
    kind_p = torch.cat([kind, torch.full((pad,), PAD, device=kind.device, dtype=kind.dtype)]) if pad else kind
    idx = torch.arange(nb * bs, device=pair.device)
    valid = idx < n
    partial = torch.zeros(nb, nb, dtype=torch.bool, device=pair.device)
    full = torch.zeros(nb, nb, dtype=torch.bool, device=pair.device)
    for a in range(0, nb * bs, chunk):
        e = min(a + chunk, nb * bs)  # queries [a, e), keys [0, e)
        q, kv = slice(a, e), slice(0, e)
        m = pair_p[q, None] == pair_p[None, kv]
        m &= idx[kv][None, :] <= idx[q][:, None]
        m &= (kind_p[None, kv] == SHARED) | (kind_p[q, None] == kind_p[None, kv])
        m &= valid[q, None] & valid[None, kv]
        m = m.view((e - a) // bs, bs, e // bs, bs)
        some, every = m.any(3).any(1), m.all(3).all(1)
        partial[a // bs : e // bs, : e // bs] = some & ~every
        full[a // bs : e // bs, : e // bs] = every

    def ordered(dense):  # [nb, nb] -> ([1, 1, nb] counts, [1, 1, nb, nb] block indices, listed first)
        dense = dense.to(torch.int32)[None, None]
        idx = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        return dense.sum(-1, dtype=torch.int32), idx

    return BlockMask.from_kv_blocks(
        *ordered(partial), *ordered(full), BLOCK_SIZE=bs, mask_mod=_mask_mod(pair[None], kind[None]), seq_lengths=(n, n)
    )


def packing_unsupported_reason(model: nn.Module) -> Optional[str]:
    """None if every attention layer of ``model`` takes an arbitrary mask and ``input_pos``
    (torchtune's ``MultiHeadAttention``: llama2/3, qwen2, mistral, ...); otherwise why not
    (e.g. gemma2's attention applies its own sliding-window mask and soft-capping; Gemma 3's
    sliding-window layers)."""
    from torchtune.modules import MultiHeadAttention

    # attention modules are the ones named "...Attention" (torchtune's and its models' own)
    others = sorted({
        type(m).__name__ for m in model.modules()
        if type(m).__name__.endswith("Attention") and not isinstance(m, MultiHeadAttention)
    })
    if others:
        return f"its attention ({', '.join(others)}) does not take an arbitrary attention mask"
    if not any(isinstance(m, MultiHeadAttention) for m in model.modules()):
        return "it has no torchtune MultiHeadAttention layer"
    # Gemma 3's local layers (prefopt.models.qk_norm.QKNormAttention) combine their window with a
    # dense mask, but not with the FlexAttention block mask the packed layout uses on CUDA
    windowed = sum(getattr(m, "sliding_window_size", None) is not None for m in model.modules()
                   if isinstance(m, MultiHeadAttention))
    if windowed:
        return f"{windowed} of its attention layers have a sliding window, not combined with the packed layout's mask"
    return None
