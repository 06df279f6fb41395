#!/usr/bin/env python
"""The first thing to run on a lent GPU: the ``gpu`` tests, then our two recipes on a
Llama-3.2-1B-shaped model, timed. One command, nothing downloaded.

    python benchmarks/gpu_check.py                  # on an H100/H200: tests + the run matrix
    python benchmarks/gpu_check.py --dry-run        # on a CPU: the same code path, tiny shapes (CI)
    python benchmarks/gpu_check.py --only full_compiled_packed --skip-tests   # one run

What it runs, all in this one process (imports once):

1. ``python -m pytest -q -m gpu tests/`` (a subprocess; skipped with --dry-run / --skip-tests).
2. For each run of the matrix, ``recipes/simpo_lora_single_device.py`` or
   ``recipes/simpo_full_distributed.py`` (one process, its own 1-process group), from the shipped
   ``configs/llama3_2/1B_simpo_*.yaml`` (dry run: ``configs/tiny/simpo_*.yaml``, CPU, fp32) with
   overrides: random weights of torchtune's base builder built seeded on the CPU
   (:class:`RandomCheckpointer`), the ``w<id>`` tokenizer of ``benchmarks/wordtok.py``, a seeded
   jsonl of UltraFeedback-like lengths, no eval, no checkpoint written.

It prints, and writes as Markdown to ``--out``, one row per run: median step time, tokens/s,
``torch.cuda.max_memory_allocated`` and model FLOPs utilization (formula in the report's header),
then the issue's two targets with met/missed. A run that fails is a row with its error; the
script goes on and exits 1 at the end (also when the gpu tests fail).

Two kinds of run:

- **varying lengths** (``*_varying``, run first): every step new pairs of UltraFeedback-like
  lengths (benchmarks/make_pref_data.py's distribution: a pair median ~1,030 tokens, p99 ~4x),
  5 first steps + ``--varying-steps`` (50) more, packed and padded, full and LoRA, compiled. What
  a real run meets: a new micro-batch length nearly every step. Reported: compile events
  (torch._dynamo's compiled graphs) after the first 5 steps (target 0: the packed layout's
  FlexAttention is compiled once with dynamic shapes, prefopt/attention.py; the decoder layers
  by torch.compile's automatic dynamic shapes, on the second length), the peak memory of the
  whole run against that of its first 5 steps (target <= 1.1x: no attention that materialises
  [b, heads, L, L] half-way), tokens/s and MFU over all steps after the first 5.
- **fixed batch** (the rest): every step trains on the same 16 pairs (4 micro-batches of 4, in
  the same order), so that every measured step is the same work: the clean MFU figure.

3. Then the decoding line (``decode_eager``, ``decode_compiled``; benchmarks/_decode.py): the
   on-policy sampler on the same 1B model, bf16, tokens/s and peak memory, eager and with a
   compiled decode step.
4. Last, the scoring line (``score_rows``, ``score_one_at_a_time``; benchmarks/_score.py): a
   one-output head on the same 1B model scoring a prompt's 5 responses in one row against one
   conversation at a time, bf16, tokens/s and peak memory.
"""

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._decode import DECODE_RUNS, DRY_DECODE_RUNS, render_decode, run_decode  # noqa: E402
from benchmarks._score import DRY_SCORE_RUNS, SCORE_RUNS, render_score, run_score  # noqa: E402

# Nothing downloaded: the hub stays off for everything this process (and its pytest) imports.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.md"
DEFAULT_DRY_OUT = REPO / "benchmarks" / "results" / "gpu_check_dry_run.md"  # never overwrites a GPU report
LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
             "lora_dropout", "use_dora", "quantize_base")

# Dense bf16 tensor-core peaks (NVIDIA data sheets, without sparsity), matched on
# torch.cuda.get_device_name(); the first match wins, so the specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # SXM
    ("A100", 312.0),
]

# name: (recipe, compile, activation checkpointing, packed). The two rows the targets read run
# first: a run cut short by a time limit still leaves them in the report (written after each run).
MATRIX = {
    "full_compiled_packed": ("full", True, False, True),
    "lora_compiled_packed": ("lora", True, False, True),
    "full_compiled_padded": ("full", True, False, False),
    "full_compiled_ac_packed": ("full", True, True, True),
    "full_eager_packed": ("full", False, False, True),
    "lora_compiled_padded": ("lora", True, False, False),
    "lora_compiled_ac_packed": ("lora", True, True, True),
    "lora_eager_packed": ("lora", False, False, True),
    "lora_eager_padded": ("lora", False, False, False),
}
# --dry-run: the same matrix without compile (a compiled run took 98-228 s on 2 shared CPU cores): the
# compiled rows' other settings stay (AC packed for both recipes, full padded)
DRY_MATRIX = {
    "lora_eager_packed": ("lora", False, False, True),
    "lora_eager_padded": ("lora", False, False, False),
    "lora_eager_ac_packed": ("lora", False, True, True),
    "full_eager_packed": ("full", False, False, True),
    "full_eager_padded": ("full", False, False, False),
    "full_eager_ac_packed": ("full", False, True, True),
}
# the rows the issue's targets are read from (dry run: their uncompiled stand-ins)
MFU_TARGET = ("full_compiled_packed", 0.45)
MEMORY_TARGET = ("lora_compiled_packed", "full_compiled_packed", 0.5)
DRY_TARGET_ROWS = {"full_compiled_packed": "full_eager_packed", "lora_compiled_packed": "lora_eager_packed"}

