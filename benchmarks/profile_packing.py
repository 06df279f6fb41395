#!/usr/bin/env python
"""Where one LoRA step's time goes in the packed and in the padded layout, on the same pairs.

    .venv/bin/python benchmarks/profile_packing.py --data /tmp/prefopt_bench/data/long_prompt.jsonl \
        [--batch-size 2] [--step 1] [--shape decoder] [--out FILE.json]

For packing_benchmark.py, where a tokens/s target is missed: the pairs of step
--step of the data file (read in file order, as the benchmark's runs read it), laid out by our
recipes' two collates, each put through one warm-up and one profiled forward + backward of
prefopt.step.preference_forward (the recipes' step) on the LoRA Llama of --shape (random
weights: the time does not depend on their values). torch.profiler's self CPU time per op,
grouped as in benchmarks/profile_step.py, plus the packed layout's own work (its attention mask).
The optimizer step (LoRA parameters only) is left out: it is the same in both layouts.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks._make_model import LORA, SHAPES  # noqa: E402
from benchmarks.profile_step import categorize  # noqa: E402
from benchmarks.wordtok import PAD_ID, WordTokenizer  # noqa: E402


def _category(name: str, shapes, vocab: int) -> str:
    n = name.lower()
    # building the packed layout's dense [rows, L, L] mask (prefopt.packing.packed_attention_mask)
    if n in ("aten::eq", "aten::bitwise_and", "aten::bitwise_not", "aten::tril_", "aten::logical_and", "aten::logical_not"):
        return "mask building / boolean ops"
    return categorize(name, shapes, vocab)


def step_once(model, batch, loss_fn, prof=None):
    from prefopt.step import preference_forward

    t0, c0 = time.perf_counter(), time.process_time()
    out = preference_forward(model, batch, loss_fn, device=torch.device("cpu"))
    out.losses.mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a data file of packing_benchmark.py")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--step", type=int, default=1, help="profile the pairs of this step (0 = the warm-up step's)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="decoder")
    p.add_argument("--layouts", default="packed,padded")
    p.add_argument("--top", type=int, default=12, help="ops listed per layout")
    p.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    a = p.parse_args()

    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from prefopt.collate import packed_collate_preference, padded_collate_preference
    from prefopt.data import preference_dataset
    from prefopt.loss import SimPOLoss

    shape = SHAPES[a.shape]
    torch.manual_seed(0)
    model = lora_llama2(**LORA, **shape)
    set_trainable_params(model, get_adapter_params(model))
    loss_fn = SimPOLoss(beta=2.0, gamma=0.5)
    ds = preference_dataset(WordTokenizer(shape["vocab_size"]), source="json", data_files=str(a.data), split="train")
    pairs = [ds[i] for i in range(a.step * a.batch_size, (a.step + 1) * a.batch_size)]
    collates = {"packed": packed_collate_preference, "padded": padded_collate_preference}
    result = {"data": str(a.data), "rows": [ex["row"] for ex in pairs], "shape": shape, "threads": torch.get_num_threads(), "layouts": {}}
    for layout in a.layouts.split(","):
        batch = collates[layout](pairs, padding_idx=PAD_ID)
        step_once(model, batch, loss_fn)  # warm-up: first-call allocations
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            wall, cpu = step_once(model, batch, loss_fn)
        cats = defaultdict(float)
        ops = []
        for ev in prof.key_averages(group_by_input_shape=True):
            c = _category(ev.key, ev.input_shapes, shape["vocab_size"])
            cats[c] += ev.self_cpu_time_total / 1e6
            ops.append({"op": ev.key, "shapes": str(ev.input_shapes)[:100], "self_s": ev.self_cpu_time_total / 1e6, "calls": ev.count, "cat": c})
        ops.sort(key=lambda o: -o["self_s"])
        rows, row_len = batch["tokens"].shape
        result["layouts"][layout] = {"tokens_shape": [rows, row_len], "wall_s": wall, "cpu_s": cpu, "categories": dict(cats), "top_ops": ops[: a.top]}

    print(f"pairs (file rows) {result['rows']}, --shape {a.shape}, {result['threads']} threads; profiled step (forward + backward), self CPU time:\n")
    for layout, r in result["layouts"].items():
        total = sum(r["categories"].values())
        print(f"## {layout}: tokens {r['tokens_shape'][0]} x {r['tokens_shape'][1]}, wall {r['wall_s']:.2f} s (profiled), "
              f"CPU {r['cpu_s']:.2f} s\n")
        print("| category | self CPU (s) | share |\n|---|---:|---:|")
        for c, t in sorted(r["categories"].items(), key=lambda kv: -kv[1]):
            print(f"| {c} | {t:.2f} | {t / total:.0%} |")
        print("\n| op | input shapes | calls | self CPU (s) |\n|---|---|---:|---:|")
        for o in r["top_ops"]:
            print(f"| {o['op']} | {o['shapes']} | {o['calls']} | {o['self_s']:.2f} |")
        print()
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
