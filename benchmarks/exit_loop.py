#!/usr/bin/env python
"""How finished runs end: exit codes of many two-process runs in a row, and whether a compiled
run with a cold inductor cache exits by itself. Prints figures; writes nothing in the repo.

    .venv/bin/python benchmarks/exit_loop.py                 # 50 two-process runs (~25 min on 2 cores)
    .venv/bin/python benchmarks/exit_loop.py --runs 5        # fewer
    .venv/bin/python benchmarks/exit_loop.py --runs 0 --compile   # only the compile check

Each run is the README's command, ``tune run --standalone --nproc_per_node 2
recipes/simpo_full_distributed.py --config configs/tiny/simpo_full.yaml``, with the smallest
settings that still go through everything a finished run does: one optimizer step of 2 pairs
per rank, no eval, the end-of-epoch save (resume state and the gathered HF model). Every run
reads its data through the ``datasets`` pipeline with a cold cache (its own, empty
``PREFOPT_CACHE_DIR`` and ``HF_DATASETS_CACHE``): rank 0 parses the JSON Lines with pyarrow's
threads and writes the tokenized Arrow file, both ranks memory-map it -- the case where pyarrow's
pools are alive when the process ends. CPU, gloo, ``OMP_NUM_THREADS=1`` (2 processes on 2 cores),
as tests/test_full_distributed.py runs it.

A run that does not exit 0 is reported with the last lines of its output; core dumps are on
(``ulimit -c``; a core file a crashed rank leaves in the repo root is read, then removed), and the crashing thread's native backtrace (gdb) is
printed when one is found. ``--compile``: one LoRA run (``compile=True``, 2 steps) with
``TORCHINDUCTOR_CACHE_DIR`` a new empty folder and a timeout; its wall time and exit code.
"""

import argparse
import collections
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).with_name("tune"))
SMALL = ["max_steps_per_epoch=1", "batch_size=2", "eval_dataset=null", "eval_every_n_steps=null",
         "save_every_n_steps=null"]


def _env(folder: Path, **extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PREFOPT_CACHE_DIR": str(folder / "cache"),
           "HF_DATASETS_CACHE": str(folder / "hf"), "PYTHONPATH": str(REPO), **extra}
    return env


def _cores_on() -> None:  # in the child, before exec: a crash leaves a core file in its cwd
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _backtrace(core: Path) -> str:
    """The crashing thread's backtrace from a core file (empty without gdb)."""
    if shutil.which("gdb") is None:
        return ""
    out = subprocess.run(["gdb", "-batch", "-ex", "bt 40", sys.executable, str(core)],
                         capture_output=True, text=True, timeout=300).stdout
    return "\n".join(line for line in out.splitlines() if line.startswith("#"))


def two_process_run(folder: Path, timeout: int) -> tuple:
    """(exit code, seconds, output tail, backtraces) of one two-process run in ``folder``."""
    # from the repo root, as the README runs it (`tune run` takes the recipe's path relative to it)
    cmd = [TUNE, "run", "--standalone", "--nproc_per_node", "2", "recipes/simpo_full_distributed.py",
           "--config", "configs/tiny/simpo_full.yaml", f"output_dir={folder / 'out'}", *SMALL]
    cores_before = set(REPO.glob("core*"))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_env(folder), capture_output=True, text=True, timeout=timeout,
                           preexec_fn=_cores_on)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - t0
    traces = []
    for core in sorted(set(REPO.glob("core*")) - cores_before):  # the core of a crashed rank: read, then removed
        traces.append(_backtrace(core))
        core.unlink()
    return code, seconds, out, traces


def loop(runs: int, timeout: int) -> None:
    codes = collections.Counter()
    aborts = collections.Counter()
    times = []
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="prefopt_exit_") as d:
            code, seconds, out, traces = two_process_run(Path(d), timeout)
        codes[code] += 1
        times.append(seconds)
        saved = "Resume state saved" in out and "safetensors" in out
        print(f"run {i + 1:2d}/{runs}: exit {code}  {seconds:5.1f} s" + ("" if saved else "  (no final save in the output)"),
              flush=True)
        for line in out.splitlines():
            if re.search(r"terminate called|Aborted|core dumped|Segmentation|SIGABRT|Signal 6|exitcode", line):
                aborts[line.strip()[:200]] += 1
        if code != 0:
            print("  output tail:\n    " + "\n    ".join(out.strip().splitlines()[-25:]), flush=True)
            for t in traces:
                print("  native backtrace of the crash:\n    " + t.replace("\n", "\n    "), flush=True)
    if runs:
        times.sort()
        print(f"\n{codes[0]} of {runs} two-process runs exited 0; exit codes: {dict(codes)}; "
              f"median {times[len(times) // 2]:.1f} s per run")
        print("abort / crash lines seen: " + (", ".join(f"{k!r} x{v}" for k, v in aborts.items()) or "none"))


def compile_check(timeout: int) -> None:
    with tempfile.TemporaryDirectory(prefix="prefopt_exit_compile_") as d:
        folder = Path(d)
        cmd = [TUNE, "run", "recipes/simpo_lora_single_device.py", "--config", "configs/tiny/simpo_lora.yaml",
               f"output_dir={folder / 'out'}", "compile=True", "max_steps_per_epoch=2", "batch_size=4", "eval_dataset=null", "eval_every_n_steps=null",
               "save_every_n_steps=null"]
        env = _env(folder, TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"))
        env.pop("OMP_NUM_THREADS")  # one process: the default threads, as a user runs it
        env.pop("TORCHINDUCTOR_COMPILE_THREADS", None)  # inductor's own default worker pool
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            code, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            code, out = f"timeout after {timeout} s (killed)", ""
        seconds = time.perf_counter() - t0
        built = sum(1 for _ in (folder / "inductor").rglob("*.py")) if (folder / "inductor").exists() else 0
    print(f"compile=True, cold inductor cache ({built} generated files): exit {code} after {seconds:.1f} s wall")
    if code != 0:
        print("  output tail:\n    " + "\n    ".join(out.strip().splitlines()[-25:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="two-process runs in a row (default 50)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds before a run counts as hung")
    ap.add_argument("--compile", action="store_true", help="also the compile=True run with a cold inductor cache")
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}  "
          f"python {sys.version.split()[0]}", flush=True)
    loop(args.runs, args.timeout)
    if args.compile:
        compile_check(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
