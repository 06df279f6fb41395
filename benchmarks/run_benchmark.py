#!/usr/bin/env python
"""prefopt vs its peers: throughput and peak memory of one preference-optimization step.

    .venv/bin/python benchmarks/run_benchmark.py                # LoRA + full, 2 interleaved rounds
    .venv/bin/python benchmarks/run_benchmark.py --sweep        # + the memory sweep of the loss step
    .venv/bin/python benchmarks/run_benchmark.py --parts sweep  # the sweep alone
    .venv/bin/python benchmarks/run_benchmark.py --parts packing  # packed vs padded vs TRL, 3 data sets

Everything is made locally, seeded, in --workdir (default /tmp/prefopt_bench): a Hugging Face
Llama (~19.5M parameters: vocab 32000, hidden 256, 4 layers, 4 heads, MLP 688), a pre-tokenized
preference data set (jsonl, chosen/rejected message lists of ``w<id>`` words; every pair has
a P-token prompt and two R-token responses) and the tokenizer for both sides
(benchmarks/wordtok.py). Nothing is downloaded.

Runs (same model shape, data, batch size, sequence length, fp32, AdamW(fused), no clipping, no
activation checkpointing, same number of steps), --rounds rounds of fresh processes, and within a
round the runs of a group interleaved STEP BY STEP (A B C, B C A, C A B, ...):

  LoRA r8 on q_proj/v_proj:
    ours_lora   tune run recipes/simpo_lora_single_device.py   (SimPO)
    tt_lora_dpo tune run lora_dpo_single_device                (torchtune 0.6.1 DPO, reference pass)
    trl_cpo     TRL CPOTrainer loss_type=simpo cpo_alpha=0, peft LoRA (benchmarks/_trl_cpo.py)
  full fine-tuning, one process:
    ours_full   tune run recipes/simpo_full_distributed.py     (SimPO, FSDP2 over 1 process)
    tt_full_dpo tune run full_dpo_distributed                  (torchtune 0.6.1 DPO, reference model)

Each run is a subprocess under benchmarks/_stepclock.py: a global optimizer-step hook stamps the
end of every optimizer step and then blocks until this launcher lets the run go on. The runs of
a group start together; once all have taken their warm-up step(s), the launcher releases one
run for one step at a time, so a measured step never overlaps another measured run's work, and
a burst of load from other users of the machine lands on all tools alike instead of on whole
runs. Step time = from the release after step i-1 to the end of step i (data loading, forward(s),
backward, optimizer, the tool's own logging; start-up and the final save excluded). tokens/s = real tokens per step / median step time, where real
tokens per step = pairs per step x (prompt + chosen + rejected tokens of a pair, BOS/EOS
included), counted from the data set, the same for every tool (no padding: every pair has the
same lengths). Peak memory = the subprocess's peak RSS (os.wait4's ru_maxrss).

Writes benchmarks/results/results.md, results.png, results.json (and sweep.md/.png/.json with --sweep).

--parts packing (on its own): our packed layout vs our padded one vs TRL, on data with realistic
length distributions. One lockstep group per data set (--data; default all three):

    ours_lora        as above (packed: True, the recipes' default: [prompt][chosen][rejected] once)
    ours_lora_padded ours_lora with packed: False (2b right-padded rows, prompt computed twice)
    trl_cpo          as above

  uniform        today's set: every pair --prompt-len / --response-len words
  ultrafeedback  pair length log-normal, median ~400 tokens, tail to --max-pair-len (2,048);
                 prompt / mean response ~0.4
  long_prompt    summarisation-like: median ~700 tokens, prompt / mean response >= 4 (median ~6),
                 a short answer after a long prompt

Default shape there: --shape decoder (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000:
the decoder, not the output layer, is most of the step). Pairs vary in length, so every tool reads
the same pairs in the same order (ours: shuffle: False; TRL: a SequentialSampler), and each tool's
consumed rows are recorded and checked against file order. tokens/s = prompt + chosen + rejected
tokens of the pairs of the measured steps (counted from the data file with the tokenizer) / the
SUM of those steps' times (not a median: steps differ in length, a long step must weigh more).
Writes benchmarks/results/packing.md and packing.json.
"""

import argparse
import datetime as _dt
import json
import math
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
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(REPO))

from benchmarks.wordtok import FIRST_WORD_ID, words  # noqa: E402

