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

The attention mask is described by two ``[R, L]`` tensors (``doc_pair``: which pair a position
belongs to, a unique id per padding position; ``doc_kind``: 0 shared, 1 chosen, 2 rejected,
3 padding) and built on the device by :func:`packed_attention_mask`: a dense boolean
``[R, L, L]`` on the CPU (FlexAttention has no backward on the CPU in torch 2.13), a
FlexAttention ``BlockMask`` on CUDA.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from prefopt.logprobs import ScorePlan, _empty_rows_error

__all__ = ["packed_collate_preference", "bucket_length", "packed_attention_mask", "packing_unsupported_reason", "SHARED", "CHOSEN", "REJECTED", "PAD"]

SHARED, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
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


def bucket_length(n: int) -> int:
    """The smallest length >= ``n`` of the form ``m * 2**k`` with ``m`` in 4..7 and a multiple of
    128: about four lengths per doubling (at most ~25% padding), so that a run sees a handful of
    distinct shapes."""
    size = 512
    while True:
        for m in (4, 5, 6, 7):
            cand = m * size // 4
            if cand >= n:
                return cand
        size *= 2


def _cheapest_layout(lengths: Sequence[int], limit: float, embed_dim: int):
    """(rows of pair indices, row length) minimising rows x L x (1 + L / (6 d)) over capacities
    from the longest pair to the whole batch (first-fit-decreasing at each)."""
    longest, total = max(lengths), sum(lengths)
    caps = sorted({min(int(longest * (1 + k / 4)), total) for k in range(0, 4 * len(lengths) + 1)} | {total})
    best = None
    for cap in caps:
        if cap > limit:
            break
        rows = _first_fit_decreasing(lengths, cap)
        length = max(sum(lengths[i] for i in r) for r in rows)
        cost = len(rows) * length * (1 + length / (6 * embed_dim))
        if best is None or cost < best[0]:
            best = (cost, rows, length)
    return best[1], best[2]


