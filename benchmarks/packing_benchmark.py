#!/usr/bin/env python
"""Our packed layout vs our padded one vs TRL, on data with realistic length distributions.

    .venv/bin/python benchmarks/packing_benchmark.py                  # the three data sets (~20 min)
    .venv/bin/python benchmarks/packing_benchmark.py --data long_prompt --tools ours_lora,trl_cpo

One lockstep group per data set (--data; default all three), the runs of a group interleaved
step by step as in peers_benchmark.py (see benchmarks/_runs.py):

    ours_lora        tune run recipes/simpo_lora_single_device.py (packed: True, the recipes'
                     default: [prompt][chosen][rejected] once)
    ours_lora_padded ours_lora with packed: False (2b right-padded rows, prompt computed twice)
    trl_cpo          TRL CPOTrainer loss_type=simpo cpo_alpha=0, peft LoRA (benchmarks/_trl_cpo.py)

  uniform        every pair --prompt-len / --response-len words
  ultrafeedback  pair length log-normal, median ~400 tokens, tail to --max-pair-len (2,048);
                 prompt / mean response ~0.4
  long_prompt    summarisation-like: median ~700 tokens, prompt / mean response >= 4 (median ~6),
                 a short answer after a long prompt

Default shape: --shape decoder (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000: the
decoder, not the output layer, is most of the step). Pairs vary in length, so every tool reads
the same pairs in the same order (ours: shuffle: False; TRL: a SequentialSampler), and each tool's
consumed rows are recorded and checked against file order. tokens/s = prompt + chosen + rejected
tokens of the pairs of the measured steps (counted from the data file with the tokenizer) / the
SUM of those steps' times (not a median: steps differ in length, a long step must weigh more).
Writes benchmarks/results/packing.md and packing.json.
"""

import argparse
import json
import math
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

PACKING_TOOLS = ("ours_lora", "ours_lora_padded", "trl_cpo")
# per data set: (ours, peer, min tokens/s ratio, max peak-memory ratio); the targets, on
# the decoder shape. uniform has none: it is the reference point (no padding, prompt half of each
# sequence).
PACKING_TARGETS = {
    "ultrafeedback": [("ours_lora", "ours_lora_padded", 1.3, 1.0), ("ours_lora", "trl_cpo", 2.0, 0.6)],
    "long_prompt": [("ours_lora", "ours_lora_padded", 1.7, 1.0), ("ours_lora", "trl_cpo", 2.5, 0.6)],
    "uniform": [("ours_lora", "ours_lora_padded", None, None), ("ours_lora", "trl_cpo", None, None)],
}
DATASETS = ("uniform", "ultrafeedback", "long_prompt")
# Length models of the variable-length sets. Pair length T = prompt + chosen + rejected tokens
# (BOS and both EOS included), log-normal with this median (tokens) and sigma (of ln T), cut at
# --max-pair-len: sigma puts 2,048 at about the 99.7th (ultrafeedback) / 99.2th (long_prompt)
# percentile. ratio = prompt / mean response length, log-normal too, at least ratio_min. chosen
# and rejected split the response tokens by a factor exp(+-d), d ~ N(0, split_sigma), either side
# the longer one.
LENGTH_MODELS = {
    # UltraFeedback-binarized-like: short instructions, long answers
    "ultrafeedback": dict(median=400, sigma=0.6, ratio=0.4, ratio_sigma=0.6, ratio_min=0.02, split_sigma=0.3),
    # summarisation / long context + short final answer
    "long_prompt": dict(median=700, sigma=0.45, ratio=6.0, ratio_sigma=0.3, ratio_min=4.0, split_sigma=0.3),
}


# ------------------------------------------------------------------------------------------------
# data


