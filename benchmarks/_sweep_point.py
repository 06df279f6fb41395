"""One point of the memory sweep, in a fresh process (peak RSS is per process):

    python benchmarks/_sweep_point.py --mode ours|naive|fused|... --seq S --vocab V [--batch-size B]

Builds the benchmark's LoRA Llama with vocab V, a batch of B pairs (2B sequences of S tokens:
half prompt, half response), runs ONE loss step (forward, log-probs, SimPO loss, backward) and
prints a JSON line: RSS before the step, peak RSS after it (ru_maxrss), their difference.
"""

import argparse
import gc
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._steps import STEPS, build_model, loss_fn, make_batch, run_step  # noqa: E402


def rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=sorted(STEPS), required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4, help="pairs")
    p.add_argument("--chunks", type=int, default=None, help="override the chunk count of every variant")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ac", action="store_true", help="activation checkpointing of every decoder layer (torchtune's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import benchmarks._steps as st

    if a.chunks:
        st.NUM_OUTPUT_CHUNKS = st.OURS_CHUNKS = a.chunks
    prompt = (a.seq - 2) // 2
    tokens, labels = make_batch(a.batch_size, prompt, a.seq - 2 - prompt, a.vocab)
    model = build_model(a.vocab, lora=True)
    if a.ac:
        from torchtune import modules, training

        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    lf = loss_fn()
    gc.collect()
    before = rss_now_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    run_step(a.mode, model, tokens, labels, lf)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "mode": a.mode + ("+ac" if a.ac else ""), "seq": a.seq, "vocab": a.vocab, "batch_pairs": a.batch_size, "chunks": a.chunks,
        "rss_before_gib": before / 2**20, "peak_before_gib": peak_before / 2**20, "peak_rss_gib": peak / 2**20,
        "step_delta_gib": (peak - before) / 2**20, "step_s": dt,
    }))


if __name__ == "__main__":
    main()
