"""The measured runs of peers_benchmark.py and packing_benchmark.py: the tools, their data and
configs, and the lockstep that interleaves their steps.

Each run is a subprocess under benchmarks/_stepclock.py: a global optimizer-step hook stamps the
end of every optimizer step and then blocks until the launcher lets the run go on. The runs of a
group start together; once all have taken their warm-up step(s), the launcher releases one run
for one step at a time, so a measured step never overlaps another measured run's work, and a
burst of load from other users of the machine lands on all tools alike instead of on whole runs.
Step time = from the release after step i-1 to the end of step i (data loading, forward(s),
backward, optimizer, the tool's own logging; start-up and the final save excluded). Peak memory
= the subprocess's peak RSS (os.wait4's ru_maxrss).

The launcher never imports torch (see _make_model.py): a child inherits its peak RSS.
"""

import argparse
import datetime as _dt
import json
import os
import platform
import random
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._make_model import HF_LORA_TARGETS, LORA, SHAPES, count_params, make_model  # noqa: E402
from benchmarks.wordtok import FIRST_WORD_ID, WordTokenizer, words  # noqa: E402

TOOLS = {
    # name: (part, label)
    "ours_lora": ("lora", "ours: simpo_lora_single_device (SimPO)"),
    "tt_lora_dpo": ("lora", "torchtune 0.6.1 lora_dpo_single_device (DPO)"),
    "trl_cpo": ("lora", "TRL CPOTrainer, CPO-SimPO + peft LoRA"),
    "ours_full": ("full", "ours: simpo_full_distributed, 1 process (SimPO)"),
    "tt_full_dpo": ("full", "torchtune 0.6.1 full_dpo_distributed, 1 process (DPO)"),
    # only in packing_benchmark.py (with ours_lora and trl_cpo)
    "ours_lora_padded": ("packing", "ours: simpo_lora_single_device, packed: False (padded)"),
}


# ------------------------------------------------------------------------------------------------
# command line


