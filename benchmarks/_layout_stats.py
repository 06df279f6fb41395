"""What each tool's model runs on, step by step, for a data file read in order (packing_benchmark.py).

    python benchmarks/_layout_stats.py DATA.jsonl BATCH STEPS VOCAB

Prints one JSON list, one entry per step: the positions each layout puts through the decoder
(padding included) and through the output layer. The layouts are our recipes' own collates on our
own dataset class, so the figures are what the runs compute, not a model of it:

- packed (ours_lora): prefopt.collate.packed_collate_preference, [rows, row length];
- padded (ours_lora_padded): prefopt.collate.padded_collate_preference, [2b, longest sequence];
- TRL: CPOTrainer's concatenated_inputs pads chosen and rejected to one common length, the same
  [2b, longest sequence] as our padded layout, and its model computes logits at every position.

Output-layer positions: ours only at positions that predict a response token (the ScorePlan), in
either layout; TRL at all of its [2b, L]. attention = sum over rows of L^2: the score entries of a
dense [L, L] attention per row (our packed layout's block mask is dense on the CPU; a causal
kernel may skip half of them for the padded layouts).

A separate process so that packing_benchmark.py itself never imports torch (see _make_model.py).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.wordtok import PAD_ID, WordTokenizer  # noqa: E402
from prefopt.collate import packed_collate_preference, padded_collate_preference  # noqa: E402
from prefopt.data import preference_dataset  # noqa: E402


def main() -> None:
    data, b, steps, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ds = preference_dataset(WordTokenizer(vocab), source="json", data_files=data, split="train")
    out = []
    for k in range(steps):
        batch = [ds[i] for i in range(k * b, min((k + 1) * b, len(ds)))]
        packed = packed_collate_preference(batch, padding_idx=PAD_ID)
        padded = padded_collate_preference(batch, padding_idx=PAD_ID)
        rows, row_len = packed["tokens"].shape
        seqs, seq_len = padded["tokens"].shape
        scored = int(packed["plan"].score_index.numel())
        out.append({
            "rows": [int(r) for r in packed["rows"]],
            "pairs": len(batch),
            "real_tokens": int(packed["packed_tokens"]),  # prompt (shared prefix) once, no padding
            "sequence_tokens": int(padded["num_tokens"]),  # prompt twice, no padding
            "packed": {"rows": rows, "row_len": row_len, "positions": rows * row_len, "attention": rows * row_len**2,
                       "output_positions": scored},
            "padded": {"rows": seqs, "row_len": seq_len, "positions": seqs * seq_len, "attention": seqs * seq_len**2,
                       "output_positions": int(padded["plan"].score_index.numel())},
            "trl": {"rows": seqs, "row_len": seq_len, "positions": seqs * seq_len, "attention": seqs * seq_len**2,
                    "output_positions": seqs * seq_len},
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
