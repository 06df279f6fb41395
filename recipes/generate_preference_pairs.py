# prefopt: on-policy preference pairs: sample k responses per prompt from the policy, score them,
# keep the best as chosen and the worst as rejected (princeton-nlp/SimPO's v0.2 data pipeline,
# on_policy_data_gen/, in one recipe on torchtune's generation utilities).
#
#   tune run recipes/generate_preference_pairs.py --config configs/tiny/generate_pairs.yaml [key=value ...]
#   tune run --nproc_per_node 8 recipes/generate_preference_pairs.py --config configs/llama3_1/8B_generate_pairs.yaml
#
# Writes into output_dir: pairs.jsonl (the `princeton` format: it trains as it is with
# dataset.format=princeton), dropped.jsonl, summary.json and config.yaml; progress is kept in
# shards/ as it goes, and a killed run restarted with the same config continues where it stopped.
#
# This file is meant to be copied and edited (`prefopt cp generate_preference_pairs .`): it
# depends on torchtune and the small `prefopt` library only.

import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config, training, utils

from prefopt.config import Key, at_least, non_negative, one_of, unit_interval, validate_config
from prefopt.cpu_linear import packed_linears
from prefopt.data.prompts import prompt_key
from prefopt.generation import check_prompts_fit, generate_batch, prompt_ids, row_seed, stop_token_ids
from prefopt.guards import check_device, lock_output_dir
from prefopt.resume import CONFIG_FILE, ResumeMismatchError, load_run_config, resume_mismatches, save_run_config
from prefopt.resume_check import checkpoint_files_state, code_state, input_changes
from prefopt.reward import (
    RewardModel,
    build_reward,
    prompt_text,
    reward_bound_args,
    reward_head_problem,
    reward_settings,
)
from prefopt.teardown import run_script

log = utils.get_logger("INFO")


CONFIG_SPEC = {
    "output_dir": Key(str, doc="where the pairs, their summary and the progress shards go"),
    "model": Key(component=True, doc="the policy: a torchtune decoder builder"),
    "tokenizer": Key(component=True, doc="the policy's tokenizer (its chat template lays out the prompts)"),
    "checkpointer": Key(component=True, doc="torchtune checkpointer holding the policy's weights"),
    "prompts": Key(component=True, doc="e.g. prefopt.data.read_prompts"),
    "reward": Key(component=True, doc="prefopt.reward.reward_model, or any callable (prompt, response) -> float"),
    "num_samples": Key(int, default=5, check=at_least(2), doc="k responses per prompt; a pair needs two"),
    "seed": Key(int, default=42, doc="sample j uses seed + j unless sample_seeds lists them"),
    "sample_seeds": Key((list, type(None)), default=None, doc="one seed per sample (princeton: 13, 21, 42, 79, 100)"),
    "temperature": Key(float, default=0.8, check=non_negative, doc="0: greedy"),
    "top_p": Key((float, type(None)), default=None, check=unit_interval),
    "top_k": Key((int, type(None)), default=None, check=at_least(1)),
    "max_new_tokens": Key(int, check=at_least(1)),
    "extra_stop_tokens": Key(list, default=[], doc="ids or one-token strings that also end a response"),
    "batch_size": Key(int, default=4, check=at_least(1), doc="prompts per batch (each gives num_samples rows)"),
    "min_score_gap": Key(float, default=0.0, check=non_negative, doc="drop a prompt whose best - worst score is below this"),
    "device": Key(str, default="cpu"),
    "dtype": Key(str, default="fp32", check=one_of("fp32", "bf16")),
    "compile": Key(bool, default=False, doc="torch.compile the one-token decode steps (KV caches of one length: "
                                            "the longest prompt + max_new_tokens)"),
    "metric_logger": Key(component=True, default=None),
    "overwrite_output_dir": Key(bool, default=False, doc="delete another config's progress in output_dir and start clean"),
}
# (reward: a reward model's device/dtype, or a scoring callable's (prompt, response) parameters)
BOUND_ARGS = {"checkpointer": ("should_load_recipe_state", "resume_from_checkpoint"), "reward": reward_bound_args}
# Keys that do not change what is written: a restart may change them.
FREE_KEYS = ("output_dir", "metric_logger", "overwrite_output_dir")
SHARDS = "shards"  # <output_dir>/shards/rank_<r>.jsonl: every prompt's record, appended per batch
PAIRS, DROPPED, SUMMARY = "pairs.jsonl", "dropped.jsonl", "summary.json"
INPUTS = "inputs.json"  # the policy's checkpoint files and the reward's code or files, when progress began


