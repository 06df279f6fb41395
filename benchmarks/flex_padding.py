#!/usr/bin/env python
"""Padding of the packed layout on CUDA (one row per micro-batch, FlexAttention), on
UltraFeedback-like data: benchmarks/make_pref_data.py's rows, tokenized by the tiny tokenizer
(a pair: median ~1,030 tokens, the prompt once), in the shuffled micro-batches of a run.

    python benchmarks/flex_padding.py [--rows 4000] [--batch-sizes 1 2 4 8] [--max-seq-len 2048]

Prints, per micro-batch size, the share of the positions the decoder computes that are padding:
now (one row of exactly the pairs' length, at least MIN_FLEX_LEN) and with the bucketed lengths
used before (m·2^k, m in 4..7, multiples of 128; the ladder of issue 26). The collate itself is
run (prefopt.collate.packed_collate_preference, min_len=MIN_FLEX_LEN), not a model of it; and
the CPU's layout (no minimum length) beside it.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bucketed(n: int) -> int:
    """The row length of the bucketed layout this replaced (4 lengths per doubling, >= 512)."""
    size = 512
    while True:
        for m in (4, 5, 6, 7):
            if m * size // 4 >= n:
                return m * size // 4
        size *= 2


def padding_shares(items, batch_size: int, max_seq_len: int, seed: int = 0) -> dict:
    """Padding share of the positions of the one-row layout (and of the bucketed one), over the
    micro-batches of ``batch_size`` pairs of a seeded shuffle (the last partial one dropped)."""
    from prefopt.collate import packed_collate_preference
    from prefopt.packing import MIN_FLEX_LEN

    order = np.random.default_rng(seed).permutation(len(items))
    n = len(order) // batch_size * batch_size
    real = positions = bucket_positions = cpu_positions = 0
    lengths = set()
    for k in range(0, n, batch_size):
        micro = [items[i] for i in order[k : k + batch_size]]
        batch = packed_collate_preference(micro, min_len=MIN_FLEX_LEN, max_seq_len=max_seq_len)
        cpu_positions += packed_collate_preference(micro, max_seq_len=max_seq_len)["tokens"].numel()  # the CPU's
        rows, row_len = batch["tokens"].shape
        used = int(batch.get("packed_tokens", batch["num_tokens"]))
        real += used
        positions += rows * row_len
        bucket_positions += rows * bucketed(row_len) if rows == 1 else rows * max_seq_len
        lengths.add(row_len)
    return {"batch_size": batch_size, "micro_batches": n // batch_size, "distinct_lengths": len(lengths),
            "padding": 1 - real / positions, "padding_bucketed": 1 - real / bucket_positions,
            "padding_cpu": 1 - real / cpu_positions}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-seq-len", type=int, default=2048, help="the dataset's per-sequence limit")
    ap.add_argument("--model-max-seq-len", type=int, default=131072, help="the model's (Llama-3.2: 131,072)")
    a = ap.parse_args(argv)

    from torchtune.models.llama2 import llama2_tokenizer

    from benchmarks.make_pref_data import write
    from prefopt.data import preference_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = write(Path(tmp) / "ufb.jsonl", a.rows)
        tok = llama2_tokenizer(str(REPO / "prefopt/assets/tiny/tokenizer.model"), max_seq_len=None, prompt_template=None)
        ds = preference_dataset(tok, source="json", data_files=str(data), split="train", max_seq_len=a.max_seq_len,
                                cache_dir=str(Path(tmp) / "cache"))
        items = [ds[i] for i in range(len(ds))]
    out = [padding_shares(items, b, a.model_max_seq_len) for b in a.batch_sizes]
    for r in out:
        print(f"batch_size {r['batch_size']}: padding {r['padding']:.2%} of positions (bucketed: "
              f"{r['padding_bucketed']:.2%}; the CPU's rows, no 256 minimum: {r['padding_cpu']:.2%}), "
              f"{r['micro_batches']} micro-batches, {r['distinct_lengths']} lengths")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
