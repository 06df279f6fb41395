"""Run a training command in this process with a clock on every optimizer step.

    python -m benchmarks._stepclock --out steps.json -- tune run <recipe> --config <yaml> [k=v ...]
    python -m benchmarks._stepclock --out steps.json -- script <path.py> [args ...]

A global ``torch.optim`` step post-hook (``register_optimizer_step_post_hook``) records, after
every optimizer step of any optimizer, ``time.perf_counter()``, the process's CPU time (user +
system, all threads: less sensitive to other users of a shared machine than wall time) and its
peak RSS so far (``ru_maxrss``). The same hook measures every tool the same way, whatever each one logs:
the time between two consecutive optimizer-step ends is one whole training step (data loading,
forward(s), backward, optimizer, the tool's own logging), and start-up and the final checkpoint
save fall outside it. ``tune run`` is torchtune's own CLI entry point, run in this process (for a
single-device launch ``tune run`` itself runs the recipe in-process with runpy).
"""

import argparse
import atexit
import gc
import json
import os
import resource
import runpy
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_T_START = time.perf_counter()
_STEPS = []  # (perf_counter, process CPU time, ru_maxrss KiB) after each optimizer step
_GO = []  # (perf_counter, process CPU time) when the run was let go on after each step (lockstep)
_OUT = None
_ROWS = []  # --record-rows: the source rows of each micro-batch our recipes' step ran on
_ROWS_OUT = None
# Lockstep (set by benchmarks/_runs.py): after each optimizer step, report on STATUS_FD and wait for
# one byte on CTRL_FD before going on, so that the launcher can run the steps of several runs
# one at a time, A B C A B C ..., each on an otherwise idle (by us) machine.
_CTRL_FD = int(os.environ["STEPCLOCK_CTRL_FD"]) if "STEPCLOCK_CTRL_FD" in os.environ else None
_STATUS_FD = int(os.environ["STEPCLOCK_STATUS_FD"]) if "STEPCLOCK_STATUS_FD" in os.environ else None


def _hook(optimizer, args, kwargs):
    _STEPS.append((time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    if _CTRL_FD is not None:
        try:
            os.write(_STATUS_FD, f"{len(_STEPS)}\n".encode())
            go = os.read(_CTRL_FD, 1)
        except OSError:  # launcher gone
            go = b""
        if not go:  # launcher gone or done with us: run free to the end
            globals()["_CTRL_FD"] = None
        _GO.append((time.perf_counter(), time.process_time()))


def _write():
    if _ROWS_OUT is not None:
        with open(_ROWS_OUT, "w") as f:
            json.dump(_ROWS, f)
    if _OUT is None:
        return
    with open(_OUT, "w") as f:
        json.dump(
            {
                "t_start": _T_START,
                "t_end": time.perf_counter(),
                "step_end_times": [t for t, _, _ in _STEPS],
                "step_end_cpu_times": [c for _, c, _ in _STEPS],  # user + system, all threads
                # lockstep only: when the run went on after each step (the next step starts here)
                "step_go_times": [t for t, _ in _GO],
                "step_go_cpu_times": [c for _, c in _GO],
                "maxrss_kib_at_steps": [r for _, _, r in _STEPS],
                "maxrss_kib_at_exit": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "torch_num_threads": torch.get_num_threads(),
                "argv": sys.argv,
            },
            f,
        )


def _install_cpu_shims() -> None:
    import torch.distributed as dist
    import torchtune.training

    _init = dist.init_process_group

    def _init_gloo(backend=None, *args, **kwargs):
        if backend is not None and "nccl" in str(backend):
            backend = "gloo"
        return _init(backend, *args, **kwargs)

    _get = torchtune.training.get_memory_stats

    def _get_memory_stats(device, reset_stats=True):
        if torch.device(device).type != "cpu":
            return _get(device, reset_stats)
        gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"peak_memory_active": gib, "peak_memory_alloc": gib, "peak_memory_reserved": gib}

    dist.init_process_group = _init_gloo
    torchtune.training.get_memory_stats = _get_memory_stats
    _cleanup = torchtune.training.cleanup_before_training

    def _cleanup_before_training():
        if torch.cuda.is_available():
            return _cleanup()
        gc.collect()

    torchtune.training.cleanup_before_training = _cleanup_before_training


def _record_rows() -> None:
    """Wrap prefopt.step.preference_forward (both of our recipes' one call per micro-batch, either
    layout) to note ``batch["rows"]``: which pairs each step really consumed, in which order. The
    recipe binds the name when it is imported, after this."""
    import prefopt
    import prefopt.step

    # the benchmark must measure the checkout it runs from, not another install of prefopt
    print(f"stepclock: prefopt from {prefopt.__file__}", flush=True)
    forward = prefopt.step.preference_forward

    def recording_forward(model, batch, *args, **kwargs):
        _ROWS.append(batch["rows"].tolist())
        return forward(model, batch, *args, **kwargs)

    prefopt.step.preference_forward = recording_forward


def main() -> None:
    global _OUT, _ROWS_OUT
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before the run")
    p.add_argument(
        "--cpu-shims",
        action="store_true",
        help="let torchtune 0.6.1's full_dpo_distributed start on a CPU-only torch: (1) an "
        "init_process_group backend naming nccl becomes gloo (it asks for 'cuda:nccl,cpu:gloo', which a "
        "CPU build rejects); (2) torchtune.training.get_memory_stats, which it calls unconditionally at "
        "set-up and which raises on CPU, returns the process's peak RSS instead; (3) "
        "torchtune.training.cleanup_before_training (gc + torch.cpu.empty_cache/reset_peak_memory_stats, which "
        "torch.cpu lacks) is gc.collect() only. None of them touches the training step.",
    )
    p.add_argument("--record-rows", default=None, help="write the source rows of every micro-batch of our recipes here (JSON)")
    opts = p.parse_args(argv[:split])
    cmd = argv[split + 1 :]
    _OUT = opts.out
    if opts.record_rows:
        _ROWS_OUT = opts.record_rows
        _record_rows()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.cpu_shims and not torch.cuda.is_available():
        _install_cpu_shims()
    register_optimizer_step_post_hook(_hook)
    atexit.register(_write)
    if cmd[:2] == ["tune", "run"]:
        from torchtune._cli.tune import main as tune_main

        sys.argv = ["tune"] + cmd[1:]
        tune_main()
    elif cmd[0] == "script":
        sys.argv = cmd[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(cmd[1])))
        runpy.run_path(cmd[1], run_name="__main__")
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