def packed_collate_preference(
    batch: Sequence[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
    row_len: Optional[int] = None,
    static_shapes: bool = False,
    max_seq_len: Optional[int] = None,
    embed_dim: int = 4096,
) -> Dict[str, Any]:
    """Lay a micro-batch of pairs out packed and prefix-shared (see the module docstring).

    Rows are filled first-fit-decreasing up to a capacity: ``row_len`` if given, else the one (from
    the longest pair of the batch up to the whole batch in one row) that minimises the estimated
    cost ``rows x length x (1 + length / (6 x embed_dim))``: every row is padded to the longest,
    and dense masked attention costs O(length²) per row on the CPU (~4·L·d FLOPs per position
    against ~24·d² for the projections and MLP), so no row is mostly masked.

    ``static_shapes`` (the recipes set it on CUDA) puts every pair into ONE row whose length is
    rounded up by :func:`bucket_length`: a FlexAttention ``BlockMask`` skips the masked blocks, so
    a long row costs nothing extra, and torchtune compiles ``flex_attention`` with
    ``dynamic=False``: every new ``[rows, length]`` would recompile it, and after Dynamo's
    recompile limit it falls back to an unfused attention that materialises the scores.

    No row is longer than ``max_seq_len`` (the model's: torchtune's decoders refuse longer
    inputs); a batch holding a pair whose packed length exceeds it (two long responses after a
    short prompt) is laid out padded instead (:func:`prefopt.data.padded_collate_preference`),
    which the step takes as well.

    Args:
        batch: items of :class:`prefopt.data.PreferenceDataset` (``chosen_input_ids``,
            ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``, ``row``).
        padding_idx (int): token id for padding at the end of rows.
        ignore_idx (int): label value of unscored positions.
        pad_to_multiple_of (int): round the row length up to a multiple of this.
        row_len (Optional[int]): the row capacity; raised to the longest pair if smaller.
        static_shapes (bool): one row of a bucketed length (see above), on CUDA.
        max_seq_len (Optional[int]): the model's longest input.
        embed_dim (int): the model's width, for the cost estimate of a row's attention.

    Returns:
        Dict[str, Any]: ``tokens`` [R, L], ``input_pos`` [R, L], ``doc_pair`` [R, L],
        ``doc_kind`` [R, L] (uint8), ``plan`` (:class:`~prefopt.logprobs.ScorePlan` of the 2b
        sequences: chosen ``[:b]``, rejected ``[b:]``), ``rows`` [b] (source rows),
        ``num_tokens`` (0-d: prompt + chosen + rejected tokens of every pair, the padded
        layout's count, so that throughput figures compare), ``chosen_tokens`` (0-d: scored
        chosen tokens) and ``packed_tokens`` (0-d: positions actually computed, padding excluded).

    Raises:
        ValueError: naming the source rows of sequences with no scored token.
    """
    b = len(batch)
    seqs = []
    for ex in batch:
        c = np.asarray(ex["chosen_input_ids"], dtype=np.int64)
        r = np.asarray(ex["rejected_input_ids"], dtype=np.int64)
        cl = np.asarray(ex["chosen_labels"], dtype=np.int64)
        rl = np.asarray(ex["rejected_labels"], dtype=np.int64)
        k = _common_prefix(c, r)
        seqs.append((c, r, cl, rl, k, len(c) + len(r) - k))
    lengths = [s[5] for s in seqs]
    limit = max_seq_len or float("inf")
    if max(lengths) > limit:
        from prefopt.data import padded_collate_preference

        return padded_collate_preference(batch, padding_idx=padding_idx, ignore_idx=ignore_idx,
                                         pad_to_multiple_of=pad_to_multiple_of)
    one_row = bucket_length(sum(lengths)) if static_shapes else None
    if static_shapes and one_row <= limit:
        layout = [sorted(range(b), key=lambda i: -lengths[i])]
        seq_len = one_row
    elif static_shapes:  # rows of the model's full length: only the number of rows varies
        layout = _first_fit_decreasing(lengths, int(limit))
        seq_len = int(limit)
    elif row_len is not None:
        layout = _first_fit_decreasing(lengths, min(max(max(lengths), row_len), limit))
        seq_len = max(sum(lengths[i] for i in row) for row in layout)
    else:
        layout, seq_len = _cheapest_layout(lengths, limit, embed_dim)
    seq_len += -seq_len % pad_to_multiple_of
    if seq_len > limit:  # the rounding must not pass the model's limit (seq_len itself does not)
        seq_len = int(limit)
    n_rows = len(layout)

    tokens = np.full((n_rows, seq_len), padding_idx, dtype=np.int64)
    input_pos = np.zeros((n_rows, seq_len), dtype=np.int64)
    # padding positions: a pair id of their own each (> every real pair id), so that they attend
    # only to themselves (a fully masked query row would make the attention NaN)
    doc_pair = (b + np.arange(n_rows * seq_len, dtype=np.int64)).reshape(n_rows, seq_len)
    doc_kind = np.full((n_rows, seq_len), PAD, dtype=np.uint8)
    pos_segment = np.full((n_rows, seq_len), 3 * b, dtype=np.int64)
    seg_to_seq = np.zeros((3 * b, 2 * b), dtype=np.float32)
    seq_positions = np.zeros(2 * b, dtype=np.int64)
    index: List[np.ndarray] = [None] * (2 * b)  # type: ignore[list-item]
    targets: List[np.ndarray] = [None] * (2 * b)  # type: ignore[list-item]

    for row, pairs in enumerate(layout):
        base = 0
        for i in pairs:
            c, r, cl, rl, k, n = seqs[i]
            nc, nr = len(c), len(r)
            span = slice(base, base + n)
            tokens[row, base : base + nc] = c
            tokens[row, base + nc : base + n] = r[k:]
            input_pos[row, base : base + nc] = np.arange(nc)
            input_pos[row, base + nc : base + n] = np.arange(k, nr)
            doc_pair[row, span] = i
            doc_kind[row, base : base + k] = SHARED
            doc_kind[row, base + k : base + nc] = CHOSEN
            doc_kind[row, base + nc : base + n] = REJECTED
            pos_segment[row, base : base + k] = 3 * i
            pos_segment[row, base + k : base + nc] = 3 * i + 1
            pos_segment[row, base + nc : base + n] = 3 * i + 2
            seg_to_seq[3 * i, [i, b + i]] = 1.0
            seg_to_seq[3 * i + 1, i] = 1.0
            seg_to_seq[3 * i + 2, b + i] = 1.0
            seq_positions[i], seq_positions[b + i] = nc, nr
            flat0 = row * seq_len + base
            # position t of a sequence predicts its token t + 1; chosen positions are contiguous
            # from the pair's start, rejected ones jump over the chosen suffix after the prefix
            t = np.flatnonzero(cl[1:] != ignore_idx)
            index[i], targets[i] = flat0 + t, cl[1:][t]
            t = np.flatnonzero(rl[1:] != ignore_idx)
            index[b + i], targets[b + i] = flat0 + np.where(t < k, t, t + nc - k), rl[1:][t]
            base += n

    seq_num_tokens = np.array([len(x) for x in index], dtype=np.int64)
    empty = np.flatnonzero(seq_num_tokens == 0)
    if empty.size:
        raise _empty_rows_error(empty.tolist(), ignore_idx)
    plan = ScorePlan(
        score_index=torch.from_numpy(np.concatenate(index)),
        score_targets=torch.from_numpy(np.concatenate(targets)),
        score_seq=torch.from_numpy(np.repeat(np.arange(2 * b), seq_num_tokens)),
        seq_num_tokens=torch.from_numpy(seq_num_tokens),
        pos_segment=torch.from_numpy(pos_segment.reshape(-1)),
        seg_to_seq=torch.from_numpy(seg_to_seq),
        seq_positions=torch.from_numpy(seq_positions),
    )
    return {
        "tokens": torch.from_numpy(tokens),
        "input_pos": torch.from_numpy(input_pos),
        "doc_pair": torch.from_numpy(doc_pair),
        "doc_kind": torch.from_numpy(doc_kind),
        "plan": plan,
        "rows": torch.tensor([ex.get("row", -1) for ex in batch]),
        "num_tokens": torch.tensor(int(seq_positions.sum())),
        "chosen_tokens": torch.tensor(int(seq_num_tokens[:b].sum())),
        "packed_tokens": torch.tensor(int(sum(lengths))),
    }


def _mask_mod(doc_pair: torch.Tensor, doc_kind: torch.Tensor):
    def mask_mod(b, h, q, kv):
        same = doc_pair[b, q] == doc_pair[b, kv]
        crosses = (doc_kind[b, q] == REJECTED) & (doc_kind[b, kv] == CHOSEN)
        return same & (kv <= q) & ~crosses

    return mask_mod


def packed_attention_mask(doc_pair: torch.Tensor, doc_kind: torch.Tensor, *, block_mask: Optional[bool] = None):
    """The packed layout's attention mask, on the device of ``doc_pair``.

    Args:
        doc_pair (torch.Tensor): ``[R, L]`` pair id of each position (unique per padding position).
        doc_kind (torch.Tensor): ``[R, L]`` 0 shared, 1 chosen, 2 rejected, 3 padding.
        block_mask (Optional[bool]): a FlexAttention ``BlockMask`` (True) or a dense boolean
            ``[R, L, L]`` (False, True = attend, torchtune's convention); default: BlockMask on
            CUDA, dense elsewhere (FlexAttention has no backward on the CPU in torch 2.13).

    Returns:
        A ``[R, L, L]`` bool tensor or a ``BlockMask``: query ``q`` attends to key ``kv`` iff both
        belong to the same pair, ``kv <= q``, and not (``q`` rejected and ``kv`` chosen).
    """
    if block_mask is None:
        block_mask = doc_pair.is_cuda
    n_rows, seq_len = doc_pair.shape
    if block_mask:
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(
            _mask_mod(doc_pair, doc_kind), B=n_rows, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=doc_pair.device
        )
    same = doc_pair[:, :, None] == doc_pair[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_pair.device).tril_()
    crosses = (doc_kind[:, :, None] == REJECTED) & (doc_kind[:, None, :] == CHOSEN)
    return same & causal & ~crosses


def packing_unsupported_reason(model: nn.Module) -> Optional[str]:
    """None if every attention layer of ``model`` takes an arbitrary mask and ``input_pos``
    (torchtune's ``MultiHeadAttention``: llama2/3, qwen2, mistral, ...); otherwise why not
    (e.g. gemma2's attention applies its own sliding-window mask and soft-capping)."""
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
    return None