SHAPES = {
    # the first benchmark's model: the output layer (vocab 32000 x hidden 256) is most of the step
    "small": dict(vocab_size=32000, num_layers=4, num_heads=4, num_kv_heads=4, embed_dim=256, intermediate_dim=688, max_seq_len=1024, norm_eps=1e-5),
    # the packing benchmark's model (~134M parameters, 85M of them in the decoder layers): the
    # layers, which the packed layout saves work in, are most of the step. max_seq_len 2048: a
    # packed row is as long as the longest pair (prompt + chosen + rejected) of its batch.
    "decoder": dict(vocab_size=32000, num_layers=12, num_heads=12, num_kv_heads=12, embed_dim=768, intermediate_dim=2048, max_seq_len=2048, norm_eps=1e-5),
}
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, apply_lora_to_output=False, lora_rank=8, lora_alpha=16, lora_dropout=0.0)
HF_LORA_TARGETS = "q_proj,v_proj"

TOOLS = {
    # name: (part, label)
    "ours_lora": ("lora", "ours: simpo_lora_single_device (SimPO)"),
    "tt_lora_dpo": ("lora", "torchtune 0.6.1 lora_dpo_single_device (DPO)"),
    "trl_cpo": ("lora", "TRL CPOTrainer, CPO-SimPO + peft LoRA"),
    "ours_full": ("full", "ours: simpo_full_distributed, 1 process (SimPO)"),
    "tt_full_dpo": ("full", "torchtune 0.6.1 full_dpo_distributed, 1 process (DPO)"),
    # only in --parts packing (with ours_lora and trl_cpo)
    "ours_lora_padded": ("packing", "ours: simpo_lora_single_device, packed: False (padded)"),
}
PACKING_TOOLS = ("ours_lora", "ours_lora_padded", "trl_cpo")
# (ours, peer, min tokens/s ratio, max peak-memory ratio)
TARGETS = [
    ("ours_lora", "trl_cpo", 1.5, 0.5),
    ("ours_lora", "tt_lora_dpo", 2.0, 0.4),
    ("ours_full", "tt_full_dpo", 1.6, 0.6),
]
# --parts packing, per data set: (ours, peer, min tokens/s ratio, max peak-memory ratio); the
# issue's targets, on the decoder shape. uniform has none: it is the reference point (no padding,
# prompt half of each sequence).
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
# machine and assets


def machine_info() -> Dict[str, Any]:
    """Date, CPU, memory, library versions. Versions come from a child process: this process
    must not import torch (see _parent_peak_rss_gib)."""
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


def _parent_peak_rss_gib() -> float:
    """This process's peak RSS. On Linux a child starts with its parent's ru_maxrss (it survives
    fork + exec), so every measured run's peak RSS is at least this: keep it small."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_model(wd: Path, a: argparse.Namespace) -> Path:
    """The HF Llama of --shape, seeded; reused if the spec is unchanged. The small shape keeps
    the folder name it always had (model/)."""
    shape = a.model_shape
    model_dir = wd / ("model" if a.shape == "small" else f"model_{a.shape}")
    spec = {"shape": shape, "seed": a.seed, "v": 1}
    spec_file = model_dir.with_name(model_dir.name + "_spec.json")
    if not (spec_file.exists() and json.loads(spec_file.read_text()) == spec and (model_dir / "model.safetensors").exists()):
        shutil.rmtree(model_dir, ignore_errors=True)
        subprocess.run([sys.executable, str(BENCH / "_make_model.py"), str(model_dir), str(a.seed), json.dumps(shape)], check=True, cwd=REPO)
        spec_file.write_text(json.dumps(spec))
    return model_dir


def _write_pairs(path: Path, lengths: List[tuple], rng: random.Random, vocab: int) -> None:
    """One jsonl row per (prompt, chosen, rejected) word counts, words drawn from the vocabulary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n_p, n_c, n_r in lengths:
            p, c, r = ([rng.randrange(FIRST_WORD_ID, vocab) for _ in range(n)] for n in (n_p, n_c, n_r))
            user = {"role": "user", "content": words(p)}
            f.write(json.dumps({"chosen": [user, {"role": "assistant", "content": words(c)}], "rejected": [user, {"role": "assistant", "content": words(r)}]}) + "\n")


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


