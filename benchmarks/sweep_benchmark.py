#!/usr/bin/env python
"""Peak-RSS increase of ONE loss step across sequence lengths and vocab sizes.

    .venv/bin/python benchmarks/sweep_benchmark.py                        # 4 lengths x 2 vocabs (~7 min)
    .venv/bin/python benchmarks/sweep_benchmark.py --seq 128 --vocab 32000  # one point per mode

Each point is a fresh process (benchmarks/_sweep_point.py: peak RSS is per process), for three
modes: ours (the recipes' path), chunked_logits (the path before the profile), naive (whole
logits + log_softmax + gather). A point that would need more than 60% of the available memory is
skipped. Writes benchmarks/results/sweep.md, sweep.json and sweep.png.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._runs import BENCH, REPO, machine_info, print_report  # noqa: E402

SWEEP_MODES = ("ours", "chunked_logits", "naive")


def _ints(s: str):
    return [int(x) for x in s.split(",")]


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_sweep(a, machine) -> None:
    rows = []
    for vocab in a.vocab:
        for seq in a.seq:
            bsv_gib = 2 * a.batch_size * seq * vocab * 4 / 2**30
            for mode in SWEEP_MODES:
                need = (4.5 if mode == "naive" else 1.5) * bsv_gib + 1.0
                if need > 0.6 * _mem_available_gib():
                    rows.append({"mode": mode, "seq": seq, "vocab": vocab, "error": f"skipped: would need ~{need:.1f} GiB"})
                    print(f"  sweep {mode} seq={seq} vocab={vocab}: skipped (~{need:.1f} GiB)", flush=True)
                    continue
                cmd = [sys.executable, str(BENCH / "_sweep_point.py"), "--mode", mode, "--seq", str(seq), "--vocab", str(vocab),
                       "--batch-size", str(a.batch_size), "--chunks", "8"]
                p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
                if p.returncode != 0:
                    rows.append({"mode": mode, "seq": seq, "vocab": vocab, "error": p.stderr[-2000:]})
                    print(f"  sweep {mode} seq={seq} vocab={vocab}: FAILED\n{p.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"  sweep {mode:5s} seq={seq:5d} vocab={vocab:6d}: step peak +{r['step_delta_gib']:.3f} GiB "
                      f"(process {r['peak_rss_gib']:.2f} GiB), {r['step_s']:.1f}s", flush=True)
    write_sweep(rows, machine, a)


def write_sweep(rows, machine, a) -> None:
    L = ["# Memory sweep: our SimPO loss step vs the naive log_softmax-gather path\n"]
    L.append(f"{machine['date']}; {machine['nproc']} CPUs ({machine['cpu']}), torch {machine.get('torch')}. Command: "
             f"`{a.cmdline}`. One fresh process per point (benchmarks/_sweep_point.py); model = the benchmark's LoRA Llama "
             f"(hidden 256, 4 layers, LoRA r8 q/v, fp32) with the given vocab; {a.batch_size} pairs = "
             f"{2 * a.batch_size} sequences of the given length, half prompt, half response. 'step' = peak RSS during "
             "one forward + log-probs + SimPO loss + backward minus the RSS before it. B*S*V*4 = one float32 "
             "[sequences, seq, vocab] tensor, for scale.\n")
    L.append("- **ours**: the recipes' path (prefopt.logprobs.model_sequence_logps: only the positions that predict a "
             "response token go through the output layer, fused with the log-softmax, logits recomputed per chunk in backward)")
    L.append("- **chunked_logits**: the recipes' path before the profile (model.set_num_output_chunks(8) over every position "
             "-> prefopt.logprobs.sequence_logps, each chunk's logits kept for backward)")
    L.append("- **naive**: whole logits -> torchtune's rlhf.get_batch_log_probs (log_softmax + gather, as torchtune's DPO recipes)\n")
    L.append("| seq | vocab | B*S*V*4 (GiB) | " + " | ".join(f"{m}: step (GiB)" for m in SWEEP_MODES)
             + " | ours / naive | " + " | ".join(f"{m}: step (s)" for m in SWEEP_MODES) + " |")
    L.append("|---:|---:|---:|" + "---:|" * (2 * len(SWEEP_MODES) + 1))
    by = {(r["seq"], r["vocab"], r["mode"]): r for r in rows}
    for vocab in a.vocab:
        for seq in a.seq:
            bsv = 2 * a.batch_size * seq * vocab * 4 / 2**30
            cells = [by.get((seq, vocab, m), {}) for m in SWEEP_MODES]
            mem = [f"{c['step_delta_gib']:.3f}" if "step_delta_gib" in c else ("skipped" if "skipped" in c.get("error", "") else "failed") for c in cells]
            tim = [f"{c['step_s']:.1f}" if "step_s" in c else "" for c in cells]
            o, n = cells[0], cells[SWEEP_MODES.index("naive")]
            ratio = f"{o['step_delta_gib'] / n['step_delta_gib']:.2f}" if "step_delta_gib" in o and "step_delta_gib" in n else ""
            L.append(f"| {seq} | {vocab} | {bsv:.3f} | " + " | ".join(mem) + f" | {ratio} | " + " | ".join(tim) + " |")
    (a.out_dir / "sweep.md").write_text("\n".join(L) + "\n")
    (a.out_dir / "sweep.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.vocab), figsize=(4.6 * len(a.vocab), 3.9), squeeze=False)
    for ax, vocab in zip(axes[0], a.vocab):
        for mode, style in zip(SWEEP_MODES, ("o-", "s--", "^-.")):
            pts = [(s, by[(s, vocab, mode)]["step_delta_gib"]) for s in a.seq if "step_delta_gib" in by.get((s, vocab, mode), {})]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode)
        ax.plot(a.seq, [2 * a.batch_size * s * vocab * 4 / 2**30 for s in a.seq], ":", color="gray", label="B*S*V*4 bytes")
        ax.set_title(f"vocab {vocab}, {2 * a.batch_size} sequences", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("peak RSS increase of one step (GiB)")
        ax.legend(fontsize=8)
    fig.suptitle(f"loss-step memory, {machine['date']}, {machine['nproc']} CPUs ({machine['cpu']}), torch {machine.get('torch')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out_dir / "sweep.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=BENCH / "results", help="where the results go (default: benchmarks/results/)")
    p.add_argument("--seq", type=_ints, default=[128, 256, 512, 1024], help="comma list of sequence lengths")
    p.add_argument("--vocab", type=_ints, default=[32000, 128256], help="comma list of vocab sizes")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    a = p.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    a.cmdline = " ".join([".venv/bin/python", "benchmarks/sweep_benchmark.py"] + sys.argv[1:])
    t_all = time.perf_counter()
    machine = machine_info()
    print(f"machine: {machine}", flush=True)
    run_sweep(a, machine)
    print_report(a.out_dir / "sweep.md", t_all)


if __name__ == "__main__":
    main()
