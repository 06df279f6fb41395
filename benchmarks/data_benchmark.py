"""Preference data at scale: first build, cached start, memory, two ranks vs one.

    python benchmarks/data_benchmark.py                 # ~4 min on 2 cores
    python benchmarks/data_benchmark.py --repeat 1      # one first build instead of three

On a seeded UltraFeedback-shaped file (benchmarks/make_pref_data.py, 60,000 rows, written once
to --dir) with prefopt's tiny sentencepiece tokenizer, each figure from a fresh process:

- first build: a fresh `datasets` cache and prefopt cache (JSON -> Arrow conversion included),
  the time from the builder's call to a ready data set; the median of --repeat builds;
- cached start: the same again in a new process, the caches now warm;
- memory added: VmRSS after the build minus VmRSS before it (imports and tokenizer loaded), split
  into anonymous memory and file pages (memory-mapped Arrow); also PSS (shared pages divided
  among the processes mapping them) and after reading every item once;
- two ranks: `torchrun --nproc_per_node 2` (gloo), cold caches: rank 0 builds, rank 1 waits and
  maps rank 0's files; summed memory of both ranks vs one rank's.

Times depend on what else runs: the script prints the load average next to the figures.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "prefopt" / "assets" / "tiny" / "tokenizer.model"


def _mem() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024  # MiB
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _cpu() -> float:
    import resource

    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))


def child(a) -> None:
    """One data-set build in this process; prints one JSON line."""
    t_start = time.perf_counter()
    import torch.distributed as dist
    from torchtune.models.llama2 import llama2_tokenizer

    from prefopt.data import preference_dataset

    if "LOCAL_RANK" in os.environ:
        dist.init_process_group("gloo")
    tok = llama2_tokenizer(str(TOKENIZER), max_seq_len=None, prompt_template=None)
    gc.collect()
    before = _mem()
    t0, cpu0 = time.perf_counter(), _cpu()
    ds = preference_dataset(tok, source="json", data_files=a.data, split="train", max_seq_len=2048, max_prompt_len=1800,
                            num_proc=a.num_proc, cache_dir=a.cache, batch_size=4)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    gc.collect()
    after = _mem()
    res = {"rank": int(os.environ.get("RANK", 0)), "seconds": seconds, "cpu_seconds": cpu, "pairs": len(ds),
           "imports_seconds": t0 - t_start, "before": before, "after": after, "cache": getattr(ds, "cache_info", {}).get("cache"),
           "load": os.getloadavg()}
    if dist.is_initialized():
        dist.barrier()
    if a.read_all:
        n = 0
        for i in range(len(ds)):
            n += len(ds[i]["chosen_input_ids"])
        gc.collect()
        res["after_read"] = _mem()
        res["tokens"] = n
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    print("RESULT " + json.dumps(res), flush=True)


def _run(args, env, nproc=0):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533", *cmd[1:]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    # each rank prints one RESULT line; two ranks' lines can interleave on one line of torchrun's output
    dec, out, i = json.JSONDecoder(), [], p.stdout.find("RESULT ")
    while i >= 0:
        obj, end = dec.raw_decode(p.stdout, i + len("RESULT "))
        out.append(obj)
        i = p.stdout.find("RESULT ", end)
    res = sorted(out, key=lambda r: r["rank"])
    return res, wall


def _added(r, key="after"):
    return {k: r[key][k] - r["before"][k] for k in ("VmRSS", "RssAnon", "RssFile", "Pss") if k in r[key]}, r[key]["VmHWM"] - r["before"]["VmRSS"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--read-all", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="/tmp/prefopt-bench", help="where the data file and the caches go")
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: the cores available)")
    ap.add_argument("--repeat", type=int, default=3, help="first builds to run (the median is reported)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data.json"))
    a = ap.parse_args()
    if a.child:
        return child(a)

    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_pref_data import write

    d = Path(a.dir)
    data = d / f"ufb{a.rows // 1000}k.jsonl"
    if not data.exists():
        print(f"writing {data} ...", flush=True)
        write(data, a.rows)
    np_args = ["--num-proc", str(a.num_proc)] if a.num_proc else []

    def fresh(name):
        for sub in ("hf", "prefopt"):
            shutil.rmtree(d / name / sub, ignore_errors=True)
        env = {**os.environ, "HF_DATASETS_CACHE": str(d / name / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        return env, ["--data", str(data), "--cache", str(d / name / "prefopt"), *np_args]

    out = {"load_before": os.getloadavg(), "cpus": len(os.sched_getaffinity(0)), "rows": a.rows, "file_mb": data.stat().st_size / 2**20}
    # Several first builds (fresh caches each): this machine's speed varies by a few seconds
    # from one minute to the next; the median is the figure, all of them are kept.
    builds = []
    for _ in range(a.repeat):
        env, args = fresh("one")
        (r,), _ = _run(args, env)
        builds.append(r)
        print(f"first build: {r['seconds']:.1f} s, {r['cpu_seconds']:.1f} CPU-s ({r['cache']}), RSS added {_added(r)[0]}, peak {_added(r)[1]:.0f}", flush=True)
    out["first_builds"] = [{"seconds": b["seconds"], "cpu_seconds": b["cpu_seconds"], "load": b["load"]} for b in builds]
    out["first_build"] = r = sorted(builds, key=lambda b: b["seconds"])[len(builds) // 2]
    every = ", ".join(f"{b['seconds']:.1f}" for b in builds)
    print(f"first build, median of {len(builds)}: {r['seconds']:.1f} s (all: {every})", flush=True)
    (r,), _ = _run([*args, "--read-all"], env)
    out["cached_start"] = r
    print(f"cached start: {r['seconds']:.2f} s after {r['imports_seconds']:.1f} s of imports ({r['cache']}), RSS added {_added(r)[0]}, after reading every item {_added(r, 'after_read')[0]}", flush=True)
    env, args = fresh("two")
    rs, wall = _run(args, env, nproc=2)
    out["two_ranks_cold"] = rs
    print(f"two ranks, cold: {[round(x['seconds'], 1) for x in rs]} s ({[x['cache'] for x in rs]}); "
          f"RSS added {[round(_added(x)[0]['VmRSS']) for x in rs]} MiB, PSS added {[round(_added(x)[0].get('Pss', 0)) for x in rs]}", flush=True)
    rs, wall = _run([*args, "--read-all"], env, nproc=2)
    out["two_ranks_cached"] = rs
    print(f"two ranks, cached, every item read: RSS added {[round(_added(x, 'after_read')[0]['VmRSS']) for x in rs]}, "
          f"PSS added {[round(_added(x, 'after_read')[0].get('Pss', 0)) for x in rs]} MiB", flush=True)
    out["load_after"] = os.getloadavg()
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"load average {out['load_before']} -> {out['load_after']}; wrote {a.out}")


if __name__ == "__main__":
    main()
