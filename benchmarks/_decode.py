"""The device check's decoding line: ``prefopt.generation.generate_batch`` (what the on-policy
pairs recipe samples with) on the shipped 1B config's model with random weights, bf16 on CUDA,
eager and with ``torch.compile`` on the one-token decode step; tokens/s and peak memory.

Run by ``benchmarks/gpu_check.py`` (rows ``decode_eager`` / ``decode_compiled``; ``--dry-run``:
the tiny config on the CPU, fp32). Each run: k samples of each prompt (princeton's sampling:
temperature 0.8, top_p 0.95), no stop token, so every row makes ``max_new_tokens`` tokens;
``warmup_batches`` batches of new prompts first (a compiled decode compiles there, and once more
there, once: its KV caches are ``max_prompt + max_new_tokens`` long in every batch, so its
shapes do not change), then ``timed_batches`` more, timed.
"""

import contextlib
import gc
import math
import random
import time
import traceback
from typing import Any, Dict

# name: compile the decode step?
DECODE_RUNS = {"decode_eager": False, "decode_compiled": True}
DRY_DECODE_RUNS = {"decode_eager": False}  # a compile takes minutes on 2 CPU cores


@contextlib.contextmanager
def run_as_row(row: Dict[str, Any], cuda: bool):
    """One run of the device check as a row of its report: Dynamo's caches reset before (each run
    compiles its own graphs), an exception recorded in the row (``error``, ``traceback``) instead
    of raised, so that the other runs still run; ``wall_s`` in any case, memory released after."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    t_start = time.perf_counter()
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a failing run is a row; the others still run
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        row["traceback"] = traceback.format_exc()
    finally:
        row["wall_s"] = time.perf_counter() - t_start
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def decode_settings(dry_run: bool) -> Dict[str, Any]:
    if dry_run:
        return dict(prompts_per_batch=2, k=2, max_new_tokens=8, prompt_median=8.0, max_prompt=32, warmup_batches=2,
                    timed_batches=2)
    # 8 prompts x k = 4 rows a batch (32 rows); prompts of the training data's median (52 tokens)
    return dict(prompts_per_batch=8, k=4, max_new_tokens=256, prompt_median=52.0, max_prompt=512, warmup_batches=2,
                timed_batches=3)


def _prompts(n: int, median: float, longest: int, vocab: int, rng: random.Random):
    lengths = [min(longest, max(2, int(median * math.exp(rng.gauss(0.0, 0.6))))) for _ in range(n)]
    return [[1] + [rng.randrange(3, vocab) for _ in range(m - 1)] for m in lengths]


def run_decode(name: str, compiled: bool, s: Dict[str, Any], dry_run: bool, seed: int) -> Dict[str, Any]:
    """One decoding row: ``s`` is gpu_check's settings (config, device, dtype, vocabulary)."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import config, training

    from benchmarks.gpu_check import _base_builder
    from prefopt.generation import generate_batch

    d = decode_settings(dry_run)
    row: Dict[str, Any] = {"name": name, "compile": compiled, **{k: d[k] for k in ("k", "max_new_tokens")},
                           "rows_per_batch": d["prompts_per_batch"] * d["k"]}
    cuda = s["device"] == "cuda"
    device, dtype = torch.device(s["device"]), training.get_dtype(s["dtype"])
    with run_as_row(row, cuda):
        base = _base_builder(OmegaConf.to_container(OmegaConf.load(s["lora_yaml"]).model))
        torch.manual_seed(seed)
        with training.set_default_dtype(dtype), device:
            model = config.instantiate(OmegaConf.create({"_component_": base["builder"], **base["model_args"]})).eval()
        row["model"] = base["builder"]
        vocab = model.tok_embeddings.num_embeddings
        step = torch.compile(model) if compiled else None
        rng = random.Random(seed)

        def batch():
            prompts = _prompts(d["prompts_per_batch"], d["prompt_median"], d["max_prompt"], vocab, rng)
            rows = [p for p in prompts for _ in range(d["k"])]
            out = generate_batch(model, rows, seeds=list(range(len(rows))), max_new_tokens=d["max_new_tokens"],
                                 temperature=0.8, top_p=0.95, device=device, cache_dtype=dtype, decode=step,
                                 cache_len=d["max_prompt"] + d["max_new_tokens"] if compiled else None)
            assert all(len(g.tokens) == d["max_new_tokens"] for g in out)
            return len(rows) * d["max_new_tokens"]

        for _ in range(d["warmup_batches"]):
            batch()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tokens = sum(batch() for _ in range(d["timed_batches"]))
        if cuda:
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        sec = time.perf_counter() - t0
        row.update(tokens=tokens, seconds=sec, tokens_per_s=tokens / sec,
                   compiles_while_timed=torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs)
    return row


def render_decode(rows, dry_run: bool):
    """The report's decoding section (Markdown lines)."""
    d = decode_settings(dry_run)
    out = ["", f"Decoding (`prefopt.generation.generate_batch`, the pairs recipe's sampler): the LoRA config's base model, "
           f"random weights; batches of {d['prompts_per_batch']} prompts x k = {d['k']} rows ({d['prompts_per_batch'] * d['k']} "
           f"rows; a prompt's prefill shared by its k rows), prompts of median {d['prompt_median']:.0f} tokens, "
           f"{d['max_new_tokens']} new tokens per row (temperature 0.8, top_p 0.95, no stop token); {d['warmup_batches']} "
           f"warm-up batches, then {d['timed_batches']} timed. tokens/s = generated tokens / seconds; peak GiB over the timed "
           "batches; compiled: `torch.compile(model)` runs every one-token step (the prefill stays eager), over KV caches "
           f"of one length ({d['max_prompt']} + {d['max_new_tokens']}).", "",
           "| decode run | compile | tokens/s | peak GiB | compiles while timed | wall s | error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("error", "").replace("|", "\\|")
        tps = "n/a" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
        peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        out.append(f"| {r['name']} | {'yes' if r['compile'] else 'no'} | {tps} | {peak} "
                   f"| {r.get('compiles_while_timed', 'n/a')} | {r['wall_s']:.0f} | {err} |")
    return out
