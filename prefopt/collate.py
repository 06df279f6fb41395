"""The collates of preference batches, from :class:`prefopt.data.PreferenceDataset` items to the
tensors the step takes: padded (chosen rows then rejected rows, as torchtune's
``padded_collate_dpo``) or packed and prefix-shared (the layout of :mod:`prefopt.packing`).

Both give a :class:`~prefopt.logprobs.ScorePlan` built here on the CPU (which positions score
which tokens), so that the training step needs no device sync to find them, and ``rows`` (each
pair's source row) so that an error can name the examples of a bad step.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from prefopt.logprobs import ScorePlan, _empty_rows_error, score_plan_from_labels
from prefopt.packing import CHOSEN, PAD, REJECTED, SHARED, common_prefix, row_layout

__all__ = ["padded_collate_preference", "packed_collate_preference"]


def padded_collate_preference(
    batch: Sequence[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
) -> Dict[str, Any]:
    """Concatenate chosen then rejected rows into one right-padded batch for a single forward.

    Same layout as torchtune's ``padded_collate_dpo`` (rows ``[:b]`` chosen, ``[b:]`` rejected),
    plus ``rows`` (the source row of each pair, so an error can name the examples of a bad
    step) and ``pad_to_multiple_of`` (fewer distinct shapes under ``torch.compile``).

    Args:
        batch: items of :class:`PreferenceDataset` (token sequences as lists or numpy arrays).
        padding_idx (int): token id for padding.
        ignore_idx (int): label for padding.
        pad_to_multiple_of (int): round the padded length up to a multiple of this.

    Returns:
        Dict[str, Any]: ``tokens`` [2b, s], ``labels`` [2b, s], ``plan`` (the
        :class:`~prefopt.logprobs.ScorePlan`), ``rows`` [b], ``num_tokens`` (0-d: real,
        non-padding tokens in the batch, for throughput figures) and ``chosen_tokens`` (0-d:
        scored chosen tokens).

    Raises:
        ValueError: naming the rows of the batch with no scored token.
    """
    ids = [torch.as_tensor(ex[f"{k}_input_ids"], dtype=torch.long) for k in ("chosen", "rejected") for ex in batch]
    labels = [torch.as_tensor(ex[f"{k}_labels"], dtype=torch.long) for k in ("chosen", "rejected") for ex in batch]
    tokens = pad_sequence(ids, batch_first=True, padding_value=padding_idx)
    labels_t = pad_sequence(labels, batch_first=True, padding_value=ignore_idx)
    extra = -tokens.shape[1] % pad_to_multiple_of
    if extra:
        tokens = torch.nn.functional.pad(tokens, (0, extra), value=padding_idx)
        labels_t = torch.nn.functional.pad(labels_t, (0, extra), value=ignore_idx)
    rows = torch.tensor([ex.get("row", -1) for ex in batch])
    seq_lens = torch.tensor([len(x) for x in ids])
    plan = score_plan_from_labels(labels_t, ignore_idx, seq_lens=seq_lens)
    return {
        "tokens": tokens,
        "labels": labels_t,
        "plan": plan,
        "rows": rows,
        "num_tokens": seq_lens.sum(),
        "chosen_tokens": plan.seq_num_tokens[: len(batch)].sum(),
    }


def packed_collate_preference(
    batch: Sequence[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
    row_len: Optional[int] = None,
    min_len: int = 1,
    max_seq_len: Optional[int] = None,
) -> Dict[str, Any]:
    """Lay a micro-batch of pairs out packed and prefix-shared (see the module docstring).

    The rows are chosen by :func:`prefopt.packing.row_layout` (see there for ``row_len``,
    ``min_len`` and ``max_seq_len``): by default one unpadded row. A batch holding a pair whose packed
    length exceeds ``max_seq_len`` (two long responses after a short prompt) is laid out padded
    instead (:func:`padded_collate_preference`), which the step takes as well.

    Args:
        batch: items of :class:`prefopt.data.PreferenceDataset` (``chosen_input_ids``,
            ``chosen_labels``, ``rejected_input_ids``, ``rejected_labels``, ``row``).
        padding_idx (int): token id for padding at the end of rows.
        ignore_idx (int): label value of unscored positions.
        pad_to_multiple_of (int): round the row length up to a multiple of this.
        row_len (Optional[int]): the row capacity; raised to the longest pair if smaller.
        min_len (int): the shortest row (:data:`prefopt.packing.MIN_FLEX_LEN` on CUDA).
        max_seq_len (Optional[int]): the model's longest input.

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
        k = common_prefix(c, r)
        seqs.append((c, r, cl, rl, k, len(c) + len(r) - k))
    lengths = [s[5] for s in seqs]
    rows_of = row_layout(lengths, pad_to_multiple_of=pad_to_multiple_of, row_len=row_len, min_len=min_len,
                         max_seq_len=max_seq_len)
    if rows_of is None:
        return padded_collate_preference(batch, padding_idx=padding_idx, ignore_idx=ignore_idx,
                                         pad_to_multiple_of=pad_to_multiple_of)
    layout, seq_len = rows_of
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