def variable_lengths(name: str, n_warmup: int, n_measured: int, a, rng: random.Random) -> List[tuple]:
    """(prompt, chosen, rejected) word counts of the pairs of a LENGTH_MODELS set, in file order.

    A run consumes only a few pairs (steps x batch), so they are drawn stratified, not at random:
    the warm-up pairs and the measured pairs are each a Latin-hypercube sample of the distribution
    (pair-length quantiles (i + 0.5) / n, ratio quantiles the same, independently permuted), in a
    seeded order. A plain random draw of a dozen pairs would make the result depend on the seed's
    luck (one 2,000-token pair more or less changes a step several fold)."""
    m = LENGTH_MODELS[name]
    nd = statistics.NormalDist()
    out = []
    for n in (n_warmup, n_measured):
        q_len = [(i + 0.5) / n for i in range(n)]
        q_ratio = q_len[:]
        rng.shuffle(q_len)
        rng.shuffle(q_ratio)
        for u, v in zip(q_len, q_ratio):
            t = m["median"] * a.length_scale * math.exp(m["sigma"] * nd.inv_cdf(u))
            t = int(round(min(max(t, 9), a.max_pair_len)))  # tokens, BOS + 2 EOS included
            ratio = max(m["ratio_min"], m["ratio"] * math.exp(m["ratio_sigma"] * nd.inv_cdf(v)))
            # in tokens (prompt + BOS, responses + EOS), as the report counts them: prompt = ratio x
            # mean response, rounded up where it must stay >= ratio_min
            pt = max(2, round(t * ratio / (ratio + 2)), math.ceil(t * m["ratio_min"] / (m["ratio_min"] + 2)))
            resp = max(4, t - pt)
            share = 1 / (1 + math.exp(-2 * rng.gauss(0, m["split_sigma"])))  # chosen / (chosen + rejected)
            ct = min(resp - 2, max(2, round(resp * share)))
            out.append((pt - 1, ct - 1, resp - ct - 1))  # words
    return out


def dataset_assets(a, name: str) -> Dict[str, Any]:
    """The model and data set `name` (DATASETS): exactly the pairs the runs consume (steps x
    batch), in the order they consume them; seeded, reused if the spec is unchanged."""
    vocab = a.model_shape["vocab_size"]
    n, n_warm = a.steps * a.batch_size, a.warmup * a.batch_size
    spec = {"vocab": vocab, "name": name, "pairs": n, "warmup_pairs": n_warm, "seed": a.seed, "v": 2,
            **({"prompt_len": a.prompt_len, "response_len": a.response_len} if name == "uniform"
               else {"model": LENGTH_MODELS[name], "length_scale": a.length_scale, "max_pair_len": a.max_pair_len})}
    if name == "uniform":
        rng = random.Random(a.seed)
        lengths = [(a.prompt_len, a.response_len, a.response_len)] * n
    else:
        rng = random.Random(f"{a.seed}:{name}")
        lengths = variable_lengths(name, n_warm, n - n_warm, a, rng)
    data_file = _runs.write_data(a.workdir / "data" / f"{name}.jsonl", spec, lengths, rng, vocab)
    assets = _runs.make_assets(a, data_file, name, in_order=True)
    longest = max(p["prompt"] + p["chosen"] + p["rejected"] for p in assets["pairs"])
    if longest > a.model_shape["max_seq_len"]:
        raise RuntimeError(f"a pair of {longest} tokens: a packed row would exceed the model's max_seq_len "
                           f"{a.model_shape['max_seq_len']} (lower --max-pair-len)")
    return assets


