# prefopt: judge what training did to a policy's generations. For held-out prompts, generate with
# the trained policy and with its starting point (greedy, and sampled as configured, the same
# seeds on both sides), score both with the same `reward` component, and report: the mean reward
# of each, the win rate of trained over start (ties half), response lengths (mean, median, p90
# tokens), the win rate within length buckets (a quality gain told from a length gain), and the
# share of degenerate outputs (empty, never stopping, repeated n-grams).
#
#   tune run recipes/judge_generations.py --config configs/tiny/judge.yaml [key=value ...]
#
# The trained policy is the LoRA recipe's epoch export (the merged model in epoch_<N>/) or its
# adapter (epoch_<N>/adapter/adapter_model.pt) applied to the starting weights.
# Writes into output_dir: judge.json (the figures), generations.jsonl (every response and its
# score), judge.txt (the table printed on the console) and config.yaml; the figures also go to
# the metric logger, and `prefopt plot <output_dir>` draws them.
#
# This file is meant to be copied and edited (`prefopt cp judge_generations .`): it depends on
# torchtune and the small `prefopt` library only.

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.modules.peft import get_merged_lora_ckpt

from prefopt.config import Key, at_least, non_negative, one_of, unit_interval, validate_config
from prefopt.cpu_linear import packed_linears
from prefopt.data.prompts import prompt_key
from prefopt.generation import check_prompts_fit, generate_batch, prompt_ids, row_seed, stop_token_ids
from prefopt.guards import check_device, lock_output_dir
from prefopt.judge import compare, format_table
from prefopt.resume import CONFIG_FILE, save_run_config
from prefopt.reward import build_reward, prompt_text, reward_bound_args, reward_settings
from prefopt.safe_load import load_checkpoint_file
from prefopt.teardown import run_script

log = utils.get_logger("INFO")


CONFIG_SPEC = {
    "output_dir": Key(str, doc="where judge.json, generations.jsonl and judge.txt go (e.g. <training run>/judge)"),
    "model": Key(component=True, doc="the policy's architecture: a plain torchtune decoder builder (no LoRA)"),
    "tokenizer": Key(component=True, doc="the policy's tokenizer (its chat template lays out the prompts)"),
    "start_checkpointer": Key(component=True, doc="the starting point's weights (what training started from)"),
    "trained_checkpointer": Key(component=True, default=None,
                                doc="the trained policy's weights, e.g. the LoRA recipe's merged export epoch_<N>/"),
    "adapter": Key((str, type(None)), default=None,
                   doc="or: the LoRA recipe's epoch_<N>/adapter/adapter_model.pt, merged into the starting weights"),
    "prompts": Key(component=True, doc="held-out prompts, e.g. prefopt.data.read_prompts"),
    "reward": Key(component=True, doc="prefopt.reward.reward_model, or any callable (prompt, response) -> float"),
    "greedy": Key(bool, default=True, doc="judge one greedy response per prompt"),
    "num_samples": Key(int, default=2, check=at_least(0), doc="sampled responses per prompt (0: none)"),
    "seed": Key(int, default=42, doc="sample j of a prompt uses seed + j, on both sides"),
    "temperature": Key(float, default=0.8, check=non_negative),
    "top_p": Key((float, type(None)), default=None, check=unit_interval),
    "top_k": Key((int, type(None)), default=None, check=at_least(1)),
    "max_new_tokens": Key(int, check=at_least(1)),
    "extra_stop_tokens": Key(list, default=[], doc="ids or one-token strings that also end a response"),
    "batch_size": Key(int, default=8, check=at_least(1), doc="rows per generation batch"),
    "length_tolerance": Key(int, default=2, check=at_least(0), doc="length buckets: |trained - start| <= this many tokens is 'similar'"),
    "ngram": Key(int, default=3, check=at_least(1), doc="degenerate: a word n-gram of this size repeated"),
    "max_ngram_repeats": Key(int, default=1, check=at_least(1), doc="degenerate: the n-gram occurs more often than this"),
    "step": Key(int, default=0, doc="the step the figures are logged at (e.g. the training run's last step)"),
    "device": Key(str, default="cpu"),
    "dtype": Key(str, default="fp32", check=one_of("fp32", "bf16")),
    "compile": Key(bool, default=False, doc="torch.compile each model's one-token decode steps (KV caches of one length: "
                                            "the longest prompt + max_new_tokens)"),
    "metric_logger": Key(component=True, default=None),
}
BOUND_ARGS = {
    "start_checkpointer": ("should_load_recipe_state", "resume_from_checkpoint"),
    "trained_checkpointer": ("should_load_recipe_state", "resume_from_checkpoint"),
    "reward": reward_bound_args,
}
REPORT, GENERATIONS, TABLE = "judge.json", "generations.jsonl", "judge.txt"