def make_data(wd: Path, a: argparse.Namespace, name: str) -> Path:
    """Data set `name` (DATASETS) as jsonl, seeded; reused if the spec is unchanged.

    uniform for the lora/full parts: --pairs pairs drawn as the first benchmark always drew them.
    For --parts packing every set holds exactly the pairs the runs consume (steps x batch), in the
    order they consume them."""
    vocab = a.model_shape["vocab_size"]
    if name == "uniform" and not a.packing:
        data_file, n = wd / "data" / "train.jsonl", a.pairs
        spec = {"vocab": vocab, "pairs": n, "prompt_len": a.prompt_len, "response_len": a.response_len, "seed": a.seed, "v": 1}
    else:
        data_file, n = wd / "data" / f"{name}.jsonl", a.steps * a.batch_size
        spec = {"vocab": vocab, "name": name, "pairs": n, "warmup_pairs": a.warmup * a.batch_size, "seed": a.seed, "v": 2,
                **({"prompt_len": a.prompt_len, "response_len": a.response_len} if name == "uniform"
                   else {"model": LENGTH_MODELS[name], "length_scale": a.length_scale, "max_pair_len": a.max_pair_len})}
    spec_file = data_file.with_suffix(".spec.json")
    if spec_file.exists() and json.loads(spec_file.read_text()) == spec and data_file.exists():
        return data_file
    if name == "uniform":
        # the same draws as before the packing benchmark: the same file for the same seed
        rng = random.Random(a.seed)
        lengths = [(a.prompt_len, a.response_len, a.response_len)] * n
    else:
        rng = random.Random(f"{a.seed}:{name}")
        n_warm = a.warmup * a.batch_size
        lengths = variable_lengths(name, n_warm, n - n_warm, a, rng)
    _write_pairs(data_file, lengths, rng, vocab)
    spec_file.write_text(json.dumps(spec))
    return data_file


def pair_tokens(data_file: Path, vocab: int) -> List[Dict[str, int]]:
    """Tokens of every pair, in file order, through the tokenizer the torchtune runs use (TRL's
    gives the same ids): prompt (+ BOS), chosen and rejected (+ EOS each)."""
    from benchmarks.wordtok import WordTokenizer

    tok = WordTokenizer(vocab)
    out = []
    for line in data_file.read_text().splitlines():
        r = json.loads(line)
        out.append({"prompt": 1 + len(tok.encode(r["chosen"][0]["content"], add_bos=False, add_eos=False)),
                    "chosen": len(tok.encode(r["chosen"][1]["content"], add_bos=False, add_eos=False)) + 1,
                    "rejected": len(tok.encode(r["rejected"][1]["content"], add_bos=False, add_eos=False)) + 1})
    return out


def make_assets(wd: Path, a: argparse.Namespace, name: str = "uniform") -> Dict[str, Any]:
    """Model + data set `name`, and the data's token counts."""
    model_dir = make_model(wd, a)
    data_file = make_data(wd, a, name)
    pairs = pair_tokens(data_file, a.model_shape["vocab_size"])
    assets = {"model_dir": model_dir, "data_file": data_file, "n_params": _count_params(model_dir), "data": name, "pairs": pairs,
              # --parts packing: every tool must read the pairs in file order (their lengths differ)
              "in_order": a.packing,
              "max_seq": max(p["prompt"] + max(p["chosen"], p["rejected"]) for p in pairs)}
    if a.packing:
        longest = max(p["prompt"] + p["chosen"] + p["rejected"] for p in pairs)
        if longest > a.model_shape["max_seq_len"]:
            raise RuntimeError(f"a pair of {longest} tokens: a packed row would exceed the model's max_seq_len "
                               f"{a.model_shape['max_seq_len']} (lower --max-pair-len)")
        return assets
    per_pair = {p["prompt"] + p["chosen"] + p["rejected"] for p in pairs}
    fwd_per_pair = {2 * p["prompt"] + p["chosen"] + p["rejected"] for p in pairs}
    if len(per_pair) != 1:
        raise RuntimeError("pairs of different lengths: per-step token counts would depend on each tool's data order")
    assets.update(tokens_per_pair=per_pair.pop(),  # prompt + chosen + rejected
                  fwd_tokens_per_pair=fwd_per_pair.pop(),  # prompt counted twice: what the model runs on
                  seq_len=1 + a.prompt_len + a.response_len + 1)
    return assets