def layout_stats(assets, a) -> Optional[List[Dict[str, Any]]]:
    """Per step: the positions each layout computes (benchmarks/_layout_stats.py, a child process)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(a.workdir / "hf_datasets_cache"))
    cmd = [sys.executable, str(_runs.BENCH / "_layout_stats.py"), str(assets["data_file"]), str(a.batch_size), str(a.steps),
           str(a.model_shape["vocab_size"])]
    p = subprocess.run(cmd, cwd=_runs.REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"WARNING: layout statistics failed:\n{p.stderr[-2000:]}", flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def step_rows(a, k: int) -> List[int]:
    """The file rows of step k when the pairs are read in file order."""
    return list(range(k * a.batch_size, (k + 1) * a.batch_size))


def data_stats(assets, a) -> Dict[str, Any]:
    pairs = assets["pairs"]
    totals = [p["prompt"] + p["chosen"] + p["rejected"] for p in pairs]
    ratios_ = [p["prompt"] / ((p["chosen"] + p["rejected"]) / 2) for p in pairs]
    measured = [i for k in range(a.warmup, a.steps) for i in step_rows(a, k)]
    return {
        "pairs": len(pairs),
        "step_tokens": [sum(totals[i] for i in step_rows(a, k)) for k in range(a.steps)],
        "pair_len_median": statistics.median(totals[i] for i in measured),
        "pair_len_min": min(totals[i] for i in measured),
        "pair_len_max": max(totals[i] for i in measured),
        "ratio_median": statistics.median(ratios_[i] for i in measured),
        "ratio_min": min(ratios_[i] for i in measured),
        "ratio_max": max(ratios_[i] for i in measured),
        "all_pair_len_max": max(totals),
    }


def check_order(r: Dict[str, Any], assets, a) -> Optional[str]:
    """Why run r did not run on the pairs and tokens the report counts (None if it did): its
    consumed rows must be file order's, and TRL's tokenization the counted lengths."""
    got = r.get("rows_consumed")
    if got is None:
        return "its consumed rows were not recorded"
    want = [step_rows(a, k) for k in range(a.steps)]
    if [list(x) for x in got[: a.steps]] != want:
        return f"not the file order: consumed rows {got[: a.steps]}, file order is {want}"
    if r["tool"] == "trl_cpo":
        counted = [[p["prompt"], p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]] for p in assets["pairs"]]
        if r.get("trl_tokens") != counted:
            bad = [i for i, (x, y) in enumerate(zip(r.get("trl_tokens") or [], counted)) if x != y]
            return f"TRL's token counts (prompt, prompt + chosen, prompt + rejected) differ from the counted ones, rows {bad[:5] or '?'}"
    return None


# ------------------------------------------------------------------------------------------------
# reporting


def summarize(results: List[Dict[str, Any]], dstats: Dict[str, Dict[str, Any]], a) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per data set and tool: tokens/s = tokens of all measured steps (all rounds) / their summed time."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name in a.data:
        measured_tokens = dstats[name]["step_tokens"][a.warmup:]
        out[name] = {}
        for tool in a.packing_tools:
            rs = [r for r in results if r["data"] == name and r["tool"] == tool]
            if not rs:
                continue
            ok = [r for r in rs if "error" not in r]
            s: Dict[str, Any] = {"tool": tool, "label": _runs.TOOLS[tool][1], "runs": len(rs), "ok_runs": len(ok)}
            if not ok:
                s["error"] = rs[0].get("error")
                out[name][tool] = s
                continue
            tok = sum(measured_tokens) * len(ok)
            s["tokens"] = tok
            s["step_s"] = [r["step_s"] for r in ok]  # per round, per measured step
            s["step_cpu_s"] = [r["step_cpu_s"] for r in ok]
            s["sum_step_s"] = sum(sum(x) for x in s["step_s"])
            s["tokens_per_s"] = tok / s["sum_step_s"]
            s["tokens_per_cpu_s"] = tok / sum(sum(x) for x in s["step_cpu_s"])
            s["round_tokens_per_s"] = [sum(measured_tokens) / sum(x) for x in s["step_s"]]
            # each step's own tokens/s: the spread over steps of different length
            s["step_tokens_per_s"] = [[t / d for t, d in zip(measured_tokens, x)] for x in s["step_s"]]
            s["peak_rss_gib"] = statistics.median(r["peak_rss_gib"] for r in ok)
            s["train_peak_rss_gib"] = statistics.median(r["train_peak_rss_gib"] for r in ok)
            s["startup_s"] = statistics.median(r["startup_s"] for r in ok)
            s["prefopt_file"] = sorted({r["prefopt_file"] for r in ok if "prefopt_file" in r})
            out[name][tool] = s
    return out


def ratios(summary) -> Dict[str, List[Dict[str, Any]]]:
    rows: Dict[str, List[Dict[str, Any]]] = {}
    for name, by_tool in summary.items():
        rows[name] = []
        for ours, peer, tps_min, mem_max in PACKING_TARGETS[name]:
            if ours not in by_tool or peer not in by_tool:
                continue
            o, p = by_tool[ours], by_tool[peer]
            if "tokens_per_s" not in o or "tokens_per_s" not in p:
                rows[name].append({"ours": ours, "peer": peer, "skipped": o.get("error") or p.get("error")})
                continue
            tps = o["tokens_per_s"] / p["tokens_per_s"]
            mem = o["peak_rss_gib"] / p["peak_rss_gib"]
            rows[name].append({
                "ours": ours, "peer": peer, "tps_ratio": tps, "tps_target": tps_min, "mem_ratio": mem, "mem_target": mem_max,
                "tps_met": None if tps_min is None else tps >= tps_min, "mem_met": None if mem_max is None else mem <= mem_max,
                "cpu_ratio": o["tokens_per_cpu_s"] / p["tokens_per_cpu_s"],
                "train_mem_ratio": o["train_peak_rss_gib"] / p["train_peak_rss_gib"],
                # the same pairs in both: peer's time / ours, step by step (first round)
                "step_ratios": [y / x for x, y in zip(o["step_s"][0], p["step_s"][0])],
            })
    return rows


def _met(ok: Optional[bool]) -> str:
    return "no target" if ok is None else ("met" if ok else "**MISSED**")


def write_report(summary, rat, dstats, layouts, machine, n_params, a, wall_s: float) -> None:
    L = ["# Packed vs padded layout vs TRL on realistic length distributions\n"]
    L.append(f"- **Date**: {machine['date']}  ")
    L.append(f"- **Machine**: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB RAM, no GPU; "
             f"torch {machine.get('torch')} ({machine.get('torch_threads')} threads), torchtune {machine.get('torchtune')}, "
             f"transformers {machine.get('transformers')}, TRL {machine.get('trl')}, peft {machine.get('peft')}; "
             f"load average {machine['loadavg_start']:.1f} at start, {machine['loadavg_end']:.1f} at end  ")
    L.append(f"- **Command**: `{a.cmdline}` ({wall_s / 60:.1f} min)  ")
    L.append(f"- **Model** (--shape {a.shape}): HF Llama, {n_params / 1e6:.1f}M parameters ({shape_words(a.model_shape)}), fp32; "
             f"LoRA r{LORA['lora_rank']}/alpha {LORA['lora_alpha']} on q_proj, v_proj in all three runs  ")
    L.append(f"- **Runs**: {', '.join(f'{t} = {_runs.TOOLS[t][1]}' for t in a.packing_tools)}  ")
    L.append(f"- **Steps**: batch {a.batch_size} pairs, {a.steps} steps per run, the first {a.warmup} dropped as warm-up, "
             f"{a.rounds} round(s); the runs of a data set in lockstep, one step of one run at a time, rotating order  ")
    L.append("- **Order**: every run reads the pairs in file order (ours: shuffle: False; TRL: a SequentialSampler); each "
             "run recorded the rows it consumed per step, checked against file order (a run that differs is reported "
             "failed, not compared)  ")
    L.append("- **tokens/s** = prompt + chosen + rejected tokens (BOS/EOS included) of the pairs of the measured steps, "
             "counted from the data file with the tokenizer, / the SUM of those steps' times (step = release after step "
             "i-1 to the end of optimizer step i). The prompt tokens the packed layout computes once count as work done, "
             "as in the padded layouts. tokens per CPU-s: the same over user + system CPU time (less exposed to other users "
             "of the machine)  ")
    L.append("- **Peak RSS** = the whole process's ru_maxrss (os.wait4); 'in training' = ru_maxrss at the last step  ")
    files = sorted({f for by_tool in summary.values() for s in by_tool.values() for f in s.get("prefopt_file", [])})
    L.append(f"- **prefopt imported from**: {', '.join(files) or 'not recorded'}  ")
    L.append(f"- **Data**: generated from seed {a.seed}, pair lengths capped at {a.max_pair_len} tokens"
             + (f", medians scaled by {a.length_scale}" if a.length_scale != 1 else "")
             + "; warm-up and measured pairs each a stratified (Latin-hypercube) sample of the length distribution "
             "(packing_benchmark.variable_lengths)\n")
    for name in a.data:
        d = dstats[name]
        L.append(f"## {name}\n")
        desc = {"uniform": f"every pair: prompt {a.prompt_len}+1, responses {a.response_len}+1 tokens",
                "ultrafeedback": "UltraFeedback-like: pair length log-normal (median {median}, sigma {sigma}), prompt / mean response log-normal (median {ratio})",
                "long_prompt": "long prompt, short answer: pair length log-normal (median {median}, sigma {sigma}), prompt / mean response >= {ratio_min} (median {ratio})"}[name]
        if name in LENGTH_MODELS:
            desc = desc.format(**{k: (round(v * a.length_scale) if k == "median" else v) for k, v in LENGTH_MODELS[name].items()})
        L.append(f"{desc}. Measured pairs: length median {d['pair_len_median']:.0f} tokens (min {d['pair_len_min']}, max "
                 f"{d['pair_len_max']}), prompt / mean response median {d['ratio_median']:.2f} ({d['ratio_min']:.2f}-{d['ratio_max']:.2f}); "
                 f"tokens per step (warm-up first): {', '.join(map(str, d['step_tokens']))}.\n")
        L.append("| run | measured step times (s) | tokens/s | tokens per CPU-s | peak RSS (GiB) | peak RSS in training (GiB) | start-up + step 1 (s) |")
        L.append("|---|---|---:|---:|---:|---:|---:|")
        for tool in a.packing_tools:
            s = summary[name].get(tool)
            if s is None:
                continue
            if "tokens_per_s" not in s:
                L.append(f"| {s['label']} | failed: {s.get('error')} | | | | | |")
                continue
            times = " / ".join(", ".join(f"{x:.1f}" for x in rnd) for rnd in s["step_s"])
            L.append(f"| {s['label']} | {times} | {s['tokens_per_s']:.0f} | {s['tokens_per_cpu_s']:.0f} | {s['peak_rss_gib']:.2f} | "
                     f"{s['train_peak_rss_gib']:.2f} | {s['startup_s']:.0f} |")
        L.append("")
        L.append("| ours vs peer | tokens/s ratio (target) | CPU-time ratio | per-step time ratios | peak RSS ratio (target) | training-peak ratio | tokens/s | memory |")
        L.append("|---|---:|---:|---|---:|---:|---|---|")
        for r in rat.get(name, []):
            if "skipped" in r:
                L.append(f"| {r['ours']} vs {r['peer']} | n/a | | | n/a | | not measured: {r['skipped']} | |")
                continue
            tt = f" (>= {r['tps_target']}x)" if r["tps_target"] is not None else ""
            mt = f" (<= {r['mem_target']}x)" if r["mem_target"] is not None else ""
            L.append(f"| {r['ours']} vs {r['peer']} | **{r['tps_ratio']:.2f}x**{tt} | {r['cpu_ratio']:.2f}x | "
                     f"{', '.join(f'{x:.2f}' for x in r['step_ratios'])} | **{r['mem_ratio']:.2f}x**{mt} | {r['train_mem_ratio']:.2f}x | "
                     f"{_met(r['tps_met'])} | {_met(r['mem_met'])} |")
        L.append("")
        lay = layouts.get(name)
        if lay:
            L.append("What each layout computes per step (benchmarks/_layout_stats.py: our collates on the data; TRL pads "
                     "like our padded layout and computes logits at every position). positions = rows x row length through "
                     "the decoder, padding included; output = positions through the output layer; attention = sum of "
                     "row length^2.\n")
            L.append("| step | tokens (prompt once) | packed: rows x len (padding) | padded / TRL: rows x len (padding) | padded / packed positions | output: ours / TRL | attention: padded / packed |")
            L.append("|---|---:|---|---|---:|---|---:|")
            for k, st in enumerate(lay):
                pk, pd, tr = st["packed"], st["padded"], st["trl"]
                L.append(f"| {k}{' (warm-up)' if k < a.warmup else ''} | {st['real_tokens']} | {pk['rows']} x {pk['row_len']} "
                         f"({1 - st['real_tokens'] / pk['positions']:.0%}) | {pd['rows']} x {pd['row_len']} "
                         f"({1 - st['sequence_tokens'] / pd['positions']:.0%}) | {pd['positions'] / pk['positions']:.2f}x | "
                         f"{pk['output_positions']} / {tr['output_positions']} | {pd['attention'] / pk['attention']:.2f}x |")
            m = lay[a.warmup:]
            tot = {k: sum(st["packed"][k] for st in m) for k in ("positions", "attention", "output_positions")}
            totp = {k: sum(st["padded"][k] for st in m) for k in ("positions", "attention")}
            tott = sum(st["trl"]["output_positions"] for st in m)
            L.append(f"| measured | {sum(st['real_tokens'] for st in m)} | {tot['positions']} positions | {totp['positions']} positions | "
                     f"**{totp['positions'] / tot['positions']:.2f}x** | {tot['output_positions']} / {tott} "
                     f"({tott / tot['output_positions']:.1f}x) | {totp['attention'] / tot['attention']:.2f}x |")
            L.append("")
            missed = [r for r in rat.get(name, []) if r.get("tps_met") is False]
            for r in missed:
                pos = totp["positions"] / tot["positions"]
                L.append(f"- {r['ours']} vs {r['peer']} missed ({r['tps_ratio']:.2f}x) although the padded layouts run the decoder "
                         f"on {pos:.2f}x the positions of the packed one" +
                         (f" and TRL the output layer on {tott / tot['output_positions']:.1f}x ours" if r["peer"] == "trl_cpo" else "") +
                         f". Where the time goes, op by op, packed vs padded on one step's pairs: `benchmarks/profile_packing.py "
                         f"--data {a.workdir / 'data' / (name + '.jsonl')} --batch-size {a.batch_size} --step {a.warmup}`.")
            if missed:
                L.append("")
    L.append(f"Raw numbers: {a.out_dir / 'packing.json'}; logs, configs and recorded rows: {a.workdir}/runs/<data set>/.")
    (a.out_dir / "packing.md").write_text("\n".join(L) + "\n")
    (a.out_dir / "packing.json").write_text(json.dumps({
        "machine": machine, "summary": summary, "ratios": rat, "data": dstats, "layouts": layouts,
        "targets": {k: v for k, v in PACKING_TARGETS.items() if k in a.data}, "shape": a.model_shape,
        "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))


# ------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a decoder-shape step takes ~20-30 CPU-s per 1,000 tokens on 2 cores, so batch 2 x 4 steps
    # keeps the three data sets x three runs at ~20 min on a quiet machine (batch 4: about twice that)
    _runs.add_run_args(p, shape="decoder", rounds=1, steps=4, batch_size=2)
    p.add_argument("--tools", default=None, help="comma list: only these runs (" + ", ".join(PACKING_TOOLS) + ")")
    p.add_argument("--data", default=",".join(DATASETS), help="comma list of " + ", ".join(DATASETS) + " (default: all)")
    p.add_argument("--max-pair-len", type=int, default=2048, help="cap on a pair's prompt + chosen + rejected tokens")
    p.add_argument("--length-scale", type=float, default=1.0, help="scale the length models' medians (quick runs)")
    a = p.parse_args()
    a.data = a.data.split(",")
    if set(a.data) - set(DATASETS):
        p.error(f"--data: unknown {sorted(set(a.data) - set(DATASETS))}")
    _runs.check_run_args(p, a, "packing_benchmark.py")
    if a.max_pair_len > a.model_shape["max_seq_len"]:
        p.error(f"--max-pair-len {a.max_pair_len} exceeds the {a.shape} shape's max_seq_len {a.model_shape['max_seq_len']}")
    a.packing_tools = [t for t in PACKING_TOOLS if a.tools is None or t in a.tools.split(",")]
    t_all = time.perf_counter()
    machine = _runs.machine_info()
    print(f"machine: {machine}", flush=True)

    results: List[Dict[str, Any]] = []
    dstats: Dict[str, Dict[str, Any]] = {}
    layouts: Dict[str, Any] = {}
    n_params = None
    for name in a.data:
        assets = dataset_assets(a, name)
        n_params = assets["n_params"]
        dstats[name] = data_stats(assets, a)
        layouts[name] = layout_stats(assets, a)
        d = dstats[name]
        print(f"[{name}] {d['pairs']} pairs, measured: pair length median {d['pair_len_median']:.0f} "
              f"({d['pair_len_min']}-{d['pair_len_max']}) tokens, prompt/response {d['ratio_median']:.2f}; tokens per step "
              f"{d['step_tokens']}", flush=True)
        for rnd in range(a.rounds):
            print(f"[{name}, round {rnd}] running {', '.join(a.packing_tools)} in lockstep ...", flush=True)
            for r in _runs.run_group(list(a.packing_tools), rnd, a, assets):
                r["data"] = name
                if "error" not in r:
                    why = check_order(r, assets, a)
                    if why:  # not the work the others did: its tokens/s would compare unlike work
                        r["error"] = why
                results.append(r)
                (a.workdir / "raw_results_packing.json").write_text(json.dumps(results, indent=1))
                if "error" in r:
                    print(f"[{name}, round {rnd}] {r['tool']}: FAILED ({r['error']}), log {r['log']}\n{r.get('log_tail', '')[-1500:]}", flush=True)
                else:
                    tok = sum(d["step_tokens"][a.warmup:])
                    print(f"[{name}, round {rnd}] {r['tool']}: steps {', '.join(f'{x:.1f}' for x in r['step_s'])} s, "
                          f"{tok / sum(r['step_s']):.0f} tokens/s, peak RSS {r['peak_rss_gib']:.2f} GiB, prefopt "
                          f"{r.get('prefopt_file', '-')}, wall {r['wall_s']:.0f}s", flush=True)
    summary = summarize(results, dstats, a)
    machine["loadavg_end"] = os.getloadavg()[0]
    write_report(summary, ratios(summary), dstats, layouts, machine, n_params, a, time.perf_counter() - t_all)
    _runs.print_report(a.out_dir / "packing.md", t_all)


if __name__ == "__main__":
    main()