# Varying lengths (see the module docstring): (recipe, compile, AC, packed, varying). Run first.
VARYING_MATRIX = {
    "full_compiled_packed_varying": ("full", True, False, True, True),
    "lora_compiled_packed_varying": ("lora", True, False, True, True),
    "full_compiled_padded_varying": ("full", True, False, False, True),
    "lora_compiled_padded_varying": ("lora", True, False, False, True),
}
# --dry-run: the same code path uncompiled, both recipes and both layouts
DRY_VARYING_MATRIX = {
    "lora_eager_packed_varying": ("lora", False, False, True, True),
    "full_eager_padded_varying": ("full", False, False, False, True),
}
VARYING_FIRST = 5  # "after the first 5 steps": compiles and the memory peak are compared to these
PEAK_RATIO_TARGET = 1.1


# ------------------------------------------------------------------------------------------------
# components named in the generated configs


_STATE_DICTS: Dict[str, Dict[str, Any]] = {}  # one random model per shape and seed, kept for all runs


class RandomCheckpointer:
    """A checkpointer that reads nothing: ``load_checkpoint()`` gives the state dict of
    torchtune's base builder ``builder(**model_args)`` built on the CPU from ``seed`` (torchtune's
    own initialisation), in ``dtype``, as a real bf16 checkpoint would arrive; ``save_checkpoint``
    writes nothing. The state dict is built once per process and shape, and shared by the runs."""

    def __init__(
        self,
        builder: str,
        model_args: Optional[Dict[str, Any]] = None,
        seed: int = 0,
        dtype: str = "bf16",
        should_load_recipe_state: bool = False,
        resume_from_checkpoint: bool = False,
    ) -> None:
        if should_load_recipe_state or resume_from_checkpoint:
            raise ValueError("RandomCheckpointer has no recipe state to resume from")
        self._builder = builder
        self._model_args = dict(model_args or {})
        self._seed = seed
        self._dtype = dtype

    def load_checkpoint(self) -> Dict[str, Any]:
        import torch
        from torchtune import config as tt_config
        from torchtune import training

        key = json.dumps([self._builder, self._model_args, self._seed, self._dtype], sort_keys=True, default=str)
        if key not in _STATE_DICTS:
            fn = tt_config._utils._get_component_from_path(self._builder)
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self._dtype]
            torch.manual_seed(self._seed)
            with training.set_default_dtype(dtype), torch.device("cpu"):
                model = fn(**self._model_args)
            _STATE_DICTS[key] = {k: v.detach() for k, v in model.state_dict().items()}
            del model
        return {training.MODEL_KEY: dict(_STATE_DICTS[key])}  # a new dict: the recipe may del from it

    def save_checkpoint(self, state_dict: Dict[str, Any], epoch: int, **kwargs: Any) -> None:
        return None