def _count_params(model_dir: Path) -> int:
    """Parameters in model.safetensors, from its JSON header (no torch in this process)."""
    with (model_dir / "model.safetensors").open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sum(_prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


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
        # variable-length data: file order, the order every tool reads (see run_benchmark's docstring)
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
    ours_data = {"_component_": "prefopt.data.preference_dataset", "source": "json", "data_files": str(assets["data_file"]), "split": "train"}
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


class _Run:
    """One measured run: a subprocess under benchmarks/_stepclock.py in lockstep mode."""

    def __init__(self, tool: str, rnd: int, a, assets, wd: Path) -> None:
        self.tool, self.rnd = tool, rnd
        # --parts packing: one folder per data set
        self.run_dir = wd / "runs" / (assets["data"] if a.packing else "") / f"{tool}_r{rnd}"
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
        self.floor = _parent_peak_rss_gib()
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


def run_group(tools: List[str], rnd: int, a, assets, wd: Path) -> List[Dict[str, Any]]:
    """Start the runs of `tools` together, wait until each has taken its warm-up step(s), then
    release them ONE STEP AT A TIME in rotating order (A B C, B C A, C A B, ...): every measured
    step runs while the other runs of the group sit blocked, and steps of different tools are
    seconds apart, so load from other users of the machine hits all tools alike."""
    runs = [_Run(t, rnd, a, assets, wd) for t in tools]
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


# ------------------------------------------------------------------------------------------------
# reporting


def summarize(results: List[Dict[str, Any]], assets, a) -> Dict[str, Dict[str, Any]]:
    tokens_per_step = a.batch_size * assets["tokens_per_pair"]
    out = {}
    for tool in TOOLS:
        rs = [r for r in results if r["tool"] == tool]
        if not rs:
            continue
        ok = [r for r in rs if "error" not in r]
        s: Dict[str, Any] = {"tool": tool, "label": TOOLS[tool][1], "runs": len(rs), "ok_runs": len(ok)}
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


def write_report(summary, rat, machine, assets, a, skipped: Dict[str, str], wall_s: float, cmdline: str) -> None:
    tps_step = a.batch_size * assets["tokens_per_pair"]
    L = []
    L.append("# prefopt vs peers: benchmark results\n")
    L.append(f"- **Date**: {machine['date']}  ")
    L.append(f"- **Machine**: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB RAM, no GPU; "
             f"torch {machine['torch']} ({machine['torch_threads']} threads), torchtune {machine['torchtune']}, "
             f"transformers {machine['transformers']}, TRL {machine['trl']}, peft {machine['peft']}; "
             f"load average {machine['loadavg_start']:.1f} at start, {machine['loadavg_end']:.1f} at end (shared machine)  ")
    L.append(f"- **Command**: `{cmdline}` ({wall_s / 60:.1f} min)  ")
    L.append(f"- **Model**: HF Llama, {assets['n_params'] / 1e6:.2f}M parameters ({_shape_words(a.model_shape)}), fp32; LoRA r{LORA['lora_rank']}/alpha {LORA['lora_alpha']} on q_proj, v_proj  ")
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
        L.append(f"| {TOOLS[tool][1]} | skipped: {why} | | | | | | | |")
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


def _shape_words(shape: Dict[str, Any]) -> str:
    return (f"vocab {shape['vocab_size']}, hidden {shape['embed_dim']}, {shape['num_layers']} layers, {shape['num_heads']} heads, "
            f"MLP {shape['intermediate_dim']}")


# ------------------------------------------------------------------------------------------------
# --parts packing: packed vs padded vs TRL on variable-length data


def layout_stats(assets, a) -> Optional[List[Dict[str, Any]]]:
    """Per step: the positions each layout computes (benchmarks/_layout_stats.py, a child process)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(a.workdir / "hf_datasets_cache"))
    cmd = [sys.executable, str(BENCH / "_layout_stats.py"), str(assets["data_file"]), str(a.batch_size), str(a.steps),
           str(a.model_shape["vocab_size"])]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
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


def summarize_packing(results: List[Dict[str, Any]], dstats: Dict[str, Dict[str, Any]], a) -> Dict[str, Dict[str, Dict[str, Any]]]:
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
            s: Dict[str, Any] = {"tool": tool, "label": TOOLS[tool][1], "runs": len(rs), "ok_runs": len(ok)}
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


def packing_ratios(summary) -> Dict[str, List[Dict[str, Any]]]:
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


def run_packing(a, machine, t_all: float) -> None:
    results: List[Dict[str, Any]] = []
    dstats: Dict[str, Dict[str, Any]] = {}
    layouts: Dict[str, Any] = {}
    n_params = None
    for name in a.data:
        assets = make_assets(a.workdir, a, name)
        n_params = assets["n_params"]
        dstats[name] = data_stats(assets, a)
        layouts[name] = layout_stats(assets, a)
        d = dstats[name]
        print(f"[{name}] {d['pairs']} pairs, measured: pair length median {d['pair_len_median']:.0f} "
              f"({d['pair_len_min']}-{d['pair_len_max']}) tokens, prompt/response {d['ratio_median']:.2f}; tokens per step "
              f"{d['step_tokens']}", flush=True)
        for rnd in range(a.rounds):
            print(f"[{name}, round {rnd}] running {', '.join(a.packing_tools)} in lockstep ...", flush=True)
            for r in run_group(list(a.packing_tools), rnd, a, assets, a.workdir):
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
    summary = summarize_packing(results, dstats, a)
    rat = packing_ratios(summary)
    machine["loadavg_end"] = os.getloadavg()[0]
    write_packing_report(summary, rat, dstats, layouts, machine, n_params, a, time.perf_counter() - t_all)
    print((a.out_dir / "packing.md").read_text(), flush=True)


def _met(ok: Optional[bool]) -> str:
    return "no target" if ok is None else ("met" if ok else "**MISSED**")


def write_packing_report(summary, rat, dstats, layouts, machine, n_params, a, wall_s: float) -> None:
    L = ["# Packed vs padded layout vs TRL on realistic length distributions\n"]
    L.append(f"- **Date**: {machine['date']}  ")
    L.append(f"- **Machine**: {machine['nproc']} CPUs ({machine['cpu']}), {machine['mem_gib']} GiB RAM, no GPU; "
             f"torch {machine.get('torch')} ({machine.get('torch_threads')} threads), torchtune {machine.get('torchtune')}, "
             f"transformers {machine.get('transformers')}, TRL {machine.get('trl')}, peft {machine.get('peft')}; "
             f"load average {machine['loadavg_start']:.1f} at start, {machine['loadavg_end']:.1f} at end  ")
    L.append(f"- **Command**: `{a.cmdline}` ({wall_s / 60:.1f} min)  ")
    L.append(f"- **Model** (--shape {a.shape}): HF Llama, {n_params / 1e6:.1f}M parameters ({_shape_words(a.model_shape)}), fp32; "
             f"LoRA r{LORA['lora_rank']}/alpha {LORA['lora_alpha']} on q_proj, v_proj in all three runs  ")
    L.append(f"- **Runs**: {', '.join(f'{t} = {TOOLS[t][1]}' for t in a.packing_tools)}  ")
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
             "(run_benchmark.variable_lengths)\n")
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
# memory sweep


SWEEP_MODES = ("ours", "chunked_logits", "naive")


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_sweep(a, machine) -> None:
    """Peak-RSS increase of ONE loss step vs sequence length x vocab, each point a fresh process
    (benchmarks/_sweep_point.py): ours (the recipes' path), chunked_logits (the path before the
    profile), naive (whole logits + log_softmax + gather)."""
    rows = []
    for vocab in a.sweep_vocab:
        for seq in a.sweep_seq:
            bsv_gib = 2 * a.sweep_batch_size * seq * vocab * 4 / 2**30
            for mode in SWEEP_MODES:
                need = (4.5 if mode == "naive" else 1.5) * bsv_gib + 1.0
                if need > 0.6 * _mem_available_gib():
                    rows.append({"mode": mode, "seq": seq, "vocab": vocab, "error": f"skipped: would need ~{need:.1f} GiB"})
                    print(f"  sweep {mode} seq={seq} vocab={vocab}: skipped (~{need:.1f} GiB)", flush=True)
                    continue
                cmd = [sys.executable, str(BENCH / "_sweep_point.py"), "--mode", mode, "--seq", str(seq), "--vocab", str(vocab),
                       "--batch-size", str(a.sweep_batch_size), "--chunks", "8"]
                p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
                if p.returncode != 0:
                    rows.append({"mode": mode, "seq": seq, "vocab": vocab, "error": p.stderr[-2000:]})
                    print(f"  sweep {mode} seq={seq} vocab={vocab}: FAILED\n{p.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"  sweep {mode:5s} seq={seq:5d} vocab={vocab:6d}: step peak +{r['step_delta_gib']:.3f} GiB "
                      f"(process {r['peak_rss_gib']:.2f} GiB), {r['step_s']:.1f}s", flush=True)
    _write_sweep(rows, machine, a)


def _write_sweep(rows, machine, a) -> None:
    L = ["# Memory sweep: our SimPO loss step vs the naive log_softmax-gather path\n"]
    L.append(f"{machine['date']}; {machine['nproc']} CPUs ({machine['cpu']}), torch {machine.get('torch')}. Command: "
             f"`{a.cmdline}`. One fresh process per point (benchmarks/_sweep_point.py); model = the benchmark's LoRA Llama "
             f"(hidden 256, 4 layers, LoRA r8 q/v, fp32) with the given vocab; {a.sweep_batch_size} pairs = "
             f"{2 * a.sweep_batch_size} sequences of the given length, half prompt, half response. 'step' = peak RSS during "
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
    for vocab in a.sweep_vocab:
        for seq in a.sweep_seq:
            bsv = 2 * a.sweep_batch_size * seq * vocab * 4 / 2**30
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

    fig, axes = plt.subplots(1, len(a.sweep_vocab), figsize=(4.6 * len(a.sweep_vocab), 3.9), squeeze=False)
    for ax, vocab in zip(axes[0], a.sweep_vocab):
        for mode, style in zip(SWEEP_MODES, ("o-", "s--", "^-.")):
            pts = [(s, by[(s, vocab, mode)]["step_delta_gib"]) for s in a.sweep_seq if "step_delta_gib" in by.get((s, vocab, mode), {})]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=mode)
        ax.plot(a.sweep_seq, [2 * a.sweep_batch_size * s * vocab * 4 / 2**30 for s in a.sweep_seq], ":", color="gray", label="B*S*V*4 bytes")
        ax.set_title(f"vocab {vocab}, {2 * a.sweep_batch_size} sequences", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("peak RSS increase of one step (GiB)")
        ax.legend(fontsize=8)
    fig.suptitle(f"loss-step memory, {machine['date']}, {machine['nproc']} CPUs ({machine['cpu']}), torch {machine.get('torch')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out_dir / "sweep.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def full_recipe_problem() -> Optional[str]:
    """Why our full recipe cannot be benchmarked (None if it can be tried)."""
    path = REPO / "recipes" / "simpo_full_distributed.py"
    if not path.exists():
        return f"{path.relative_to(REPO)} does not exist yet"
    p = subprocess.run([sys.executable, "-c", "import recipes.simpo_full_distributed as m; m.SimPORecipeDistributed"],
                       cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        return f"{path.relative_to(REPO)} does not import: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/prefopt_bench"))
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the results go (default: benchmarks/results/)")
    p.add_argument("--parts", default="lora,full", help="comma list of lora, full, sweep; or packing (on its own)")
    p.add_argument("--sweep", action="store_true", help="add the memory sweep to --parts")
    p.add_argument("--tools", default=None, help="comma list: only these runs (" + ", ".join(TOOLS) + ")")
    p.add_argument("--data", default=None, help="--parts packing: comma list of " + ", ".join(DATASETS) + " (default: all)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None, help="model shape (default: small; decoder for --parts packing)")
    p.add_argument("--max-pair-len", type=int, default=2048, help="--parts packing: cap on a pair's prompt + chosen + rejected tokens")
    p.add_argument("--length-scale", type=float, default=1.0, help="--parts packing: scale the length models' medians (quick runs)")
    # defaults: (lora/full parts, packing part). Packing: a decoder-shape step takes ~20-30 CPU-s
    # per 1,000 tokens on 2 cores, so batch 2 x 4 steps keeps the three data sets x three runs at
    # ~20 min on a quiet machine (batch 4: about twice that)
    p.add_argument("--rounds", type=int, default=None, help="rounds of fresh processes (default 2; packing 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run, warm-up included (default 7; packing 4)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 4; packing 2)")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=190)
    p.add_argument("--response-len", type=int, default=190)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every run (default: torch's)")
    p.add_argument("--run-timeout", type=int, default=600)
    p.add_argument("--sweep-seq", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256, 512, 1024])
    p.add_argument("--sweep-vocab", type=lambda s: [int(x) for x in s.split(",")], default=[32000, 128256])
    p.add_argument("--sweep-batch-size", type=int, default=2, help="pairs per sweep step")
    a = p.parse_args()
    parts = set(a.parts.split(",")) | ({"sweep"} if a.sweep else set())
    a.packing = "packing" in parts
    if a.packing and parts != {"packing"}:
        p.error("--parts packing runs on its own (it has its own shape, data, steps and report)")
    a.shape = a.shape or ("decoder" if a.packing else "small")
    a.model_shape = SHAPES[a.shape]
    for key, default, packing_default in (("rounds", 2, 1), ("steps", 7, 4), ("batch_size", 4, 2)):
        if getattr(a, key) is None:
            setattr(a, key, packing_default if a.packing else default)
    a.data = a.data.split(",") if a.data else (list(DATASETS) if a.packing else ["uniform"])
    if set(a.data) - set(DATASETS):
        p.error(f"--data: unknown {sorted(set(a.data) - set(DATASETS))}")
    if not a.packing and a.data != ["uniform"]:
        p.error("--data other than uniform needs --parts packing (the lora/full report assumes equal pairs)")
    if a.packing and a.max_pair_len > a.model_shape["max_seq_len"]:
        p.error(f"--max-pair-len {a.max_pair_len} exceeds the {a.shape} shape's max_seq_len {a.model_shape['max_seq_len']}")
    a.packing_tools = [t for t in PACKING_TOOLS if a.tools is None or t in a.tools.split(",")]
    a.out_dir = a.out_dir or BENCH / "results"  # every generated table, JSON and plot goes there
    if a.steps <= a.warmup + 1:
        p.error("--steps must exceed --warmup + 1")
    if a.pairs < a.steps * a.batch_size:
        a.pairs = a.steps * a.batch_size
    a.workdir.mkdir(parents=True, exist_ok=True)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    cmdline = " ".join([".venv/bin/python", "benchmarks/run_benchmark.py"] + sys.argv[1:])
    a.cmdline = cmdline
    t_all = time.perf_counter()
    machine = machine_info()
    print(f"machine: {machine}", flush=True)
    if a.packing:
        run_packing(a, machine, t_all)
        print(f"total wall time {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)
        return

    tools = [t for t, (part, _) in TOOLS.items() if part in parts and (a.tools is None or t in a.tools.split(","))]
    skipped: Dict[str, str] = {}
    if "full" in parts:
        why = full_recipe_problem()
        if why:
            print(f"SKIPPING the full fine-tuning comparison: {why}", flush=True)
            for t in ("ours_full", "tt_full_dpo"):
                skipped[t] = why
            tools = [t for t in tools if TOOLS[t][0] != "full"]
    if tools:
        assets = make_assets(a.workdir, a)
        print(f"assets: {assets['n_params'] / 1e6:.2f}M-parameter Llama, {a.pairs} pairs of {assets['tokens_per_pair']} tokens "
              f"(prompt + chosen + rejected), {a.batch_size * assets['tokens_per_pair']} tokens per step", flush=True)
        results = []
        groups = [[t for t in tools if TOOLS[t][0] == part] for part in ("lora", "full")]
        for rnd in range(a.rounds):
            for group in groups:
                if not group:
                    continue
                print(f"[round {rnd}] running {', '.join(group)} in lockstep ...", flush=True)
                for r in run_group(group, rnd, a, assets, a.workdir):
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
        (a.workdir / "raw_results.json").write_text(json.dumps(results, indent=1))
        summary = summarize(results, assets, a)
        rat = ratios(summary)
        machine["loadavg_end"] = os.getloadavg()[0]
        write_report(summary, rat, machine, assets, a, {k: v for k, v in skipped.items() if k not in summary}, time.perf_counter() - t_all, cmdline)
        print((a.out_dir / "results.md").read_text(), flush=True)
    if "sweep" in parts:
        run_sweep(a, machine)
        print((a.out_dir / "sweep.md").read_text(), flush=True)
    print(f"total wall time {(time.perf_counter() - t_all) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