def _cross_checks(v: Dict[str, Any]) -> List[str]:
    problems = []
    if (v["trained_checkpointer"] is None) == (v["adapter"] is None):
        problems.append("trained_checkpointer / adapter: set exactly one (the merged export, or the adapter to merge "
                        "into start_checkpointer's weights)")
    if v["adapter"] is not None and not Path(v["adapter"]).is_file():
        problems.append(f"adapter: {v['adapter']} is not a file")
    if not v["greedy"] and v["num_samples"] == 0:
        problems.append("greedy / num_samples: nothing to judge (greedy=False and num_samples=0)")
    return problems


def merge_adapter(base: Dict[str, torch.Tensor], adapter_path: str) -> Dict[str, torch.Tensor]:
    """The starting weights with a torchtune-format LoRA adapter (``*.lora_a.weight``,
    ``*.lora_b.weight``) merged in; rank and alpha from the ``adapter_config.json`` beside it
    (as the LoRA recipe writes them).

    Raises:
        ValueError: no adapter_config.json, or an adapter key whose base weight is missing.
    """
    path = Path(adapter_path)
    cfg_path = path.with_name("adapter_config.json")
    if not cfg_path.is_file():
        raise ValueError(f"adapter: {cfg_path} not found (it gives the adapter's rank r and lora_alpha)")
    acfg = json.loads(cfg_path.read_text())
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        adapter = load_file(str(path))
    else:
        adapter = load_checkpoint_file(path)
    missing = sorted({k.rsplit(".lora_", 1)[0] + ".weight" for k in adapter} - set(base))
    if missing:
        raise ValueError(f"adapter: {path} adapts weights the starting model does not have (first {missing[:3]}): "
                         "an adapter of another model, or a PEFT-format file (use adapter_model.pt)")
    return get_merged_lora_ckpt({**base, **adapter}, rank=acfg["r"], alpha=acfg["lora_alpha"])


