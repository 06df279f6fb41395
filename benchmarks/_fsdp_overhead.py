"""What FSDP2 costs a ONE-process full fine-tuning step on CPU (recipes/simpo_full_distributed.py
always shards, also with world_size 1).

    python benchmarks/_fsdp_overhead.py [--rounds 4]

Same model/batch as profile_step.py --full; the recipe's step path (chunked logits ->
sequence_logps -> SimPOLoss -> backward) + AdamW(fused) step, on (a) the plain module and (b) the
module after fully_shard per decoder layer + root (reshard_after_forward=True, the recipe's
default) in a 1-process gloo group. Interleaved; medians of wall and CPU time.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torchtune import training  # noqa: E402

from benchmarks._steps import build_model, loss_fn, make_batch, run_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    tokens, labels = make_batch(4, 190, 190, 32000)
    lf = loss_fn()
    plain = build_model(32000, lora=False)
    sharded = build_model(32000, lora=False)
    for name, module in reversed(list(sharded.named_modules())):
        if training.get_shard_conditions(name, module):
            fully_shard(module, reshard_after_forward=True)
    fully_shard(sharded, reshard_after_forward=True)
    opts = {"plain": torch.optim.AdamW(plain.parameters(), lr=1e-5, fused=True),
            "fsdp": torch.optim.AdamW(sharded.parameters(), lr=1e-5, fused=True)}
    models = {"plain": plain, "fsdp": sharded}
    times = {k: [] for k in models}
    cpus = {k: [] for k in models}
    for r in range(a.rounds + 1):  # round 0: warm-up
        for k, m in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run_step("ours", m, tokens, labels, lf)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r:
                times[k].append(dt)
                cpus[k].append(dc)
            print(f"round {r} {k}: {dt:.2f}s (CPU {dc:.2f}s)", flush=True)
    out = {k: {"median_step_s": statistics.median(times[k]), "median_cpu_s": statistics.median(cpus[k]), "steps": times[k]} for k in models}
    print(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