def add_run_args(p: argparse.ArgumentParser, *, shape: str, rounds: int, steps: int, batch_size: int) -> None:
    """The options both launchers take, with the given defaults."""
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prefopt_bench"))
    p.add_argument("--out-dir", type=Path, default=BENCH / "results", help="where the results go (default: benchmarks/results/)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=shape, help=f"model shape (default: {shape})")
    p.add_argument("--rounds", type=int, default=rounds, help=f"rounds of fresh processes (default {rounds})")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run, warm-up included (default {steps})")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"pairs per step (default {batch_size})")
    p.add_argument("--prompt-len", type=int, default=190)
    p.add_argument("--response-len", type=int, default=190)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every run (default: torch's)")
    p.add_argument("--run-timeout", type=int, default=600)


def check_run_args(p: argparse.ArgumentParser, a: argparse.Namespace, script: str) -> None:
    """Validate the common options, make the folders, note the command line for the report."""
    if a.steps <= a.warmup + 1:
        p.error("--steps must exceed --warmup + 1")
    a.model_shape = SHAPES[a.shape]
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    a.cmdline = " ".join([".venv/bin/python", f"benchmarks/{script}"] + sys.argv[1:])


def print_report(report: Path, t_all: float) -> None:
    """Print the report a launcher wrote and its total wall time since ``t_all``."""
    print(report.read_text(), flush=True)
    print(f"total wall time {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)


# ------------------------------------------------------------------------------------------------
# machine and assets


def machine_info() -> Dict[str, Any]:
    """Date, CPU, memory, library versions. Versions come from a child process: this process
    must not import torch (see the module's docstring)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    probe = (
        "import json, torch\n"
        "v = {'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}\n"
        "for m in ('torchtune', 'torchao', 'transformers', 'trl', 'peft'):\n"
        "    try:\n        v[m] = __import__(m).__version__\n"
        "    except Exception:\n        v[m] = 'n/a'\n"
        "print(json.dumps(v))\n"
    )
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO)
    versions = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        **versions,
        "loadavg_start": os.getloadavg()[0],
    }


def write_data(data_file: Path, spec: Dict[str, Any], lengths: List[Tuple[int, int, int]], rng: random.Random, vocab: int) -> Path:
    """A jsonl of one row per (prompt, chosen, rejected) word counts, words drawn from the
    vocabulary; reused if written from the same spec."""
    spec_file = data_file.with_suffix(".spec.json")
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec and data_file.exists():
        return data_file
    data_file.parent.mkdir(parents=True, exist_ok=True)
    with data_file.open("w") as f:
        for n_p, n_c, n_r in lengths:
            p, c, r = ([rng.randrange(FIRST_WORD_ID, vocab) for _ in range(n)] for n in (n_p, n_c, n_r))
            user = {"role": "user", "content": words(p)}
            f.write(json.dumps({"chosen": [user, {"role": "assistant", "content": words(c)}], "rejected": [user, {"role": "assistant", "content": words(r)}]}) + "\n")
    spec_file.write_text(json.dumps(spec))
    return data_file


def pair_tokens(data_file: Path, vocab: int) -> List[Dict[str, int]]:
    """Tokens of every pair, in file order, through the tokenizer the torchtune runs use (TRL's
    gives the same ids): prompt (+ BOS), chosen and rejected (+ EOS each)."""
    tok = WordTokenizer(vocab)
    out = []
    for line in data_file.read_text().splitlines():
        r = json.loads(line)
        out.append({"prompt": 1 + len(tok.encode(r["chosen"][0]["content"], add_bos=False, add_eos=False)),
                    "chosen": len(tok.encode(r["chosen"][1]["content"], add_bos=False, add_eos=False)) + 1,
                    "rejected": len(tok.encode(r["rejected"][1]["content"], add_bos=False, add_eos=False)) + 1})
    return out


def make_assets(a: argparse.Namespace, data_file: Path, name: str, in_order: bool) -> Dict[str, Any]:
    """Model + data set `name`, and the data's token counts. in_order: every tool must read the
    pairs in file order (pairs of different lengths)."""
    model_dir = make_model(a.workdir, a.shape, a.seed)
    return {"model_dir": model_dir, "data_file": data_file, "n_params": count_params(model_dir), "data": name,
            "pairs": pair_tokens(data_file, a.model_shape["vocab_size"]), "in_order": in_order}


# ------------------------------------------------------------------------------------------------
# configs


def _common(a, assets, out_dir: Path, model: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "output_dir": str(out_dir),
        "model": model,
        "tokenizer": {"_component_": "benchmarks.wordtok.WordTokenizer", "vocab_size": a.model_shape["vocab_size"], "max_seq_len": None},
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(assets["model_dir"]),
            "checkpoint_files": ["model.safetensors"],
            "model_type": "LLAMA2",
            "output_dir": str(out_dir),
        },
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": a.lr, "weight_decay": 0.0, "fused": True},
        "seed": a.seed,
        # variable-length data: file order, the order every tool reads (see packing_benchmark.py)
        "shuffle": not assets["in_order"],
        "batch_size": a.batch_size,
        "gradient_accumulation_steps": 1,
        "epochs": 1,
        "max_steps_per_epoch": a.steps,
        "device": "cpu",
        "dtype": "fp32",
        "compile": False,
        "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out_dir / "logs")},
        "log_every_n_steps": 1,
        "resume_from_checkpoint": False,
    }


def make_config(tool: str, a, assets, out_dir: Path) -> Dict[str, Any]:
    shape = dict(a.model_shape)
    lora_model = {"_component_": "torchtune.models.llama2.lora_llama2", **LORA, **shape}
    full_model = {"_component_": "torchtune.models.llama2.llama2", **shape}
    # max_seq_len: the recipes refuse an unbounded data set for a model of limited positions; the
    # generated pairs are capped below it, so nothing is truncated
    ours_data = {"_component_": "prefopt.data.preference_dataset", "source": "json", "data_files": str(assets["data_file"]),
                 "split": "train", "max_seq_len": a.model_shape["max_seq_len"]}
    tt_data = {"_component_": "torchtune.datasets.preference_dataset", "source": "json", "data_files": str(assets["data_file"]), "split": "train"}
    simpo = {"_component_": "prefopt.loss.SimPOLoss", "beta": a.beta, "gamma": a.gamma}
    dpo = {"_component_": "torchtune.rlhf.loss.DPOLoss", "beta": 0.1}
    # what the benchmark fixes for both of our recipes (no scheduler, no clipping, no periodic saves)
    ours = dict(dataset=ours_data, loss=simpo, lr_scheduler=None, clip_grad_norm=None, log_peak_memory_stats=True,
                save_every_n_steps=None)
    if tool in ("ours_lora", "ours_lora_padded"):
        cfg = _common(a, assets, out_dir, lora_model)
        # packed: True is the recipe's default; written out so that each config says its layout
        cfg.update(ours, save_adapter_weights_only=True, packed=tool == "ours_lora")
    elif tool == "tt_lora_dpo":
        cfg = _common(a, assets, out_dir, lora_model)
        cfg.update(dataset=tt_data, loss=dpo, log_peak_memory_stats=False, save_adapter_weights_only=True)
    elif tool == "ours_full":
        cfg = _common(a, assets, out_dir, full_model)
        cfg.update(ours, optimizer_in_bwd=False)
    elif tool == "tt_full_dpo":
        cfg = _common(a, assets, out_dir, full_model)
        ref = dict(cfg["checkpointer"])
        cfg.update(dataset=tt_data, loss=dpo, ref_checkpointer=ref, log_peak_memory_stats=False, optimizer_in_bwd=False,
                   # a required key of this recipe: a constant schedule (no warm-up) like the others
                   lr_scheduler={"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup", "num_warmup_steps": 0})
    else:
        raise ValueError(tool)
    return cfg


# ------------------------------------------------------------------------------------------------
# running


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_command(tool: str, a, assets, run_dir: Path) -> List[str]:
    if tool == "trl_cpo":
        cmd = ["script", str(BENCH / "_trl_cpo.py"), "--model", str(assets["model_dir"]), "--data", str(assets["data_file"]),
               "--output-dir", str(run_dir / "out"), "--steps", str(a.steps), "--batch-size", str(a.batch_size),
               "--lora-rank", str(LORA["lora_rank"]), "--lora-alpha", str(LORA["lora_alpha"]), "--targets", HF_LORA_TARGETS,
               "--vocab-size", str(a.model_shape["vocab_size"]), "--beta", str(a.beta), "--gamma", str(a.gamma), "--lr", str(a.lr),
               # TRL truncates a sequence longer than max_length: never, the model's whole context
               "--max-length", str(a.model_shape["max_seq_len"])]
        if assets["in_order"]:
            cmd += ["--in-order", "--rows-out", str(run_dir / "rows.json")]
        return cmd
    from omegaconf import OmegaConf

    cfg = make_config(tool, a, assets, run_dir / "out")
    cfg_path = run_dir / "config.yaml"
    OmegaConf.save(OmegaConf.create(cfg), cfg_path)
    recipe = {
        "ours_lora": "recipes/simpo_lora_single_device.py",
        "ours_lora_padded": "recipes/simpo_lora_single_device.py",
        "tt_lora_dpo": "lora_dpo_single_device",
        "ours_full": "recipes/simpo_full_distributed.py",
        "tt_full_dpo": "full_dpo_distributed",
    }[tool]
    return ["tune", "run", recipe, "--config", str(cfg_path)]


class Run:
    """One measured run: a subprocess under benchmarks/_stepclock.py in lockstep mode."""

    def __init__(self, tool: str, rnd: int, a, assets) -> None:
        self.tool, self.rnd = tool, rnd
        wd = a.workdir
        # in-order (packing) data: one folder per data set
        self.run_dir = wd / "runs" / (assets["data"] if assets["in_order"] else "") / f"{tool}_r{rnd}"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.clock = self.run_dir / "steps.json"
        cmd = [sys.executable, "-m", "benchmarks._stepclock", "--out", str(self.clock)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if tool == "tt_full_dpo":
            cmd += ["--cpu-shims"]
        self.rows = self.run_dir / "rows.json"  # the pairs each step consumed (in-order data only)
        if assets["in_order"] and tool != "trl_cpo":  # TRL's script records its own (_trl_cpo.py)
            cmd += ["--record-rows", str(self.rows)]
        cmd += ["--"] + tool_command(tool, a, assets, self.run_dir)
        ctrl_r, self.ctrl_w = os.pipe()
        self.status_r, status_w = os.pipe()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_CACHE=str(wd / "hf_datasets_cache"), STEPCLOCK_CTRL_FD=str(ctrl_r), STEPCLOCK_STATUS_FD=str(status_w))
        if TOOLS[tool][0] == "full":
            # one-process "distributed" run: torchtune's full_dpo_distributed requires launcher env
            # variables (training.is_distributed()); ours works without, and gets the same ones
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        self.log_path = self.run_dir / "stdout.log"
        # On Linux a child starts with its parent's ru_maxrss (it survives fork + exec), so every
        # run's peak RSS is at least the launcher's: noted to tell an inherited value apart.
        self.floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        self.t0 = time.perf_counter()
        with self.log_path.open("w") as log_f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_f, stderr=subprocess.STDOUT, pass_fds=(ctrl_r, status_w))
        os.close(ctrl_r)
        os.close(status_w)
        self.steps_done = 0
        self.rusage = None
        self.status = None
        self.error: Optional[str] = None
        self._buf = b""

    def wait_step(self, timeout: float) -> bool:
        """Wait until the run reports its next optimizer step; False if it died or timed out."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.error = f"no optimizer step within {timeout:.0f}s"
                return False
            ready, _, _ = select.select([self.status_r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.status_r, 64)
                if not chunk:  # the run closed its end: it exited
                    self.error = self.error or "exited before its last step"
                    return False
                self._buf += chunk
        _, self._buf = self._buf.split(b"\n", 1)
        self.steps_done += 1
        return True

    def go(self) -> None:
        try:
            os.write(self.ctrl_w, b"g")
        except OSError:
            pass

    def finish(self, timeout: float) -> None:
        """Let the run go on to its end (final save, exit) and collect its peak RSS."""
        try:
            os.close(self.ctrl_w)  # EOF: the hook stops waiting from now on
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.status, self.rusage = status, rusage
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                _, self.status, self.rusage = os.wait4(self.proc.pid, 0)
                self.error = self.error or "timeout"
                break
            time.sleep(0.2)
        os.close(self.status_r)

    def result(self, a) -> Dict[str, Any]:
        rc = os.waitstatus_to_exitcode(self.status)
        res: Dict[str, Any] = {"tool": self.tool, "round": self.rnd, "wall_s": time.perf_counter() - self.t0, "rc": rc,
                               "peak_rss_gib": self.rusage.ru_maxrss / 2**20, "log": str(self.log_path), "launcher_peak_rss_gib": self.floor}
        if res["peak_rss_gib"] <= 1.02 * self.floor:
            print(f"WARNING: {self.tool}'s peak RSS {res['peak_rss_gib']:.2f} GiB is at the launcher's own {self.floor:.2f} GiB: "
                  "it may be the inherited value, not the run's", flush=True)
        if self.error is None and rc != 0:
            self.error = f"exit code {rc}"
        if self.error is None and not self.clock.exists():
            self.error = "no steps.json"
        if self.error is not None:
            res["error"] = self.error
            res["log_tail"] = self.log_path.read_text()[-3000:]
            return res
        c = json.loads(self.clock.read_text())
        ends, gos = c["step_end_times"], c["step_go_times"]
        res["n_steps"] = len(ends)
        if len(ends) != a.steps:
            res["error"] = f"{len(ends)} optimizer steps, expected {a.steps}"
            res["log_tail"] = self.log_path.read_text()[-3000:]
            return res
        # step i runs from the release after step i-1 to the end of step i
        res["step_s"] = [ends[i] - gos[i - 1] for i in range(a.warmup, len(ends))]
        cpu_end, cpu_go = c["step_end_cpu_times"], c["step_go_cpu_times"]
        res["step_cpu_s"] = [cpu_end[i] - cpu_go[i - 1] for i in range(a.warmup, len(ends))]
        res["median_step_s"] = statistics.median(res["step_s"])
        res["median_step_cpu_s"] = statistics.median(res["step_cpu_s"])
        res["startup_s"] = ends[0] - c["t_start"]  # start-up + the first step, concurrent with the other runs' start-up
        res["train_peak_rss_gib"] = c["maxrss_kib_at_steps"][-1] / 2**20
        res["torch_threads"] = c["torch_num_threads"]
        if self.rows.exists():
            res["rows_consumed"] = json.loads(self.rows.read_text())
        trl_tokens = self.rows.with_name("rows_tokens.json")  # _trl_cpo.py --rows-out's companion
        if trl_tokens.exists():
            res["trl_tokens"] = json.loads(trl_tokens.read_text())
        log = self.log_path.read_text()
        for line in log.splitlines():
            if line.startswith("stepclock: prefopt from "):  # which prefopt the run imported
                res["prefopt_file"] = line.split(" from ", 1)[1].strip()
        if self.tool == "ours_lora" and "falling back to the padded layout" in log:
            res["error"] = "packed: True fell back to the padded layout (see the log)"
            res["log_tail"] = log[-3000:]
        return res


def run_group(tools: List[str], rnd: int, a, assets) -> List[Dict[str, Any]]:
    """Start the runs of `tools` together, wait until each has taken its warm-up step(s), then
    release them ONE STEP AT A TIME in rotating order (A B C, B C A, C A B, ...): every measured
    step runs while the other runs of the group sit blocked, and steps of different tools are
    seconds apart, so load from other users of the machine hits all tools alike."""
    runs = [Run(t, rnd, a, assets) for t in tools]
    for r in runs:  # start-up + warm-up step(s), concurrently (not measured)
        for _ in range(a.warmup):
            if r.error is None and r.steps_done < a.warmup:
                if not r.wait_step(a.run_timeout):
                    break
                if r.steps_done < a.warmup:
                    r.go()
    for k in range(a.warmup, a.steps):
        order = runs[k % len(runs):] + runs[: k % len(runs)]
        for r in order:
            if r.error is None:
                r.go()
                r.wait_step(a.run_timeout)
    for r in runs:
        r.finish(a.run_timeout)
    return [r.result(a) for r in runs]