def _cross_checks(v: Dict[str, Any]) -> List[str]:
    problems = []
    seeds = v["sample_seeds"]
    if seeds is not None and (len(seeds) != v["num_samples"] or not all(isinstance(s, int) for s in seeds)):
        problems.append(f"sample_seeds: expected {v['num_samples']} ints (num_samples), got {seeds}")
    if seeds is not None and len(set(seeds)) != len(seeds):
        problems.append(f"sample_seeds: the seeds must differ (identical seeds give identical samples), got {seeds}")
    return problems


def pick_pair(responses: Sequence[str], scores: Sequence[float], min_score_gap: float = 0.0) -> Tuple[Optional[int], Optional[int], Optional[str]]:
    """``(chosen, rejected, None)``: the indices of the highest and the lowest score (the first of
    equal ones, as princeton's ``np.argmax``/``np.argmin``), or ``(None, None, reason)`` for a prompt
    that gives no pair. Empty (or whitespace-only) responses never enter a pair: a training pair
    needs a response token on each side.

    Reasons: ``"identical samples"`` (every response the same text, princeton's filter),
    ``"empty responses"`` (fewer than two non-empty), ``"non-finite score"``, ``"tied scores"``
    (best == worst), ``"gap below min_score_gap"``.
    """
    if len(set(responses)) <= 1:
        return None, None, "identical samples"
    keep = [i for i, r in enumerate(responses) if r.strip()]
    if len(keep) < 2:
        return None, None, "empty responses"
    if not all(math.isfinite(scores[i]) for i in keep):
        return None, None, "non-finite score"
    chosen = max(keep, key=lambda i: (scores[i], -i))
    rejected = min(keep, key=lambda i: (scores[i], i))
    gap = scores[chosen] - scores[rejected]
    if gap <= 0:
        return None, None, "tied scores"
    if gap < min_score_gap:
        return None, None, "gap below min_score_gap"
    return chosen, rejected, None


