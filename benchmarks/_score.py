"""The device check's scoring line: ``prefopt.reward.RewardModel.score_ids`` (what the on-policy
pairs recipe and the judge score with) against one conversation at a time (princeton's
``reward_model_annotate.py``: ``model(input_ids)`` per response), on the shipped 1B config's model
with a one-output head and random weights, bf16 on CUDA; tokens/s and peak memory.

Run by ``benchmarks/gpu_check.py`` (rows ``score_rows`` / ``score_one_at_a_time``; ``--dry-run``:
the tiny config on the CPU, fp32). Each run scores the same conversations: ``prompts`` prompts of
on-policy lengths, each with ``k`` responses; ours lays a prompt's k responses out in one row
behind one copy of the prompt (FlexAttention with a BlockMask on CUDA, compiled in the warm-up),
``batch_size`` conversations a forward. The first ``warmup_prompts`` prompts' conversations are
scored first, untimed, on both sides.
"""

import math
import random
import time
from typing import Any, Dict, List

# name: batched (a prompt's responses in one row)?
SCORE_RUNS = {"score_rows": True, "score_one_at_a_time": False}
DRY_SCORE_RUNS = dict(SCORE_RUNS)


def score_settings(dry_run: bool) -> Dict[str, Any]:
    if dry_run:
        return dict(prompts=3, k=2, prompt_median=8.0, response_median=12.0, longest=40, batch_size=4, warmup_prompts=1)
    # princeton's k = 5; prompts and responses of on-policy lengths (UltraFeedback prompts ~150
    # tokens with the template, sampled responses ~400)
    return dict(prompts=24, k=5, prompt_median=150.0, response_median=400.0, longest=1024, batch_size=10,
                warmup_prompts=4)


def _conversations(s: Dict[str, Any], vocab: int, seed: int) -> List[List[int]]:
    rng = random.Random(seed)

    def length(median):
        return min(s["longest"], max(2, int(median * math.exp(rng.gauss(0.0, 0.5)))))

    seqs = []
    for _ in range(s["prompts"]):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(length(s["prompt_median"]) - 1)]
        seqs += [prompt + [rng.randrange(3, vocab) for _ in range(length(s["response_median"]))] for _ in range(s["k"])]
    return seqs


def run_score(name: str, batched: bool, s: Dict[str, Any], dry_run: bool, seed: int) -> Dict[str, Any]:
    """One scoring row: ``s`` is gpu_check's settings (config, device, dtype)."""
    import torch
    from omegaconf import OmegaConf
    from torchtune import training

    from benchmarks._decode import run_as_row
    from benchmarks.gpu_check import _base_builder
    from prefopt.reward import RewardModel, classifier

    d = score_settings(dry_run)
    row: Dict[str, Any] = {"name": name, "batched": batched, "k": d["k"], "prompts": d["prompts"] - d["warmup_prompts"]}
    cuda = s["device"] == "cuda"
    device, dtype = torch.device(s["device"]), training.get_dtype(s["dtype"])
    with run_as_row(row, cuda):
        base = _base_builder(OmegaConf.to_container(OmegaConf.load(s["lora_yaml"]).model))
        torch.manual_seed(seed)
        with training.set_default_dtype(dtype), device:
            model = classifier(base["builder"], 1, **base["model_args"]).eval()
        row["model"] = base["builder"]
        seqs = _conversations(d, model.tok_embeddings.num_embeddings, seed)
        groups = [i // d["k"] for i in range(len(seqs))]
        cut = d["warmup_prompts"] * d["k"]
        rm = RewardModel(model, None, batch_size=d["batch_size"], device=device)
        row["flex_attention"] = rm.flex_attention

        @torch.inference_mode()
        def alone(part):
            return [model(torch.tensor([x], device=device))[0, -1, 0].float().item() for x in part]

        def score(part, keys):
            return rm.score_ids(part, groups=keys) if batched else alone(part)

        with rm.packed():  # on the CPU: oneDNN's packed weights, as the recipes (no-op on CUDA)
            score(seqs[:cut], groups[:cut])  # warm-up: FlexAttention compiles here
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            scores = score(seqs[cut:], groups[cut:])
            if cuda:
                torch.cuda.synchronize()
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            sec = time.perf_counter() - t0
        tokens = sum(map(len, seqs[cut:]))
        row.update(tokens=tokens, seconds=sec, tokens_per_s=tokens / sec, scores_head=[round(x, 4) for x in scores[:3]])
    return row


def render_score(rows, dry_run: bool):
    """The report's scoring section (Markdown lines)."""
    d = score_settings(dry_run)
    out = ["", f"Reward scoring (`prefopt.reward.RewardModel.score_ids`, the pairs recipe's and the judge's): the LoRA "
           f"config's base model with a one-output head, random weights; {d['prompts'] - d['warmup_prompts']} prompts x "
           f"k = {d['k']} responses timed after {d['warmup_prompts']} prompts' warm-up, prompts of median "
           f"{d['prompt_median']:.0f} tokens, responses of median {d['response_median']:.0f}. `score_rows`: a prompt's k "
           f"responses in one row behind one copy of the prompt, {d['batch_size']} conversations a forward (FlexAttention "
           "with a BlockMask on CUDA); `score_one_at_a_time`: `model(input_ids)` per conversation (princeton's "
           "reward_model_annotate.py). tokens/s = conversation tokens / seconds.", "",
           "| score run | tokens/s | peak GiB | first scores | wall s | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        err = r.get("error", "").replace("|", "\\|")
        tps = "n/a" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
        peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        out.append(f"| {r['name']} | {tps} | {peak} | {r.get('scores_head', 'n/a')} | {r['wall_s']:.0f} | {err} |")
    by = {r["name"]: r for r in rows if r.get("tokens_per_s")}
    if "score_rows" in by and "score_one_at_a_time" in by:
        out += ["", f"scoring: **{by['score_rows']['tokens_per_s'] / by['score_one_at_a_time']['tokens_per_s']:.2f}x** "
                    "one at a time (the issue's target: 3x)."]
    return out