class RecordingLogger:
    """A torchtune metric logger that keeps every logged dict with the time it arrived.

    The recipes call ``log_dict`` once per optimizer step (``log_every_n_steps: 1``), after the
    step's host sync; the CUDA queue is drained here as well (the LoRA recipe's optimizer step is
    queued after its sync), so the difference between two stamps is one whole step: data,
    forward + backward of every micro-batch, clipping, optimizer, the recipe's own logging."""

    def __init__(self) -> None:
        self.records: List[Dict[str, Any]] = []

    def log_config(self, config: Any) -> None:
        pass

    def log(self, name: str, data: Any, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        import torch
        from torch._dynamo.utils import counters

        from prefopt.attention import flex_compile_count

        stamp = {"graphs": counters["stats"]["unique_graphs"], "flex_compiles": flex_compile_count()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            stamp["peak_bytes"] = torch.cuda.max_memory_allocated()
        self.records.append({"t": time.perf_counter(), "step": step, **stamp,
                             **{k: _scalar(v) for k, v in payload.items()}})

    def close(self) -> None:
        pass


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


class CountingLoader:
    """Wraps the recipe's DataLoader (after setup) and records what each micro-batch holds, for
    the token and FLOP counts: the recipe's ``num_tokens``, the positions the model computes,
    the scored tokens, the pairs."""

    def __init__(self, loader: Any, sink: List[Dict[str, int]]) -> None:
        self._loader = loader
        self._sink = sink

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            plan = batch["plan"]
            counted = int(batch["num_tokens"])
            self._sink.append({
                "counted": counted,  # prompt + chosen + rejected tokens of each pair (prompt twice), no padding
                # packed: each prompt once; padded: every non-padding position (the prompt twice)
                "computed": int(batch["packed_tokens"]) if "packed_tokens" in batch else counted,
                "scored": int(plan.seq_num_tokens.sum()),
                "pairs": int(batch["rows"].numel()),
                "positions": int(batch["tokens"].numel()),  # padding included: the shape that runs
            })
            yield batch


# ------------------------------------------------------------------------------------------------
# data


def _lognormal_quantiles(n: int, median: float, sigma: float, rng: random.Random) -> List[float]:
    """n values at the quantiles (i + 0.5) / n of a log-normal, shuffled: a small sample that
    still has the distribution's body and tail (a random draw of 16 can miss either)."""
    nd = statistics.NormalDist()
    vals = [median * math.exp(sigma * nd.inv_cdf((i + 0.5) / n)) for i in range(n)]
    rng.shuffle(vals)
    return vals


def make_pairs(n_pairs: int, vocab: int, max_seq_len: int, prompt_median: float, response_median: float,
               seed: int) -> List[Dict[str, Any]]:
    """``n_pairs`` preference pairs of ``w<id>`` words with UltraFeedback-like lengths: log-normal
    prompt and response lengths (prompt/response medians 0.4), each sequence (BOS + prompt +
    response + EOS) at most ``max_seq_len`` tokens, so the dataset truncates nothing."""
    rng = random.Random(seed)
    prompts = _lognormal_quantiles(n_pairs, prompt_median, 1.0, rng)
    chosen = _lognormal_quantiles(n_pairs, response_median, 0.8, rng)
    rejected = _lognormal_quantiles(n_pairs, response_median, 0.8, rng)
    return _word_pairs(zip(prompts, chosen, rejected), vocab, max_seq_len, rng)


def _word_pairs(lengths, vocab: int, max_seq_len: int, rng: random.Random) -> List[Dict[str, Any]]:
    """Pairs of random ``w<id>`` words of the (prompt, chosen, rejected) ``lengths``, cut so that
    each sequence (BOS + prompt + response + EOS) is at most ``max_seq_len`` tokens."""
    from benchmarks.wordtok import FIRST_WORD_ID, words

    pairs = []
    for p, c, r in lengths:
        p = max(1, min(int(p), max_seq_len // 2))
        c, r = (max(1, min(int(x), max_seq_len - 2 - p)) for x in (c, r))
        ids = lambda k: [rng.randrange(FIRST_WORD_ID, vocab) for _ in range(k)]  # noqa: E731
        user = {"role": "user", "content": words(ids(p))}
        pairs.append({
            "chosen": [user, {"role": "assistant", "content": words(ids(c))}],
            "rejected": [user, {"role": "assistant", "content": words(ids(r))}],
            "lengths": (p, c, r),
        })
    return pairs


def make_varying_pairs(n_pairs: int, vocab: int, max_seq_len: int, scale: float, seed: int) -> List[Dict[str, Any]]:
    """``n_pairs`` distinct pairs of ``w<id>`` words with benchmarks/make_pref_data.py's length
    distribution (log-normal words per part at its medians and sigma, ~1.9 tokens of the tiny
    tokenizer per word: a pair median ~1,030 tokens), times ``scale`` (the dry run's tiny model),
    each sequence at most ``max_seq_len`` tokens. Random draws: a run meets the body and the tail."""
    from benchmarks.make_pref_data import MEDIAN_WORDS, SIGMA

    rng = random.Random(seed)
    lengths = ((scale * 1.9 * MEDIAN_WORDS[k] * math.exp(rng.gauss(0.0, SIGMA)) for k in ("prompt", "chosen", "rejected"))
               for _ in range(n_pairs))
    return _word_pairs((tuple(x) for x in lengths), vocab, max_seq_len, rng)


def write_jsonl(pairs: List[Dict[str, Any]], repeats: int, path: Path) -> None:
    """The same pairs, in the same order, ``repeats`` times: with shuffle off, every optimizer
    step gets the same micro-batches (see the module docstring)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(repeats):
            for p in pairs:
                f.write(json.dumps({"chosen": p["chosen"], "rejected": p["rejected"]}) + "\n")


# ------------------------------------------------------------------------------------------------
# configs


def _settings(dry_run: bool) -> Dict[str, Any]:
    if dry_run:
        return dict(
            lora_yaml=REPO / "configs/tiny/simpo_lora.yaml", full_yaml=REPO / "configs/tiny/simpo_full.yaml",
            device="cpu", dtype="fp32", vocab=512, max_seq_len=128, max_prompt_len=96,
            prompt_median=8.0, response_median=20.0, batch_size=4, grad_accum=2, varying_scale=0.05,
        )
    # The shipped 1B configs' micro-batch (batch_size 4); 4 micro-batches per optimizer step, as
    # the full config has per GPU: 16 pairs per step (the global batch of 128 needs 8 GPUs).
    # Lengths: prompt median 52, response median 130 (ratio 0.4); a pair (prompt once, two
    # responses) then has a median of ~400 tokens; sequences are capped at the 2048 limit.
    return dict(
        lora_yaml=REPO / "configs/llama3_2/1B_simpo_lora_single_device.yaml",
        full_yaml=REPO / "configs/llama3_2/1B_simpo_full.yaml",
        device="cuda", dtype="bf16", vocab=128256, max_seq_len=2048, max_prompt_len=1800,
        prompt_median=52.0, response_median=130.0, batch_size=4, grad_accum=4, varying_scale=1.0,
    )


def _base_builder(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The base (non-LoRA) builder and its arguments for a recipe's model block:
    ``...lora_llama3_2_1b`` -> ``...llama3_2_1b``, the LoRA arguments dropped."""
    path = str(model_cfg["_component_"])
    module, _, fn = path.rpartition(".")
    if fn.startswith("lora_"):
        fn = fn[len("lora_"):]
    args = {k: v for k, v in model_cfg.items() if k != "_component_" and k not in LORA_KEYS}
    return {"builder": f"{module}.{fn}", "model_args": args}


def make_config(spec: tuple, s: Dict[str, Any], data_file: Path, out_dir: Path, steps: int, seed: int,
                cache_dir: Optional[Path] = None):
    from omegaconf import OmegaConf

    recipe, compile_, ac, packed = spec[:4]
    cfg = OmegaConf.load(s["lora_yaml"] if recipe == "lora" else s["full_yaml"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    over = {
        "output_dir": str(out_dir),  # a fresh folder per run: the recipes refuse a used one
        "tokenizer": {"_component_": "benchmarks.wordtok.WordTokenizer", "vocab_size": s["vocab"], "max_seq_len": None},
        "checkpointer": {"_component_": "benchmarks.gpu_check.RandomCheckpointer", **_base_builder(model),
                         "seed": seed, "dtype": s["dtype"]},
        "dataset": {"_component_": "prefopt.data.preference_dataset", "source": "json", "data_files": str(data_file),
                    "split": "train", "max_seq_len": s["max_seq_len"], "max_prompt_len": s["max_prompt_len"],
                    # datasets' Arrow cache in the work folder, not ~/.cache (removed with it)
                    **({"cache_dir": str(cache_dir)} if cache_dir else {})},
        "eval_dataset": None,
        "eval_every_n_steps": None,
        "save_every_n_steps": None,
        "metric_logger": {"_component_": "benchmarks.gpu_check.RecordingLogger"},
        "log_every_n_steps": 1,
        # torchtune's get_memory_stats resets the CUDA peak at every log: it would hide the peak
        "log_peak_memory_stats": False,
        "seed": seed,
        "shuffle": False,  # the jsonl's order (fixed batch: the same micro-batches every step)
        "batch_size": s["batch_size"],
        "gradient_accumulation_steps": s["grad_accum"],
        "epochs": 1,
        "max_steps_per_epoch": steps,
        "device": s["device"],
        "dtype": s["dtype"],
        "compile": compile_,
        "enable_activation_checkpointing": ac,
        "enable_activation_offloading": False,
        "packed": packed,
        "resume_from_checkpoint": False,
        # random weights: a step whose log-probs all look alike must not stop a timing run
        "on_collapse": "warn",
    }
    for k, v in over.items():
        cfg[k] = v  # assignment replaces a whole block (a merge would keep e.g. checkpoint_dir)
    return cfg


# ------------------------------------------------------------------------------------------------
# one run


def model_shape(model: Any, adapter_ids: set) -> Dict[str, int]:
    """N (parameters of the decoder layers and the final norm: no embedding, no output layer),
    adapter parameters, L, d, V, from the built model (FSDP's DTensors count their full size)."""
    n_body = n_adapter = 0
    for name, p in model.named_parameters():
        parts = [x for x in name.split(".") if x not in ("_checkpoint_wrapped_module", "_orig_mod")]
        if id(p) in adapter_ids:
            n_adapter += p.numel()
        elif parts[0] not in ("tok_embeddings", "output"):
            n_body += p.numel()
    emb = model.tok_embeddings
    return {"N": n_body, "N_adapter": n_adapter, "L": len(model.layers), "d": emb.embedding_dim, "V": emb.num_embeddings}


def step_flops(recipe: str, shape: Dict[str, int], mb: List[Dict[str, int]]) -> float:
    """Model FLOPs of one optimizer step (PaLM, Chowdhery et al. 2022, appendix B), over its
    micro-batches ``mb``: T positions computed, T_s scored tokens, S mean sequence length.
    full: 6·N·T + 6·d·V·T_s + 12·L·d·S·T.  LoRA: 4·N·T + 4·d·V·T_s + 6·N_a·T + 12·L·d·S·T (frozen
    weights: forward + input gradient, no weight gradient)."""
    N, Na, L, d, V = (shape[k] for k in ("N", "N_adapter", "L", "d", "V"))
    T = sum(m["computed"] for m in mb)
    Ts = sum(m["scored"] for m in mb)
    S = sum(m["counted"] for m in mb) / (2 * sum(m["pairs"] for m in mb))
    w = 6 if recipe == "full" else 4
    return w * N * T + w * d * V * Ts + (6 * Na * T if recipe == "lora" else 0) + 12 * L * d * S * T


def run_one(name: str, spec: tuple, s: Dict[str, Any], data_file: Path, work: Path, steps: int, warmup: int, seed: int,
            peak_tflops: Optional[float]) -> Dict[str, Any]:
    import torch

    recipe_kind, compile_, ac, packed = spec[:4]
    varying = len(spec) > 4 and spec[4]
    row: Dict[str, Any] = {"name": name, "recipe": recipe_kind, "compile": compile_, "ac": ac,
                           "layout": "packed" if packed else "padded", "varying": varying}
    out_dir = work / name
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = make_config(spec, s, data_file, out_dir, warmup + steps, seed, cache_dir=work / "hf_datasets_cache")
    cuda = s["device"] == "cuda"
    # Each run compiles its own graphs: without a reset, the decoder layer's code object collects
    # the graphs of earlier runs and hits the recompile limit (8), after which it runs uncompiled.
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        row["baseline_gib"] = torch.cuda.memory_allocated() / 2**30
    t_start = time.perf_counter()
    recipe = None
    try:
        if recipe_kind == "lora":
            from recipes.simpo_lora_single_device import SimPORecipeSingleDevice as Cls
        else:
            from recipes.simpo_full_distributed import SimPORecipeDistributed as Cls
        recipe = Cls(cfg)
        recipe.setup(cfg)
        # No checkpoint is written: the epoch-end save would write GBs (the merged model, the
        # sharded optimizer state) and time the disk, not the step.
        recipe.save_checkpoint = lambda **kw: None
        batches: List[Dict[str, int]] = []
        recipe._dataloader = CountingLoader(recipe._dataloader, batches)
        logger = recipe._metric_logger
        shape = model_shape(recipe._model, {id(p) for p in getattr(recipe, "_adapter_params", {}).values()})
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the peak of train() only: setup's is not a step's
        recipe.train()
        if cuda:
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 - row["baseline_gib"]
        recipe.cleanup()
        row.update(_timings(recipe_kind, shape, logger.records, batches, s["grad_accum"], warmup, peak_tflops,
                            varying=varying))
        if varying:
            row.update(_varying_stats(logger.records, row.get("baseline_gib", 0.0)))
    except Exception as e:  # noqa: BLE001 - a failing run is a row; the others still run
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        row["traceback"] = traceback.format_exc()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # the full recipe's group, if it died mid-way
            dist.destroy_process_group()
        lock = getattr(recipe, "_lock", None)
        if lock is not None:
            lock.close()
    finally:
        row["wall_s"] = time.perf_counter() - t_start
        del recipe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def _varying_stats(records: List[Dict[str, Any]], baseline_gib: float) -> Dict[str, Any]:
    """Compile events after the first VARYING_FIRST steps, and the peak memory of the run against
    that of its first VARYING_FIRST steps (CUDA only), from the logger's per-step stamps."""
    train = [r for r in records if "tokens_per_second" in r or "tokens_per_second_per_device" in r]
    first, last = train[VARYING_FIRST - 1], train[-1]
    out = {"graphs_first": first["graphs"], "compiles_after_first": last["graphs"] - first["graphs"],
           "flex_compiles": last["flex_compiles"]}
    if "peak_bytes" in last:
        out["peak_first_gib"] = first["peak_bytes"] / 2**30 - baseline_gib
        out["peak_run_gib"] = last["peak_bytes"] / 2**30 - baseline_gib
        out["peak_ratio"] = out["peak_run_gib"] / out["peak_first_gib"]
    return out


def _timings(recipe: str, shape: Dict[str, int], records: List[Dict[str, Any]], batches: List[Dict[str, int]],
             grad_accum: int, warmup: int, peak_tflops: Optional[float], varying: bool = False) -> Dict[str, Any]:
    train = [r for r in records if "tokens_per_second" in r or "tokens_per_second_per_device" in r]
    if len(train) <= warmup:
        raise RuntimeError(f"{len(train)} steps logged, not more than the {warmup} warm-up steps")
    # step k's time: from the stamp of step k-1 to the stamp of step k (so warmup >= 1)
    times = [train[k]["t"] - train[k - 1]["t"] for k in range(max(warmup, 1), len(train))]
    steps = [batches[k * grad_accum:(k + 1) * grad_accum] for k in range(max(warmup, 1), len(train))]
    median = statistics.median(times)
    counted = statistics.mean(sum(m["counted"] for m in st) for st in steps)
    flops = statistics.mean(step_flops(recipe, shape, st) for st in steps)
    # fixed batch: every step the same work, over the median step; varying lengths: totals over
    # the steps' total time (a median step and a mean step's tokens would not match)
    per_step = statistics.mean(times) if varying else median
    tflops = flops / per_step / 1e12
    return {
        "steps": len(times),
        "median_s": median,
        "tokens_per_s": counted / per_step,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        "flops_per_token": flops / counted,
        "tokens_per_step": counted,
        "shape": shape,
        "loss": train[-1].get("loss"),
    }


# ------------------------------------------------------------------------------------------------
# report


def peak_for(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def run_gpu_tests() -> Dict[str, Any]:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"rc": proc.returncode, "summary": summary, "failed": failed, "wall_s": time.perf_counter() - t0,
            "tail": (proc.stdout + proc.stderr)[-4000:]}


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render(rows: List[Dict[str, Any]], info: Dict[str, Any], tests: Optional[Dict[str, Any]], args,
           pending: Optional[List[str]] = None) -> str:
    peak = info["peak_tflops"]
    decode_rows = [r for r in rows if r["name"] in DECODE_RUNS]
    score_rows = [r for r in rows if r["name"] in SCORE_RUNS]
    rows = [r for r in rows if r["name"] not in DECODE_RUNS and r["name"] not in SCORE_RUNS]
    shape = next((r["shape"] for r in rows if "shape" in r), None)
    out = [f"# GPU check{' (dry run: CPU, fp32, tiny shapes; the numbers mean nothing)' if args.dry_run else ''}", ""]
    out += [f"- date: {info['date']}", f"- device: {info['device']}",
            f"- torch {info['torch']}, CUDA {info['cuda']}, torchtune {info['torchtune']}, python {info['python']}",
            f"- commit: {info['commit']}", f"- command: `{info['command']}`", f"- total wall time: {info['total_s']:.0f} s", ""]
    if tests is not None:
        out += [f"`pytest -q -m gpu tests/`: **{tests['summary']}** ({tests['wall_s']:.0f} s)"]
        out += [f"- {ln}" for ln in tests["failed"]] + [""]
    elif not args.dry_run:
        out += ["`pytest -m gpu`: skipped (--skip-tests)", ""]
    s = info["settings"]
    out += [
        f"Model: {info['model']} with random weights (torchtune's builder, seed {args.seed}); "
        + (f"N = {shape['N']:,} (decoder layers + final norm), L = {shape['L']}, d = {shape['d']}, V = {shape['V']}. " if shape else "")
        + f"{s['dtype']} on {s['device']}; AdamW; fixed-batch runs: {args.warmup} warm-up + {args.steps} measured optimizer steps, "
        f"each {s['grad_accum']} micro-batches of {s['batch_size']} pairs, the same {s['batch_size'] * s['grad_accum']} pairs "
        f"every step ({info['data']}); varying-length runs (`*_varying`): {VARYING_FIRST} first + {args.varying_steps} measured "
        f"steps of new pairs each (below).",
        "",
        "- **step s**: median over the measured steps of the time between two of the recipe's per-step logs (CUDA "
        "synchronised): data, forward + backward of every micro-batch, clipping, optimizer.",
        "- **tokens/s**: tokens per step / median step; tokens = the recipes' `num_tokens` (prompt + chosen and prompt + "
        "rejected of every pair, BOS/EOS included, no padding), counted here from the batches: the same for both layouts.",
        "- **peak GiB**: `torch.cuda.max_memory_allocated()` over `train()` (setup excluded; reset just before).",
        "- **TFLOP/s, MFU**: model FLOPs per step / median step (PaLM, Chowdhery et al. 2022, app. B). "
        "full: 6·N·T + 6·d·V·T_s + 12·L·d·S·T; LoRA: 4·N·T + 4·d·V·T_s + 6·N_a·T + 12·L·d·S·T "
        "(a frozen weight costs forward + input gradient, 4 FLOPs per token, no weight gradient). "
        "T = positions the model computes, padding excluded (packed: each prompt once; padded: twice); T_s = scored "
        "response tokens (the output layer runs on those only); N_a = adapter parameters; S = mean sequence length "
        "(prompt + one response). Activation-checkpointing recompute is not counted (MFU, not HFU). "
        + (f"Peak: {peak:g} TFLOP/s (dense bf16 of {info['device']})." if peak else
           "Peak: n/a (device not in the table of known peaks: MFU n/a; pass --peak-tflops)."),
        "",
        "| run | recipe | compile | AC | layout | steps | step s | tokens/s | peak GiB | TFLOP/s | MFU | wall s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = r.get("error", "").replace("|", "\\|")
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        out.append(
            f"| {r['name']} | {r['recipe']} | {'yes' if r['compile'] else 'no'} | {'yes' if r['ac'] else 'no'} | {r['layout']} "
            f"| {r.get('steps', '')} | {_fmt(r.get('median_s'), '.4f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} "
            f"| {_fmt(r.get('peak_gib'), '.2f')} | {_fmt(r.get('tflops'), '.3g')} | {_fmt(mfu, '.1f')}{'' if mfu is None else ' %'} "
            f"| {r['wall_s']:.0f} | {err} |"
        )
    varying = [r for r in rows if r.get("varying")]
    if varying:
        out += [
            "", "Varying lengths (`*_varying` rows above: their step s is the median, tokens/s and MFU are totals over "
            f"the steps after the first {VARYING_FIRST}): {info['varying_data']}, new pairs every step.", "",
            f"- **compiles after step {VARYING_FIRST}**: torch._dynamo's compiled graphs (counters['stats']['unique_graphs']) "
            f"at the end of the run minus at the end of step {VARYING_FIRST}; **FlexAttention compiles**: the packed "
            "layout's (prefopt/attention.py), over the run.",
            f"- **peak first {VARYING_FIRST} / run**: `torch.cuda.max_memory_allocated()` at the end of step "
            f"{VARYING_FIRST} and of the run (the same reset before train()).", "",
            f"| varying run | graphs by step {VARYING_FIRST} | compiles after step {VARYING_FIRST} | FlexAttention compiles "
            f"| peak GiB first {VARYING_FIRST} | peak GiB run | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in varying:
            out.append(f"| {r['name']} | {r.get('graphs_first', 'n/a')} | {r.get('compiles_after_first', 'n/a')} "
                       f"| {r.get('flex_compiles', 'n/a')} | {_fmt(r.get('peak_first_gib'), '.2f')} "
                       f"| {_fmt(r.get('peak_run_gib'), '.2f')} | {_fmt(r.get('peak_ratio'), '.3f')} |")
    if decode_rows:
        out += render_decode(decode_rows, args.dry_run)
    if score_rows:
        out += render_score(score_rows, args.dry_run)
    if pending:
        out += ["", f"Still to run (report written mid-way): {', '.join(pending)}"]
    notes = [f"- {r['name']}: {r['baseline_gib']:.2f} GiB were still allocated before it (subtracted from its peak)"
             for r in rows if r.get("baseline_gib", 0) > 0.01]
    if notes:
        out += ["", *notes]
    out += ["", "Targets (issue):", ""]
    by = {r["name"]: r for r in rows}
    if args.dry_run:  # the same arithmetic on the uncompiled stand-ins, so that it is exercised
        by.update({real: by[dry] for real, dry in DRY_TARGET_ROWS.items() if dry in by and real not in by})
    name, goal = MFU_TARGET
    r = by.get(name)
    if r is None or r.get("mfu") is None:
        why = "not run" if r is None else r.get("error") or "no peak for this device"
        out.append(f"- MFU ≥ {goal:.0%} for {name if r is None else r['name']}: n/a ({why})")
    else:
        out.append(f"- MFU ≥ {goal:.0%} for {r['name']}: {r['mfu']:.1%} -> **{'met' if r['mfu'] >= goal else 'missed'}**")
    lo, full, ratio = MEMORY_TARGET
    a, b = by.get(lo), by.get(full)
    if a is None or b is None or a.get("peak_gib") is None or b.get("peak_gib") is None:
        out.append(f"- peak memory {lo} ≤ {ratio}× {full}: n/a (not both measured" + (" on CUDA)" if args.dry_run else ")"))
    else:
        q = a["peak_gib"] / b["peak_gib"]
        out.append(f"- peak memory {a['name']} ≤ {ratio}× {b['name']}: {a['peak_gib']:.2f} / {b['peak_gib']:.2f} GiB = {q:.2f}× "
                   f"-> **{'met' if q <= ratio else 'missed'}**")
    for r in varying:
        if "error" in r or "compiles_after_first" not in r:
            out.append(f"- {r['name']}: n/a ({r.get('error', 'not measured')})")
            continue
        n = r["compiles_after_first"]
        out.append(f"- compile events after step {VARYING_FIRST} = 0 for {r['name']}: {n} -> **{'met' if n == 0 else 'missed'}**")
        if r.get("peak_ratio") is None:
            out.append(f"- peak memory run ≤ {PEAK_RATIO_TARGET}× first {VARYING_FIRST} steps for {r['name']}: n/a (not on CUDA)")
        else:
            q = r["peak_ratio"]
            out.append(f"- peak memory run ≤ {PEAK_RATIO_TARGET}× first {VARYING_FIRST} steps for {r['name']}: "
                       f"{r['peak_run_gib']:.2f} / {r['peak_first_gib']:.2f} GiB = {q:.3f}× -> "
                       f"**{'met' if q <= PEAK_RATIO_TARGET else 'missed'}**")
    if args.dry_run:
        out += ["", "Dry run: the same matrix without torch.compile (a compiled run takes 1.5-4 min on 2 CPU cores), "
                "tiny configs; it proves the code path, not the numbers."]
    return "\n".join(out) + "\n"


def _write(report: str, rows, info, tests, args) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "tests": tests, "rows": [
            {k: v for k, v in r.items() if k != "traceback"} for r in rows]}, indent=1, default=str))


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + (" (uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, tiny configs, no compile, no gpu tests")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    p.add_argument("--out", type=Path, default=None,
                   help=f"Markdown report (default {DEFAULT_OUT.relative_to(REPO)}; dry run {DEFAULT_DRY_OUT.relative_to(REPO)})")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument("--only", nargs="+", metavar="RUN", help=f"these runs only: {', '.join({**VARYING_MATRIX, **MATRIX, **DECODE_RUNS, **SCORE_RUNS})} "
                   f"(dry run: {', '.join({**DRY_VARYING_MATRIX, **DRY_MATRIX, **DRY_DECODE_RUNS, **DRY_SCORE_RUNS})})")
    p.add_argument("--steps", type=int, default=None, help="measured steps per fixed-batch run (default 8; dry run 2)")
    p.add_argument("--varying-steps", type=int, default=None,
                   help=f"steps after the first {VARYING_FIRST} per varying-length run (default 50; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per run, >= 1 (default 3; dry run 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak to divide by (default: from the device name)")
    p.add_argument("--workdir", type=Path, default=None, help="data and run folders (default: a temp dir, removed)")
    a = p.parse_args(argv)
    a.out = a.out or (DEFAULT_DRY_OUT if a.dry_run else DEFAULT_OUT)
    a.steps = a.steps or (2 if a.dry_run else 8)
    a.varying_steps = a.varying_steps or (2 if a.dry_run else 50)
    a.warmup = a.warmup or (1 if a.dry_run else 3)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (a step's time is measured from the end of the previous one)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    tests = None
    if not args.dry_run and not args.skip_tests:
        # First, in a child process, before this one touches the GPU.
        print("running pytest -q -m gpu tests/ ...", flush=True)
        tests = run_gpu_tests()
        print(tests["tail"] if tests["rc"] else tests["summary"], flush=True)

    import torch
    import torchtune

    s = _settings(args.dry_run)
    if s["device"] == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    # --dry-run --only NAME also takes the compiled rows (slow on a CPU; the default leaves them out)
    default = ({**DRY_VARYING_MATRIX, **DRY_MATRIX, **DRY_DECODE_RUNS, **DRY_SCORE_RUNS} if args.dry_run
               else {**VARYING_MATRIX, **MATRIX, **DECODE_RUNS, **SCORE_RUNS})
    matrix = {**default, **VARYING_MATRIX, **MATRIX, **DECODE_RUNS, **SCORE_RUNS}
    unknown = sorted(set(args.only or ()) - set(matrix))
    if unknown:
        print(f"gpu_check: --only {unknown}: not runs of this mode; choose from {list(matrix)}", file=sys.stderr)
        return 2
    names = list(args.only) if args.only else list(default)
    device = torch.cuda.get_device_name() if s["device"] == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    peak = args.peak_tflops or (peak_for(device) if s["device"] == "cuda" else None)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="prefopt_gpu_check_"))
    pairs = make_pairs(s["batch_size"] * s["grad_accum"], s["vocab"], s["max_seq_len"], s["prompt_median"],
                       s["response_median"], args.seed)
    data_file = work / "data" / "train.jsonl"
    write_jsonl(pairs, args.warmup + args.steps, data_file)
    varying_pairs = make_varying_pairs((VARYING_FIRST + args.varying_steps) * s["batch_size"] * s["grad_accum"], s["vocab"],
                                       s["max_seq_len"], s["varying_scale"], args.seed)
    varying_file = work / "data" / "varying.jsonl"
    write_jsonl(varying_pairs, 1, varying_file)
    vpair_len = sorted(p + c + r + 3 for p, c, r in (x["lengths"] for x in varying_pairs))
    pair_len = [p + c + r + 3 for p, c, r in (x["lengths"] for x in pairs)]  # BOS + prompt + 2 x (response + EOS)
    seq_len = [p + x + 2 for p, c, r in (x["lengths"] for x in pairs) for x in (c, r)]
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
        "torch": torch.__version__, "cuda": torch.version.cuda or "none", "torchtune": torchtune.__version__,
        "python": platform.python_version(), "commit": _git_commit(), "peak_tflops": peak, "settings": s,
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "tiny Llama (configs/tiny)" if args.dry_run else "Llama-3.2-1B shape (torchtune llama3_2_1b)",
        "data": f"pair tokens (prompt once) median {statistics.median(pair_len):.0f}, max {max(pair_len)}; "
                f"sequence tokens median {statistics.median(seq_len):.0f}, max {max(seq_len)}",
        "varying_data": f"{len(varying_pairs)} distinct pairs, pair tokens (prompt once) median "
                        f"{statistics.median(vpair_len):.0f}, p90 {vpair_len[int(0.9 * len(vpair_len))]}, max {vpair_len[-1]}",
    }
    rows = []
    try:
        for name in names:
            print(f"--- {name} ...", flush=True)
            if name in DECODE_RUNS:
                row = run_decode(name, DECODE_RUNS[name], s, args.dry_run, args.seed)
            elif name in SCORE_RUNS:
                row = run_score(name, SCORE_RUNS[name], s, args.dry_run, args.seed)
            elif len(matrix[name]) > 4 and matrix[name][4]:  # varying lengths
                row = run_one(name, matrix[name], s, varying_file, work / "runs", args.varying_steps, VARYING_FIRST,
                              args.seed, peak)
            else:
                row = run_one(name, matrix[name], s, data_file, work / "runs", args.steps, args.warmup, args.seed, peak)
            rows.append(row)
            if "error" in row:
                print(row["traceback"], file=sys.stderr, flush=True)
            what = row.get("error") or (f"{row['tokens_per_s']:,.0f} tokens/s" if name in DECODE_RUNS or name in SCORE_RUNS
                                        else f"median step {row['median_s']:.4f} s")
            print(f"--- {name}: {what} ({row['wall_s']:.0f} s)", flush=True)
            # the report so far, after every run: a run killed by a time limit keeps what it measured
            info["total_s"] = time.perf_counter() - t0
            _write(render(rows, info, tests, args, pending=names[len(rows):]), rows, info, tests, args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    info["total_s"] = time.perf_counter() - t0
    report = render(rows, info, tests, args)
    _write(report, rows, info, tests, args)
    print("\n" + report)
    print(f"wrote {args.out}")
    failed = [r["name"] for r in rows if "error" in r]
    if failed or (tests is not None and tests["rc"] != 0):
        print(f"gpu_check: FAILED: {', '.join(failed) or 'none of the runs'}"
              + ("; pytest -m gpu failed" if tests is not None and tests["rc"] != 0 else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as the importable module, so that the components the configs name
    # (benchmarks.gpu_check.RandomCheckpointer, ...) are this same module.
    from benchmarks.gpu_check import main as _main

    sys.exit(_main())