class GeneratePairsRecipe:
    """Sample ``num_samples`` responses per prompt from the policy, score each with the
    ``reward`` component, and keep (highest, lowest) as a pair.

    - Prompts: deduplicated and sorted as princeton's ``decode.py`` does; batches of
      ``batch_size`` prompts (``num_samples`` rows each) in that order. Each row's generator is
      seeded by (sample seed, prompt), so a prompt's samples do not depend on its batch.
    - Written as it goes: each batch's records are appended to ``shards/rank_<r>.jsonl`` and
      fsynced; a restart with the same config skips the prompts already there (a batch that was
      half written is sampled again, identically, and only its missing prompts are added). At the
      end rank 0 writes ``pairs.jsonl`` and ``dropped.jsonl`` in prompt order, atomically.
    - Under ``tune run --nproc_per_node N`` batch ``b`` is rank ``b % N``'s, whatever N was when
      the batch was written, so a restart may use another N.
    """

    def __init__(self, cfg: DictConfig) -> None:
        v = validate_config(cfg, CONFIG_SPEC, bound_args=BOUND_ARGS, extra_checks=_cross_checks)
        self._cfg = v
        self._run_cfg = cfg
        self._world, self._rank = utils.get_world_size_and_rank()
        check_device(v["device"])
        device = v["device"]
        if self._world > 1 and device.startswith("cuda"):  # each rank its own GPU (the saved config keeps "cuda")
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self._device = utils.get_device(device=device)
        self._dtype = training.get_dtype(v["dtype"], device=self._device)
        self._output_dir = Path(v["output_dir"])
        self._seeds = list(v["sample_seeds"]) if v["sample_seeds"] is not None else [v["seed"] + j for j in range(v["num_samples"])]
        if str(v["reward"].get("_component_", "")).endswith("reward_model"):
            problem = reward_head_problem(v["reward"].get("checkpointer", {}).get("checkpoint_dir"))
            if problem:
                raise ValueError(f"reward.checkpointer.checkpoint_dir: {problem}")
        self._output_dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock_output_dir(self._output_dir) if self._rank == 0 else None
        self._check_output_dir()

    def _check_output_dir(self) -> None:
        """Refuse progress or pairs of another config in output_dir (unless overwrite_output_dir,
        which deletes them): a restart must produce the file an uninterrupted run would."""
        saved = load_run_config(self._output_dir / CONFIG_FILE)
        ours = [self._output_dir / n for n in (SHARDS, PAIRS, DROPPED, SUMMARY, INPUTS)]
        if not any(p.exists() for p in ours):
            return
        keys = [k for k in CONFIG_SPEC if k not in FREE_KEYS]
        wrong = resume_mismatches(saved, self._run_cfg, keys) if saved is not None else ["config.yaml: missing"]
        if not wrong and (self._output_dir / INPUTS).is_file():
            # the same config can name a policy re-trained into the same folder, or edited scoring code
            wrong = input_changes(json.loads((self._output_dir / INPUTS).read_text()), self._inputs())
        if not wrong:
            log.info(f"output_dir holds this config's progress: continuing ({self._output_dir / SHARDS})")
            return
        if not self._cfg["overwrite_output_dir"]:
            raise ResumeMismatchError(
                f"output_dir={str(self._output_dir)!r} holds pairs or progress of another config or other inputs "
                f"({self._output_dir / CONFIG_FILE}, {INPUTS}): " + "; ".join(wrong) + ". Use that config to continue it, "
                "overwrite_output_dir=True to delete them and start clean, or choose another output_dir."
            )
        if self._rank == 0:
            import shutil

            for p in ours:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            log.warning(f"overwrite_output_dir=True: removed {', '.join(str(p) for p in ours)}")
        self._barrier()

    def _inputs(self) -> Dict[str, Any]:
        """What the config names but does not fix (prefopt.resume_check): the policy's checkpoint
        files, and the reward model's files or the scoring callable's code."""
        v = self._cfg
        reward = v["reward"]
        inputs: Dict[str, Any] = {"checkpointer": checkpoint_files_state(v["checkpointer"])}
        if str(reward.get("_component_", "")).endswith("reward_model"):
            inputs["reward.checkpointer"] = checkpoint_files_state(reward.get("checkpointer", {}))
        else:
            inputs["reward"] = code_state(str(reward["_component_"]))
        return inputs

    def _barrier(self) -> None:
        if self._world > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------
    def setup(self, cfg: DictConfig) -> None:
        v = self._cfg
        self._metric_logger = config.instantiate(v["metric_logger"]) if v["metric_logger"] is not None else None
        if self._metric_logger is not None and self._rank == 0:
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
        self._check_prompts_fit()
        self._model = self._setup_model()
        # the decode steps are most of the time; compiled once: every batch's caches are as long
        # as the longest prompt's needs (the prefill, one shape per batch, stays eager)
        self._decode = torch.compile(self._model) if v["compile"] else None
        self._cache_len = max(map(len, self._prompt_ids)) + v["max_new_tokens"] if v["compile"] else None
        self._reward = build_reward(v["reward"], device=self._device, dtype=self._dtype)
        self._check_reward_fits()
        if self._rank == 0:  # after every start-up check: an existing output_dir is untouched until here
            save_run_config(self._run_cfg, self._output_dir / CONFIG_FILE)
            if not (self._output_dir / INPUTS).is_file():  # those of the progress, kept by a continuing run
                (self._output_dir / INPUTS).write_text(json.dumps(self._inputs(), indent=1))
        self._barrier()
        log.info(
            f"{len(self._prompts)} prompts ({self._prompt_set.rows} rows read, {self._prompt_set.duplicates} duplicates, "
            f"skipped {dict(self._prompt_set.bad)}); {v['num_samples']} samples each; reward {self._reward.name}"
        )

    def _check_prompts_fit(self) -> None:
        """Before any weight is read: every prompt + max_new_tokens fits the policy's context,
        and the tokenizer's ids fit its vocabulary (a tokenizer of another model)."""
        v = self._cfg
        with torch.device("meta"):
            meta = config.instantiate(v["model"])
        limit, vocab = meta.max_seq_len, meta.tok_embeddings.num_embeddings
        del meta
        check_prompts_fit(self._prompt_ids, self._keys, v["max_new_tokens"], max_seq_len=limit, vocab_size=vocab)

    def _check_reward_fits(self) -> None:
        """A reward model: its tokenizer's ids fit its vocabulary, and each prompt with a
        max_new_tokens response fits its context (checked on the prompt + an empty response)."""
        r = self._reward
        if not isinstance(r, RewardModel):
            return
        vocab, limit = r.model.tok_embeddings.num_embeddings, r.model.max_seq_len
        worst = max(len(r.encode(p, "")) for p in self._prompts)
        top = max(max(r.encode(p, "")) for p in self._prompts[:16])
        if top >= vocab:
            raise ValueError(f"reward.tokenizer: gives token id {top}, but the reward model has {vocab} embeddings: "
                             "the reward tokenizer and model are of different models")
        if worst + self._cfg["max_new_tokens"] > limit:
            raise ValueError(f"max_new_tokens: a prompt of {worst} reward-model tokens + max_new_tokens="
                             f"{self._cfg['max_new_tokens']} exceeds the reward model's context (reward.model max_seq_len={limit})")

    def _setup_model(self) -> torch.nn.Module:
        v = self._cfg
        ckpt = config.instantiate(v["checkpointer"], should_load_recipe_state=False)
        state = ckpt.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(v["model"])
        model.load_state_dict(state, strict=True)
        return model.eval()

    # ------------------------------------------------------------------------------------------
    def _shard_path(self, rank: int) -> Path:
        return self._output_dir / SHARDS / f"rank_{rank}.jsonl"

    def _done(self) -> Dict[int, Dict[str, Any]]:
        """Every record in the shards (any world size), by prompt index; a line cut by a kill
        (not valid JSON) is ignored, and rank 0 cuts it off its file before anyone appends."""
        records: Dict[int, Dict[str, Any]] = {}
        folder = self._output_dir / SHARDS
        for path in sorted(folder.glob("rank_*.jsonl")) if folder.is_dir() else []:
            good = 0
            with open(path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        break
                    if not line.endswith(b"\n"):
                        break
                    records.setdefault(rec["prompt_index"], rec)
                    good += len(line)
            if self._rank == 0 and good < path.stat().st_size:
                with open(path, "r+b") as f:
                    f.truncate(good)
        return records

    def _settings(self) -> Dict[str, Any]:
        v = self._cfg
        return {
            "policy": str(v["checkpointer"].get("checkpoint_dir")),
            "reward": reward_settings(self._reward),
            "temperature": v["temperature"], "top_p": v["top_p"], "top_k": v["top_k"],
            "max_new_tokens": v["max_new_tokens"], "seeds": self._seeds,
        }

    def _records(self, batch: List[int], gens, scores: List[float]) -> List[Dict[str, Any]]:
        k, settings = self._cfg["num_samples"], self._settings()
        out = []
        for n, i in enumerate(batch):
            g = gens[n * k:(n + 1) * k]
            texts = [self._tokenizer.decode(x.tokens) for x in g]
            s = scores[n * k:(n + 1) * k]
            c, r, reason = pick_pair(texts, s, self._cfg["min_score_gap"])
            prompt = self._prompts[i]
            rec = {"prompt_index": i, "prompt": prompt_text(prompt)}
            if reason is None:
                rec["chosen"] = [*prompt, {"role": "assistant", "content": texts[c]}]
                rec["rejected"] = [*prompt, {"role": "assistant", "content": texts[r]}]
                rec["score_chosen"], rec["score_rejected"] = s[c], s[r]
            else:
                rec["dropped"] = reason
                rec["prompt_messages"] = prompt
            rec["all_generated_responses"] = texts
            rec["all_rm_scores"] = s
            rec["num_tokens"] = [x.num_generated for x in g]
            rec["finish_reasons"] = ["stop" if x.stopped else "length" for x in g]
            rec["generated_by"] = settings
            out.append(rec)
        return out

    def _append(self, records: List[Dict[str, Any]]) -> None:
        path = self._shard_path(self._rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def run(self) -> Dict[str, Any]:
        v = self._cfg
        k, bs = v["num_samples"], v["batch_size"]
        done = self._done()
        self._barrier()  # rank 0 has cut any partial line before anyone appends
        resumed = len(done)
        if resumed:
            log.info(f"continuing: {resumed} of {len(self._prompts)} prompts already done")
        n_batches = math.ceil(len(self._prompts) / bs)
        gen_tokens, gen_seconds, t_start = 0, 0.0, time.perf_counter()
        # on CPU the policy's and the reward model's linear layers run on weights packed for oneDNN,
        # packed once for the whole loop (not under a compiled decode)
        with packed_linears(self._model, enabled=self._decode is None), self._reward.packed():
            for b in range(self._rank, n_batches, self._world):
                batch = list(range(b * bs, min((b + 1) * bs, len(self._prompts))))
                if all(i in done for i in batch):
                    continue
                rows = [self._prompt_ids[i] for i in batch for _ in range(k)]
                seeds = [row_seed(self._seeds[j], self._keys[i]) for i in batch for j in range(k)]
                t0 = time.perf_counter()
                gens = generate_batch(
                    self._model, rows, seeds=seeds, max_new_tokens=v["max_new_tokens"], temperature=v["temperature"],
                    top_k=v["top_k"], top_p=v["top_p"], stop_tokens=self._stop, pad_id=getattr(self._tokenizer, "pad_id", 0) or 0,
                    device=self._device, cache_dtype=self._dtype, decode=self._decode, cache_len=self._cache_len,
                )
                gen_seconds += time.perf_counter() - t0
                gen_tokens += sum(g.num_generated for g in gens)
                texts = [self._tokenizer.decode(g.tokens) for g in gens]
                scores = self._reward.score([self._prompts[i] for i in batch for _ in range(k)], texts)
                records = [r for r in self._records(batch, gens, scores) if r["prompt_index"] not in done]
                self._append(records)
                for r in records:
                    done[r["prompt_index"]] = r
                self._on_batch_written(b)
                if self._metric_logger is not None:
                    self._metric_logger.log_dict(
                        {"prompts_done": len(done), "sampling_tokens_per_second": gen_tokens / max(gen_seconds, 1e-9)}, step=b
                    )
        stats = {"tokens": gen_tokens, "seconds": gen_seconds, "score_items": self._reward.items,
                 "score_tokens": self._reward.tokens, "score_seconds": self._reward.seconds}
        all_stats = [stats]
        if self._world > 1:
            all_stats = [None] * self._world
            dist.all_gather_object(all_stats, stats)
        summary = None
        if self._rank == 0:
            summary = self._finish(all_stats, resumed, time.perf_counter() - t_start)
        self._barrier()
        return summary

    def _on_batch_written(self, batch: int) -> None:
        """A hook after each batch's records are on disk (tests stop a run here)."""

    def _finish(self, stats: List[Dict[str, Any]], resumed: int, elapsed: float) -> Dict[str, Any]:
        """Rank 0: every shard's records in prompt order into pairs.jsonl / dropped.jsonl (each
        written to a temporary name, then renamed), and the summary."""
        records = self._done()
        missing = [i for i in range(len(self._prompts)) if i not in records]
        if missing:
            raise RuntimeError(f"{len(missing)} prompts have no record in {self._output_dir / SHARDS} (first {missing[:5]})")
        kept, dropped = Counter(), Counter()
        files = {PAIRS: [], DROPPED: []}
        for i in range(len(self._prompts)):
            rec = dict(records[i])
            reason = rec.get("dropped")
            (dropped if reason else kept)[reason or "pair"] += 1
            files[DROPPED if reason else PAIRS].append(json.dumps(rec, ensure_ascii=False) + "\n")
        for name, lines in files.items():
            tmp = self._output_dir / (name + ".tmp")
            tmp.write_text("".join(lines), encoding="utf-8")
            os.replace(tmp, self._output_dir / name)
        tok, sec = sum(s["tokens"] for s in stats), sum(s["seconds"] for s in stats)
        s_items, s_tok, s_sec = (sum(s[k] for s in stats) for k in ("score_items", "score_tokens", "score_seconds"))
        summary = {
            "rows_read": self._prompt_set.rows,
            "rows_skipped": dict(self._prompt_set.bad),
            "duplicate_prompts": self._prompt_set.duplicates,
            "prompts": len(self._prompts),
            "pairs_kept": kept["pair"],
            "prompts_dropped": dict(dropped),
            "prompts_done_before_this_run": resumed,
            "samples_per_prompt": self._cfg["num_samples"],
            "sampling_tokens": tok,
            "sampling_tokens_per_second": tok / sec if sec else None,
            "scoring_samples_per_second": s_items / s_sec if s_sec else None,
            "scoring_tokens_per_second": s_tok / s_sec if s_tok and s_sec else None,
            "seconds": elapsed,
            "ranks": self._world,
            "generated_by": self._settings(),
            "pairs_file": str(self._output_dir / PAIRS),
        }
        tmp = self._output_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self._output_dir / SUMMARY)
        log.info(
            f"{kept['pair']} pairs from {len(self._prompts)} prompts (dropped: {dict(dropped) or 'none'}); "
            f"sampling {summary['sampling_tokens_per_second'] or 0:.1f} tokens/s; written to {self._output_dir / PAIRS}"
        )
        return summary

    def cleanup(self) -> None:
        if self._metric_logger is not None:
            self._metric_logger.close()
        if self._lock is not None:
            self._lock.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="GeneratePairsRecipe", cfg=cfg)
    distributed = training.is_distributed()
    if distributed:
        backend = "nccl" if str(cfg.get("device", "cpu")).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    try:
        recipe = GeneratePairsRecipe(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.run()
        recipe.cleanup()
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    # Run through runpy (`tune run` on one device, a sweep driver, a notebook's %run): returns as
    # torchtune's recipes do, and the caller goes on. As the process's own program (`python <this
    # file>`, or `python -m recipes.<name>` as torchrun starts each rank): a finished run ends the
    # process before native libraries' teardown, which has aborted finished runs (prefopt.teardown).
    sys.exit(run_script(recipe_main, __file__))
