#!/usr/bin/env python
"""Where our SimPO LoRA step spends its time and memory, and what the candidate fixes buy.

    .venv/bin/python benchmarks/profile_step.py [--rounds 3] [--threads-compare] [--compile]

Same shapes as peers_benchmark.py (LoRA r8 q/v Llama, vocab 32000, hidden 256, 4 layers, fp32,
batch 4 pairs = 8 sequences of 382 tokens, half prompt), in this process:

1. torch.profiler over one step of the recipe's path (``ours`` in benchmarks/_steps.py + the
   AdamW step): self CPU time by op, grouped into output projection (matmuls with a vocab-sized
   operand), log-softmax/log-prob (other vocab-sized ops: logsumexp, exp, gather, the
   logits_mean sum...), attention (SDPA), the other decoder-layer ops, and the optimizer.
2. Wall time of the variants of benchmarks/_steps.py, interleaved over --rounds rounds
   (medians), and their losses/gradients against ``ours``.
3. Peak-RSS increase of one step of each variant, each in a fresh process (_sweep_point.py).

Writes benchmarks/results/profile.md (and profile.json).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# torch is imported only after the memory measurements: a child process inherits its parent's
# peak RSS (ru_maxrss survives fork + exec), so the fresh processes must be started from a small one.

VOCAB = 32000
PAIRS, PROMPT, RESP = 4, 190, 190


def categorize(name: str, shapes, vocab: int) -> str:
    flat = [d for s in (shapes or []) if isinstance(s, (list, tuple)) for d in (s if all(isinstance(x, int) for x in s) else [])]
    has_vocab = vocab in flat
    n = name.lower()
    if "adamw" in n or "_fused_adam" in n or "optimizer" in n:
        return "optimizer"
    if "scaled_dot_product" in n or "flash_attention" in n or "_efficient_attention" in n:
        return "attention (SDPA fwd+bwd)"
    if has_vocab and n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "output projection (vocab matmuls, fwd+bwd)"
    if has_vocab:
        return "log-softmax / log-prob / logits_mean (vocab-sized elementwise)"
    if n in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "decoder-layer matmuls (q/k/v/o, MLP, LoRA)"
    return "other (norms, RoPE, SiLU, copies, autograd)"


def profile_one(model, tokens, labels, lf, opt):
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks._steps import STEPS

    phases = {}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        t0 = time.perf_counter()
        with record_function("PHASE forward+logps+loss"):
            losses = STEPS["ours"](model, tokens, labels, lf)
            loss = losses.mean()
        t1 = time.perf_counter()
        with record_function("PHASE backward"):
            loss.backward()
        t2 = time.perf_counter()
        with record_function("PHASE optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
    phases = {"forward + log-probs + loss": t1 - t0, "backward": t2 - t1, "optimizer step": t3 - t2}
    cats = defaultdict(float)
    ops = []
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key.startswith("PHASE") or ev.key.startswith("ProfilerStep"):
            continue
        self_us = ev.self_cpu_time_total
        c = categorize(ev.key, ev.input_shapes, VOCAB)
        cats[c] += self_us
        ops.append({"op": ev.key, "shapes": str(ev.input_shapes)[:90], "self_ms": self_us / 1e3, "calls": ev.count,
                    "cat": c, "self_mem_mb": ev.self_cpu_memory_usage / 2**20})
    ops.sort(key=lambda o: -o["self_ms"])
    return phases, dict(cats), ops


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="ours,chunked_logits,response_only,response_only_ce,naive")
    p.add_argument("--threads-compare", action="store_true", help="also time `ours` with 1 thread")
    p.add_argument("--compile", action="store_true", help="also time `ours` with torch.compile on each decoder layer")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--ac-variants", default="ours,response_only_ce", help="also time these with activation checkpointing")
    p.add_argument("--full", action="store_true", help="full fine-tuning: every weight trainable, AdamW over all")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    a = p.parse_args()
    variants = a.variants.split(",")
    # 3. (first) memory, fresh process per variant
    mem = {}
    if not a.no_memory and not a.full:
        for v in variants + ["ours+ac", "chunked_logits+ac"]:
            extra = ["--ac"] if v.endswith("+ac") else []
            out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "_sweep_point.py"), "--mode", v.replace("+ac", ""), "--seq", str(PROMPT + RESP + 2),
                                  "--vocab", str(VOCAB), "--batch-size", str(PAIRS)] + extra, capture_output=True, text=True, cwd=REPO)
            if out.returncode == 0:
                mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"memory {v}: +{mem[v]['step_delta_gib']:.3f} GiB", flush=True)
            else:
                print(f"memory {v}: failed\n{out.stderr[-1500:]}", flush=True)

    global torch
    import torch

    from benchmarks._steps import build_model, loss_fn, make_batch, run_step

    n_threads = torch.get_num_threads()

    tokens, labels = make_batch(PAIRS, PROMPT, RESP, VOCAB)
    model = build_model(VOCAB, lora=not a.full)
    lf = loss_fn()
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    # correctness of the variants against the recipe's path (same weights, one backward each)
    check = {}
    ref_loss = run_step("ours", model, tokens, labels, lf)
    ref_g = grads(model)
    model.zero_grad(set_to_none=True)
    for v in variants:
        if v == "ours":
            continue
        l_ = run_step(v, model, tokens, labels, lf)
        g = grads(model)
        model.zero_grad(set_to_none=True)
        check[v] = {"loss_abs_diff": abs(float(l_ - ref_loss)),
                    "grad_max_rel_diff": max(float((g[k] - ref_g[k]).abs().max() / ref_g[k].abs().max().clamp_min(1e-30)) for k in ref_g)}
    print("correctness vs ours:", json.dumps(check), flush=True)

    # 1. profile of the recipe's path (after a warm-up step)
    run_step("ours", model, tokens, labels, lf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    phases, cats, ops = profile_one(model, tokens, labels, lf, opt)
    print("phases:", phases, flush=True)

    # 2. interleaved timing
    timed = list(variants)
    if a.threads_compare:
        timed.append("ours@1thread")
    if a.compile:
        timed.append("ours+compile")
    ac_variants = [v for v in a.ac_variants.split(",") if v] if a.ac_variants else []
    timed += [f"{v}+ac" for v in ac_variants]
    ac_model = None
    compiled = None
    compile_s = None
    times = defaultdict(list)
    cpu_times = defaultdict(list)
    for r in range(a.rounds):
        for v in timed:
            m = model
            if v == "ours+compile":
                if compiled is None:
                    from torchtune import training

                    compiled = build_model(VOCAB, lora=True)
                    training.compile_model(compiled)
                    t0 = time.perf_counter()
                    try:
                        run_step("ours", compiled, tokens, labels, lf)  # compiles
                    except Exception as e:  # noqa: BLE001
                        print(f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        timed.remove(v)
                        compiled = False
                        continue
                    compiled.zero_grad(set_to_none=True)
                    compile_s = time.perf_counter() - t0
                    print(f"compile + first step: {compile_s:.1f}s", flush=True)
                if compiled is False:
                    continue
                m = compiled
            if v.endswith("+ac"):
                if ac_model is None:
                    from torchtune import modules, training

                    ac_model = build_model(VOCAB, lora=not a.full)
                    training.set_activation_checkpointing(ac_model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
                m = ac_model
            if v == "ours@1thread":
                torch.set_num_threads(1)
            t0, c0 = time.perf_counter(), time.process_time()
            run_step(v.split("@")[0].split("+")[0], m, tokens, labels, lf)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            m.zero_grad(set_to_none=True)
            torch.set_num_threads(n_threads)
            times[v].append(dt)
            cpu_times[v].append(dc)
            print(f"round {r} {v}: {dt:.2f}s (CPU {dc:.2f}s)", flush=True)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    med_cpu = {v: statistics.median(ts) for v, ts in cpu_times.items()}

    write(a, phases, cats, ops, med, med_cpu, times, check, mem, n_threads, compile_s)


def write(a, phases, cats, ops, med, med_cpu, times, check, mem, n_threads, compile_s) -> None:
    import datetime as _dt

    import torch

    total = sum(cats.values())
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    L = [f"# Profile of our SimPO {'full fine-tuning' if a.full else 'LoRA'} step\n"]
    L.append(f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {os.cpu_count()} CPUs ({cpu}), torch "
             f"{torch.__version__}, {n_threads} threads, load average {os.getloadavg()[0]:.1f} (shared machine). Shapes of "
             f"peers_benchmark.py: {'all weights trainable, AdamW over all' if a.full else 'LoRA r8 q/v'} Llama (vocab {VOCAB}, hidden 256, 4 layers), fp32, {PAIRS} pairs = {2 * PAIRS} "
             f"sequences of {PROMPT + RESP + 2} tokens ({PROMPT + 1} prompt).\n")
    L.append("## Where the time goes (torch.profiler, one step of the recipe's path, self CPU time)\n")
    L.append("| phase | wall (s) |\n|---|---:|")
    for k, v in phases.items():
        L.append(f"| {k} | {v:.2f} |")
    L.append("\n| category | self CPU (s) | share |\n|---|---:|---:|")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        L.append(f"| {k} | {v / 1e6:.2f} | {100 * v / total:.0f}% |")
    L.append("\nTop ops:\n\n| op | input shapes | calls | self CPU (ms) | category |\n|---|---|---:|---:|---|")
    for o in ops[:15]:
        L.append(f"| {o['op']} | `{o['shapes']}` | {o['calls']} | {o['self_ms']:.0f} | {o['cat']} |")
    L.append("\n## Variants (benchmarks/_steps.py): step wall time, interleaved, and memory\n")
    L.append("Step = forward + log-probs + SimPO loss + backward (the optimizer step, the same for every variant, is in the "
             "phase table above). "
             "Memory = peak-RSS increase of one step in a fresh process.\n")
    L.append("| variant | median step (s) | all rounds (s) | speed-up vs ours (wall) | median CPU-s | speed-up vs ours (CPU) | step memory (GiB) | loss diff vs ours | max rel. grad diff |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    base, base_cpu = med.get("ours"), med_cpu.get("ours")
    for v, m in med.items():
        mm = mem.get(v, {}).get("step_delta_gib")
        c = check.get(v, {})
        L.append(f"| {v} | {m:.2f} | {', '.join(f'{t:.2f}' for t in times[v])} | {base / m:.2f}x | {med_cpu[v]:.2f} | {base_cpu / med_cpu[v]:.2f}x | "
                 f"{'' if mm is None else f'{mm:.3f}'} | {c.get('loss_abs_diff', 0):.1e} | {c.get('grad_max_rel_diff', 0):.1e} |")
    for v, r in mem.items():
        if v not in med:
            L.append(f"| {v} | | | | | | {r['step_delta_gib']:.3f} | | |")
    if compile_s is not None:
        L.append(f"\ntorch.compile (torchtune's compile_model: each decoder layer): first step incl. compilation {compile_s:.0f}s.")
    name = "profile_full" if a.full else "profile"
    (a.out_dir / f"{name}.md").write_text("\n".join(L) + "\n")
    (a.out_dir / f"{name}.json").write_text(json.dumps({"phases": phases, "categories_us": cats, "top_ops": ops[:40], "median_step_s": med, "median_step_cpu_s": med_cpu, "compile_s": compile_s,
                                                         "times": times, "check": check, "memory": mem}, indent=1))
    print("\n".join(L), flush=True)


if __name__ == "__main__":
    main()