class JudgeRecipe:
    """Generate with the starting point and the trained policy, score both with one reward, and
    compare (prefopt.judge). The two models are loaded one after the other (never both in
    memory), then the reward is built and scores every response."""

    def __init__(self, cfg: DictConfig) -> None:
        v = validate_config(cfg, CONFIG_SPEC, bound_args=BOUND_ARGS, extra_checks=_cross_checks)
        self._cfg = v
        self._run_cfg = cfg
        check_device(v["device"])
        self._device = utils.get_device(device=v["device"])
        self._dtype = training.get_dtype(v["dtype"], device=self._device)
        self._output_dir = Path(v["output_dir"])
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_output_dir(self._output_dir)

    def setup(self, cfg: DictConfig) -> None:
        v = self._cfg
        self._metric_logger = config.instantiate(v["metric_logger"]) if v["metric_logger"] is not None else None
        if self._metric_logger is not None:
            self._metric_logger.log_config(cfg)
        self._tokenizer = config.instantiate(v["tokenizer"])
        self._prompt_set = config.instantiate(v["prompts"])
        self._prompts = self._prompt_set.prompts
        self._keys = [prompt_key(p) for p in self._prompts]
        self._prompt_ids = [prompt_ids(self._tokenizer, p) for p in self._prompts]
        try:
            self._stop = stop_token_ids(self._tokenizer, v["extra_stop_tokens"])
        except ValueError as e:
            raise ValueError(f"extra_stop_tokens: {e}") from None
        with torch.device("meta"):  # before any weight is read: the prompts fit the policy
            meta = config.instantiate(v["model"])
        limit, vocab = meta.max_seq_len, meta.tok_embeddings.num_embeddings
        del meta
        check_prompts_fit(self._prompt_ids, self._keys, v["max_new_tokens"], max_seq_len=limit, vocab_size=vocab)
        save_run_config(self._run_cfg, self._output_dir / CONFIG_FILE)
        log.info(f"{len(self._prompts)} held-out prompts; greedy={v['greedy']}, {v['num_samples']} samples each")

    def _load(self, which: str) -> torch.nn.Module:
        v = self._cfg
        block = v["start_checkpointer"] if which == "start" or v["trained_checkpointer"] is None else v["trained_checkpointer"]
        state = config.instantiate(block, should_load_recipe_state=False).load_checkpoint()[training.MODEL_KEY]
        if which == "trained" and v["adapter"] is not None:
            state = merge_adapter(state, v["adapter"])
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(v["model"])
        model.load_state_dict(state, strict=True)
        return model.eval()

    def _modes(self) -> List[Dict[str, Any]]:
        v = self._cfg
        modes = [{"name": "greedy", "temperature": 0.0, "seeds": [v["seed"]]}] if v["greedy"] else []
        if v["num_samples"]:
            modes.append({"name": "sampled", "temperature": v["temperature"],
                          "seeds": [v["seed"] + j for j in range(v["num_samples"])]})
        return modes

    def _generate(self, model: torch.nn.Module, mode: Dict[str, Any], decode=None) -> List[Dict[str, Any]]:
        """Every (prompt, seed) row of ``mode``, prompt-major: ``{"prompt_index", "seed",
        "text", "tokens", "stopped"}``; ``decode``: a compiled ``model`` for the one-token steps."""
        v = self._cfg
        cache_len = max(map(len, self._prompt_ids)) + v["max_new_tokens"] if decode is not None else None
        rows = [(i, s) for i in range(len(self._prompts)) for s in mode["seeds"]]
        out = []
        with packed_linears(model, enabled=decode is None):  # on CPU: oneDNN on weights packed once
            for b in range(0, len(rows), v["batch_size"]):
                chunk = rows[b:b + v["batch_size"]]
                gens = generate_batch(
                    model, [self._prompt_ids[i] for i, _ in chunk], seeds=[row_seed(s, self._keys[i]) for i, s in chunk],
                    max_new_tokens=v["max_new_tokens"], temperature=mode["temperature"], top_k=v["top_k"], top_p=v["top_p"],
                    stop_tokens=self._stop, pad_id=getattr(self._tokenizer, "pad_id", 0) or 0,
                    device=self._device, cache_dtype=self._dtype, decode=decode, cache_len=cache_len,
                )
                for (i, s), g in zip(chunk, gens):
                    out.append({"prompt_index": i, "seed": s, "text": self._tokenizer.decode(g.tokens),
                                "tokens": len(g.tokens), "stopped": g.stopped})
        return out

    def run(self) -> Dict[str, Any]:
        v = self._cfg
        t0 = time.perf_counter()
        modes = self._modes()
        gens: Dict[str, Dict[str, List[Dict[str, Any]]]] = {m["name"]: {} for m in modes}
        for side in ("start", "trained"):
            model = self._load(side)
            decode = torch.compile(model) if v["compile"] else None  # compiled once per model
            for m in modes:
                gens[m["name"]][side] = self._generate(model, m, decode)
            del model, decode
            gc.collect()
        reward = build_reward(v["reward"], device=self._device, dtype=self._dtype)
        report: Dict[str, Any] = {}
        lines = []
        # on CPU a reward model's linear layers are packed for oneDNN once, for every score call below
        with reward.packed():
            for m in modes:
                sides = {}
                for side in ("start", "trained"):
                    rows = gens[m["name"]][side]
                    scores = reward.score([self._prompts[r["prompt_index"]] for r in rows], [r["text"] for r in rows])
                    for r, s in zip(rows, scores):
                        r["score"] = s
                    sides[side] = {"scores": scores, "lengths": [r["tokens"] for r in rows],
                                   "texts": [r["text"] for r in rows], "stopped": [r["stopped"] for r in rows]}
                report[m["name"]] = compare(sides["trained"], sides["start"], length_tolerance=v["length_tolerance"],
                                            ngram=v["ngram"], max_ngram_repeats=v["max_ngram_repeats"])
                for a, b in zip(gens[m["name"]]["start"], gens[m["name"]]["trained"]):
                    lines.append(json.dumps({
                        "mode": m["name"], "prompt": prompt_text(self._prompts[a["prompt_index"]]), "seed": a["seed"],
                        "start": {k: a[k] for k in ("text", "score", "tokens", "stopped")},
                        "trained": {k: b[k] for k in ("text", "score", "tokens", "stopped")},
                    }, ensure_ascii=False) + "\n")
        result = {
            "modes": report,
            "prompts": len(self._prompts),
            "start": str(v["start_checkpointer"].get("checkpoint_dir")),
            "trained": str(v["adapter"] or v["trained_checkpointer"].get("checkpoint_dir")),
            "reward": reward_settings(reward),
            "sampling": {"temperature": v["temperature"], "top_p": v["top_p"], "top_k": v["top_k"],
                         "num_samples": v["num_samples"], "seed": v["seed"], "max_new_tokens": v["max_new_tokens"]},
            "seconds": time.perf_counter() - t0,
        }
        table = format_table(report)
        self._write(GENERATIONS, "".join(lines))
        self._write(REPORT, json.dumps(result, indent=2) + "\n")
        self._write(TABLE, table + "\n")
        print(table, flush=True)
        if self._metric_logger is not None:
            self._metric_logger.log_dict(metrics_of(report), step=v["step"])
        log.info(f"judged {len(self._prompts)} prompts in {result['seconds']:.1f} s; written to {self._output_dir / REPORT}")
        return result

    def _write(self, name: str, text: str) -> None:
        tmp = self._output_dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self._output_dir / name)

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        self._lock.close()


