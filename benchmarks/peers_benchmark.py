#!/usr/bin/env python
"""prefopt vs its peers: throughput and peak memory of one preference-optimization step.

    .venv/bin/python benchmarks/peers_benchmark.py               # LoRA + full, 2 interleaved rounds
    .venv/bin/python benchmarks/peers_benchmark.py --parts lora  # the LoRA group alone

Everything is made locally, seeded, in --workdir (default /tmp/prefopt_bench): a Hugging Face
Llama (~19.5M parameters: vocab 32000, hidden 256, 4 layers, 4 heads, MLP 688), a pre-tokenized
preference data set (jsonl, chosen/rejected message lists of ``w<id>`` words; every pair has
a P-token prompt and two R-token responses) and the tokenizer for both sides
(benchmarks/wordtok.py). Nothing is downloaded.

Runs (same model shape, data, batch size, sequence length, fp32, AdamW(fused), no clipping, no
activation checkpointing, same number of steps), --rounds rounds of fresh processes, and within a
round the runs of a group interleaved STEP BY STEP (A B C, B C A, C A B, ...; see
benchmarks/_runs.py):

  LoRA r8 on q_proj/v_proj:
    ours_lora   tune run recipes/simpo_lora_single_device.py   (SimPO)
    tt_lora_dpo tune run lora_dpo_single_device                (torchtune 0.6.1 DPO, reference pass)
    trl_cpo     TRL CPOTrainer loss_type=simpo cpo_alpha=0, peft LoRA (benchmarks/_trl_cpo.py)
  full fine-tuning, one process:
    ours_full   tune run recipes/simpo_full_distributed.py     (SimPO, FSDP2 over 1 process)
    tt_full_dpo tune run full_dpo_distributed                  (torchtune 0.6.1 DPO, reference model)

tokens/s = real tokens per step / median step time, where real tokens per step = pairs per step x
(prompt + chosen + rejected tokens of a pair, BOS/EOS included), counted from the data set, the
same for every tool (no padding: every pair has the same lengths).

Writes benchmarks/results/results.md, results.png, results.json.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _runs  # noqa: E402
from benchmarks._make_model import LORA, shape_words  # noqa: E402

PARTS = ("lora", "full")
# (ours, peer, min tokens/s ratio, max peak-memory ratio)
TARGETS = [
    ("ours_lora", "trl_cpo", 1.5, 0.5),
    ("ours_lora", "tt_lora_dpo", 2.0, 0.4),
    ("ours_full", "tt_full_dpo", 1.6, 0.6),
]


def uniform_assets(a) -> Dict[str, Any]:
    """The model and --pairs pairs of --prompt-len / --response-len words, and their token counts."""
    vocab = a.model_shape["vocab_size"]
    spec = {"vocab": vocab, "pairs": a.pairs, "prompt_len": a.prompt_len, "response_len": a.response_len, "seed": a.seed, "v": 1}
    data_file = _runs.write_data(a.workdir / "data" / "train.jsonl", spec, [(a.prompt_len, a.response_len, a.response_len)] * a.pairs,
                           random.Random(a.seed), vocab)
    assets = _runs.make_assets(a, data_file, "uniform", in_order=False)
    per_pair = {p["prompt"] + p["chosen"] + p["rejected"] for p in assets["pairs"]}
    fwd_per_pair = {2 * p["prompt"] + p["chosen"] + p["rejected"] for p in assets["pairs"]}
    if len(per_pair) != 1:
        raise RuntimeError("pairs of different lengths: per-step token counts would depend on each tool's data order")
    assets.update(tokens_per_pair=per_pair.pop(),  # prompt + chosen + rejected
                  fwd_tokens_per_pair=fwd_per_pair.pop(),  # prompt counted twice: what the model runs on
                  seq_len=1 + a.prompt_len + a.response_len + 1)
    return assets


def full_recipe_problem() -> Optional[str]:
    """Why our full recipe cannot be benchmarked (None if it can be tried)."""
    path = _runs.REPO / "recipes" / "simpo_full_distributed.py"
    if not path.exists():
        return f"{path.relative_to(_runs.REPO)} does not exist yet"
    p = subprocess.run([sys.executable, "-c", "import recipes.simpo_full_distributed as m; m.SimPORecipeDistributed"],
                       cwd=_runs.REPO, capture_output=True, text=True)
    if p.returncode != 0:
        return f"{path.relative_to(_runs.REPO)} does not import: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    return None


# ------------------------------------------------------------------------------------------------
# reporting


def summarize(results: List[Dict[str, Any]], assets, a) -> Dict[str, Dict[str, Any]]:
    tokens_per_step = a.batch_size * assets["tokens_per_pair"]
    out = {}
    for tool in _runs.TOOLS:
        rs = [r for r in results if r["tool"] == tool]
        if not rs:
            continue
        ok = [r for r in rs if "error" not in r]
        s: Dict[str, Any] = {"tool": tool, "label": _runs.TOOLS[tool][1], "runs": len(rs), "ok_runs": len(ok)}
        if ok:
            steps = [d for r in ok for d in r["step_s"]]
            s["median_step_s"] = statistics.median(steps)
            s["min_step_s"] = min(steps)
            s["median_step_cpu_s"] = statistics.median(d for r in ok for d in r["step_cpu_s"])
            s["round_median_step_s"] = [r["median_step_s"] for r in ok]
            s["tokens_per_s"] = tokens_per_step / s["median_step_s"]
            s["round_tokens_per_s"] = [tokens_per_step / m for m in s["round_median_step_s"]]
            s["peak_rss_gib"] = statistics.median(r["peak_rss_gib"] for r in ok)
            s["round_peak_rss_gib"] = [r["peak_rss_gib"] for r in ok]
            s["train_peak_rss_gib"] = statistics.median(r["train_peak_rss_gib"] for r in ok)
            s["startup_s"] = statistics.median(r["startup_s"] for r in ok)
        else:
            s["error"] = rs[0].get("error")
        out[tool] = s
    return out


def ratios(summary) -> List[Dict[str, Any]]:
    rows = []
    for ours, peer, tps_min, mem_max in TARGETS:
        if ours not in summary or peer not in summary:
            continue
        o, p = summary[ours], summary[peer]
        if "tokens_per_s" not in o or "tokens_per_s" not in p:
            rows.append({"ours": ours, "peer": peer, "skipped": o.get("error") or p.get("error")})
            continue
        tps = o["tokens_per_s"] / p["tokens_per_s"]
        cpu_ratio = p["median_step_cpu_s"] / o["median_step_cpu_s"]
        min_ratio = p["min_step_s"] / o["min_step_s"]
        mem = o["peak_rss_gib"] / p["peak_rss_gib"]
        # per-round ratios (round k of ours vs round k of the peer): the spread of the noise
        tps_r = [x / y for x, y in zip(o["round_tokens_per_s"], p["round_tokens_per_s"])]
        rows.append({"ours": ours, "peer": peer, "tps_ratio": tps, "tps_target": tps_min, "tps_met": tps >= tps_min,
                     "tps_ratio_rounds": tps_r, "cpu_time_ratio": cpu_ratio, "min_step_ratio": min_ratio, "mem_ratio": mem, "mem_target": mem_max, "mem_met": mem <= mem_max,
                     "train_mem_ratio": o["train_peak_rss_gib"] / p["train_peak_rss_gib"]})
    return rows


def write_report(summary, rat, machine, assets, a, skipped: Dict[str, str], wall_s: float) -> None:
    tps_step = a.batch_size * assets["tokens_per_pair"]
    L = []
    L.append("# prefopt vs peers: benchmark results\n")
    L.append(f"- **Date**: {machine['date']}  ")
    L.append(f"- **Machine**: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB RAM, no GPU; "
             f"torch {machine['torch']} ({machine['torch_threads']} threads), torchtune {machine['torchtune']}, "
             f"transformers {machine['transformers']}, TRL {machine['trl']}, peft {machine['peft']}; "
             f"load average {machine['loadavg_start']:.1f} at start, {machine['loadavg_end']:.1f} at end (shared machine)  ")
    L.append(f"- **Command**: `{a.cmdline}` ({wall_s / 60:.1f} min)  ")
    L.append(f"- **Model**: HF Llama, {assets['n_params'] / 1e6:.2f}M parameters ({shape_words(a.model_shape)}), fp32; LoRA r{LORA['lora_rank']}/alpha {LORA['lora_alpha']} on q_proj, v_proj  ")
    L.append(f"- **Data**: {a.pairs} pairs, prompt {a.prompt_len}+1 (BOS), responses {a.response_len}+1 (EOS) tokens; sequences "
             f"of {assets['seq_len']} tokens, no padding; batch {a.batch_size} pairs = {tps_step} real tokens per step "
             f"(prompt + chosen + rejected; the model runs on {a.batch_size * assets['fwd_tokens_per_pair']}, prompt twice)  ")
    L.append(f"- **Steps**: {a.steps} per run, the first {a.warmup} dropped as warm-up; {a.rounds} rounds of fresh processes; in "
             "a round the runs of a group (LoRA, full) take their steps in lockstep, one run at a time, in rotating order "
             "(A B C, B C A, ...); step time = from the release after step i-1 to the end of optimizer step i (global optimizer "
             "hook, benchmarks/_stepclock.py); medians over all measured steps of both rounds  ")
    L.append("")
    L.append("| run | median step (s) | per-round medians (s) | fastest step (s) | CPU-s per step | tokens/s | peak RSS (GiB) | peak RSS in training (GiB) | start-up + step 1 (s) |")
    L.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for tool, s in summary.items():
        if "tokens_per_s" not in s:
            L.append(f"| {s['label']} | failed: {s.get('error')} | | | | | | | |")
            continue
        L.append(f"| {s['label']} | {s['median_step_s']:.2f} | {', '.join(f'{x:.2f}' for x in s['round_median_step_s'])} | "
                 f"{s['min_step_s']:.2f} | {s['median_step_cpu_s']:.2f} | {s['tokens_per_s']:.0f} | {s['peak_rss_gib']:.2f} | {s['train_peak_rss_gib']:.2f} | {s['startup_s']:.1f} |")
    for tool, why in skipped.items():
        L.append(f"| {_runs.TOOLS[tool][1]} | skipped: {why} | | | | | | | |")
    L.append("")
    L.append("| ours vs peer | tokens/s ratio (target) | per round | fastest-step ratio | CPU-time ratio | peak RSS ratio (target) | training-peak ratio | met? |")
    L.append("|---|---:|---|---:|---:|---:|---:|---|")
    for r in rat:
        if "skipped" in r:
            L.append(f"| {r['ours']} vs {r['peer']} | n/a | | | | n/a | | not measured: {r['skipped']} |")
            continue
        met = f"tokens/s {'yes' if r['tps_met'] else 'NO'}, memory {'yes' if r['mem_met'] else 'NO'}"
        L.append(f"| {r['ours']} vs {r['peer']} | **{r['tps_ratio']:.2f}x** (>= {r['tps_target']}x) | "
                 f"{', '.join(f'{x:.2f}' for x in r['tps_ratio_rounds'])} | {r['min_step_ratio']:.2f}x | {r['cpu_time_ratio']:.2f}x | **{r['mem_ratio']:.2f}x** (<= {r['mem_target']}x) | "
                 f"{r['train_mem_ratio']:.2f}x | {met} |")
    L.append("")
    L.append("tokens/s ratio = ours / peer from the median step times (the target metric); fastest-step ratio = peer's "
             "fastest step / ours; CPU-time ratio = peer's median CPU seconds (user + system, all threads) per step / ours: "
             "the two are less exposed to other users of a shared machine than the medians.  ")
    L.append("Peak RSS = the run's whole process (os.wait4 ru_maxrss: imports, model load, training, final save); "
             "'in training' = ru_maxrss at the last optimizer step. Raw numbers: results.json; logs and configs: "
             f"{a.workdir}/runs/.")
    (a.out_dir / "results.md").write_text("\n".join(L) + "\n")
    (a.out_dir / "results.json").write_text(json.dumps({"machine": machine, "summary": summary, "ratios": rat, "skipped": skipped,
                                                         "assets": {k: str(v) for k, v in assets.items() if k != "pairs"}, "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))
    plot(summary, machine, a)


def plot(summary, machine, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tools = [t for t in summary if "tokens_per_s" in summary[t]]
    if not tools:
        return
    colors = {"ours_lora": "#1f77b4", "ours_full": "#1f77b4", "tt_lora_dpo": "#ff7f0e", "tt_full_dpo": "#ff7f0e", "trl_cpo": "#2ca02c"}
    short = {"ours_lora": "ours\nLoRA", "tt_lora_dpo": "torchtune\nLoRA DPO", "trl_cpo": "TRL CPO-SimPO\nLoRA",
             "ours_full": "ours\nfull", "tt_full_dpo": "torchtune\nfull DPO"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"), (axes[1], "peak_rss_gib", "peak RSS, GiB (lower is better)")):
        vals = [summary[t][key] for t in tools]
        bars = ax.bar(range(len(tools)), vals, color=[colors[t] for t in tools])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}" if key == "tokens_per_s" else f"{v:.2f}", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(tools)), [short[t] for t in tools], fontsize=8)
        ax.set_title(title)
    fig.suptitle(f"prefopt vs peers, {machine['date']}: {machine['nproc']} CPUs ({machine['cpu']}), torch {machine['torch']}; "
                 f"batch {a.batch_size} pairs, seq {1 + a.prompt_len + a.response_len + 1}, fp32", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out_dir / "results.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _runs.add_run_args(p, shape="small", rounds=2, steps=7, batch_size=4)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ", ".join(PARTS))
    p.add_argument("--tools", default=None, help="comma list: only these runs (" + ", ".join(t for t, (part, _) in _runs.TOOLS.items() if part in PARTS) + ")")
    p.add_argument("--pairs", type=int, default=64, help="pairs in the data set (at least steps x batch size)")
    a = p.parse_args()
    parts = set(a.parts.split(","))
    if parts - set(PARTS):
        p.error(f"--parts: unknown {sorted(parts - set(PARTS))}")
    _runs.check_run_args(p, a, "peers_benchmark.py")
    a.pairs = max(a.pairs, a.steps * a.batch_size)
    t_all = time.perf_counter()
    machine = _runs.machine_info()
    print(f"machine: {machine}", flush=True)

    tools = [t for t, (part, _) in _runs.TOOLS.items() if part in parts and (a.tools is None or t in a.tools.split(","))]
    skipped: Dict[str, str] = {}
    if "full" in parts:
        why = full_recipe_problem()
        if why:
            print(f"SKIPPING the full fine-tuning comparison: {why}", flush=True)
            for t in ("ours_full", "tt_full_dpo"):
                skipped[t] = why
            tools = [t for t in tools if _runs.TOOLS[t][0] != "full"]
    if not tools:
        print("no run left to make", flush=True)
        return
    assets = uniform_assets(a)
    print(f"assets: {assets['n_params'] / 1e6:.2f}M-parameter Llama, {a.pairs} pairs of {assets['tokens_per_pair']} tokens "
          f"(prompt + chosen + rejected), {a.batch_size * assets['tokens_per_pair']} tokens per step", flush=True)
    results = []
    groups = [[t for t in tools if _runs.TOOLS[t][0] == part] for part in PARTS]
    for rnd in range(a.rounds):
        for group in groups:
            if not group:
                continue
            print(f"[round {rnd}] running {', '.join(group)} in lockstep ...", flush=True)
            for r in _runs.run_group(group, rnd, a, assets):
                results.append(r)
                (a.workdir / "raw_results.json").write_text(json.dumps(results, indent=1))  # partial results survive a crash
                tool = r["tool"]
                if "error" in r:
                    print(f"[round {rnd}] {tool}: FAILED ({r['error']}), log {r['log']}\n{r['log_tail'][-1500:]}", flush=True)
                    if tool == "ours_full":
                        # our full recipe may still be in progress: skip the pair, say why
                        skipped.setdefault("ours_full", f"run failed ({r['error']}), see {r['log']}")
                else:
                    print(f"[round {rnd}] {tool}: median step {r['median_step_s']:.2f}s (CPU {r['median_step_cpu_s']:.2f}s), "
                          f"{a.batch_size * assets['tokens_per_pair'] / r['median_step_s']:.0f} tokens/s, peak RSS {r['peak_rss_gib']:.2f} GiB "
                          f"(training {r['train_peak_rss_gib']:.2f}), wall {r['wall_s']:.0f}s", flush=True)
    summary = summarize(results, assets, a)
    machine["loadavg_end"] = os.getloadavg()[0]
    write_report(summary, ratios(summary), machine, assets, a, {k: v for k, v in skipped.items() if k not in summary}, time.perf_counter() - t_all)
    _runs.print_report(a.out_dir / "results.md", t_all)


if __name__ == "__main__":
    main()