def metrics_of(report: Dict[str, Any]) -> Dict[str, float]:
    """The figures as flat metric-logger keys: ``judge/<mode>/<figure>`` (None figures left out)."""
    out: Dict[str, float] = {}
    for mode, r in report.items():
        p = f"judge/{mode}"
        out[f"{p}/win_rate"] = r["win_rate"]
        for side in ("start", "trained"):
            s = r[side]
            out[f"{p}/reward_{side}"] = s["mean_reward"]
            for k, x in s["length"].items():
                out[f"{p}/length_{k}_{side}"] = x
            for k, x in s["degenerate"].items():
                out[f"{p}/degenerate_{k}_{side}"] = x
        for b in r["length_buckets"]:
            out[f"{p}/win_rate_{b['bucket']}"] = b["win_rate"]
    return {k: float(x) for k, x in out.items() if x is not None}


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="JudgeRecipe", cfg=cfg)
    recipe = JudgeRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    # Run through runpy (`tune run` on one device, a sweep driver, a notebook's %run): returns as
    # torchtune's recipes do, and the caller goes on. As the process's own program (`python <this
    # file>`, or `python -m recipes.<name>` as torchrun starts each rank): a finished run ends the
    # process before native libraries' teardown, which has aborted finished runs (prefopt.teardown).
    sys.exit(run_script(recipe_main, __file__))
