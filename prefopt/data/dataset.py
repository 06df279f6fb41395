"""The preference data set: the one path from a source to kept, tokenized pairs, the decision on
bad rows (``on_bad_example``), the start-up summary, and the builder configs name."""

import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from prefopt.data.cache import NodeBuilderFirst, build_tokens, cache_key, cache_root, read_cached
from prefopt.data.encoding import FORMATS, PROMPT_TRUNCATION, PairEncoder, format_hint
from prefopt.data.sources import (
    INVALID_JSON,
    BadExample,
    expand_data_files,
    files_fingerprint,
    local_json_lines,
    read_rows,
)
from prefopt.packing import packed_share, padding_share

__all__ = ["ON_BAD_EXAMPLE", "PreferenceDataset", "preference_dataset"]

log = logging.getLogger("prefopt.data")

ON_BAD_EXAMPLE = ("drop", "error")


def _is_rank_zero() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


def _info(text: str) -> None:
    # Like torchtune's get_logger: a handler of our own only when logging is not configured,
    # so that the summary shows under `tune run` (which configures torchtune's logger only).
    if not log.hasHandlers():
        log.addHandler(logging.StreamHandler())
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.info(text)


def _percentiles(x: np.ndarray) -> str:
    if len(x) == 0:
        return "-"
    p = np.percentile(x, [50, 90, 99])
    return f"{p[0]:>7.0f} {p[1]:>7.0f} {p[2]:>7.0f} {x.max():>7d}"


class _ProgressBars:
    """datasets' tqdm bars on a terminal only (in a log file they are noise); restores the
    global setting after."""

    def __init__(self, show: bool) -> None:
        self.show = show

    def __enter__(self) -> None:
        self.was = datasets.utils.logging.is_progress_bar_enabled()
        (datasets.enable_progress_bars if self.show else datasets.disable_progress_bars)()

    def __exit__(self, *exc: Any) -> None:
        (datasets.enable_progress_bars if self.was else datasets.disable_progress_bars)()


def load_tokens(
    source: str,
    split: str,
    kwargs: Dict[str, Any],
    filter_fn: Optional[Callable],
    encoder: PairEncoder,
    *,
    num_proc: Optional[int],
    cache_dir: Optional[Union[str, Path]],
) -> Dict[str, Any]:
    """The one path from a source to its tokens: identify the data, read the cache, else read the
    rows and build it. Local JSON Lines files are identified by their paths, sizes and times
    without reading them, so a cached start reads no row; other sources are loaded first
    (``datasets`` reads them from its own cache) and identified by ``datasets``' fingerprint.

    Returns:
        Dict[str, Any]: ``tokens`` (a memory-mapped Dataset, one row per source row, bad rows
        marked), ``cache`` ("hit", "built", None when not cached), ``path``, ``num_proc``.
    """
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    # scratch on the cache's disk (not a RAM /tmp): copies of files with bad lines, their rows as Arrow
    with tempfile.TemporaryDirectory(prefix="raw-", dir=root) as scratch:
        paths = local_json_lines(source, split, kwargs)
        fingerprint = files_fingerprint(paths, split, filter_fn) if paths else None
        raw = None
        if fingerprint is None:
            raw, encoder.line_errors = read_rows(source, split, kwargs, filter_fn, Path(scratch))
            fingerprint = getattr(raw, "_fingerprint", None)  # (a loader of Python rows has none: not cached)
        key = cache_key(fingerprint, encoder) if fingerprint else None
        hit = read_cached(root / key) if key else None
        if hit is not None:
            return {"tokens": hit, "cache": "hit", "path": str(root / key), "num_proc": 0, "key": key}
        if raw is None:
            raw, encoder.line_errors = read_rows(source, split, kwargs, filter_fn, Path(scratch))
        tokens, info = build_tokens(raw, encoder, key=key, root=root, num_proc=num_proc)
        del raw  # (its Arrow file in scratch is removed with it)
    return {"tokens": tokens, **info, "key": key}


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs, tokenized once with ``datasets`` into memory-mapped Arrow files and
    checked row by row: rows that cannot become a pair with at least one response token on each
    side are dropped and counted in one log line, or raise (``on_bad_example="error"``) with the
    source, row index and field in the message.

    Why not torchtune's ``PreferenceDataset``: it tokenizes lazily and truncates only at the
    end of the sequence (cutting responses to nothing and leaving rows that give NaN average
    log-probs later); SimPO needs princeton's prompt-first truncation and a guarantee that every
    kept row is scorable, hence a check of every row before training, which at real scale has
    to be parallel (``num_proc``), cached, and shared by the ranks of a node.

    The tokens live in Arrow files under ``<cache_dir>/preference/<key>/`` (``key``: the data,
    the tokenizer, the format and the truncation settings); a second start with the same inputs
    maps them in well under a second, a changed input builds a new folder. Under torchrun the
    node's first rank builds while its other ranks wait, then all map the same files (the page
    cache holds them once per machine).

    Items are dicts of ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels`` (lists of ints: the prompt then the response; the prompt's labels are
    ``CROSS_ENTROPY_IGNORE_IDX``) and ``row`` (the source row). Attributes: ``dropped`` (Counter
    of reasons), ``cache_info``, ``summary`` (the start-up text), ``identity`` (what a resume
    compares: the source, the cache key of data + tokenizer + settings, None when not cached,
    and the source's row count). Args: see :func:`preference_dataset`.
    """

    def __init__(
        self,
        *,
        source: str,
        tokenizer: ModelTokenizer,
        format: str = "messages",
        column_map: Optional[Dict[str, str]] = None,
        train_on_input: bool = False,
        new_system_prompt: Optional[str] = None,
        filter_fn: Optional[Callable] = None,
        max_seq_len: Optional[int] = None,
        max_prompt_len: Optional[int] = None,
        prompt_truncation: str = "keep_end",
        on_bad_example: str = "drop",
        split: str = "train",
        num_proc: Optional[int] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        batch_size: Optional[int] = None,
        **load_dataset_kwargs: Any,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")
        unknown = sorted(set(column_map or {}) - set(FORMATS[format]))
        if unknown:
            raise ValueError(f"column_map: {unknown} are not columns of format {format!r}, which reads {FORMATS[format]}")
        if prompt_truncation not in PROMPT_TRUNCATION:
            raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATION}, got {prompt_truncation!r}")
        if on_bad_example not in ON_BAD_EXAMPLE:
            raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {on_bad_example!r}")
        if max_seq_len is not None and max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        if max_prompt_len is not None and max_seq_len is not None and max_prompt_len >= max_seq_len:
            raise ValueError(
                f"max_prompt_len ({max_prompt_len}) must be smaller than max_seq_len ({max_seq_len}) "
                "to leave room for the responses"
            )
        if train_on_input:
            raise ValueError(
                "train_on_input=True would score the prompt as part of each response; SimPO's "
                "reward is the response's average log-prob, so it must be False"
            )
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"num_proc must be >= 1, got {num_proc}")
        if "data_files" in load_dataset_kwargs:
            load_dataset_kwargs["data_files"] = expand_data_files(source, load_dataset_kwargs["data_files"])
        files = load_dataset_kwargs.get("data_files")
        self.source_name = f"{source}:{files}" if files else f"{source}[{split}]"
        self.format = format
        self.max_seq_len = max_seq_len
        self.max_prompt_len = max_prompt_len
        encoder = PairEncoder(
            tokenizer=tokenizer,
            format=format,
            column_map={**{c: c for c in FORMATS[format]}, **(column_map or {})},
            new_system_prompt=new_system_prompt,
            max_seq_len=max_seq_len,
            max_prompt_len=max_prompt_len,
            prompt_truncation=prompt_truncation,
            source_name=self.source_name,
        )
        t0 = time.perf_counter()
        with NodeBuilderFirst(), _ProgressBars(sys.stderr.isatty()):
            info = load_tokens(source, split, load_dataset_kwargs, filter_fn, encoder, num_proc=num_proc, cache_dir=cache_dir)
        tokens = info.pop("tokens")
        # reading and mapping leave freed buffers in Arrow's allocator; hand them back, the
        # tokens are memory-mapped
        pa.default_memory_pool().release_unused()
        self.cache_info = {**info, "seconds": time.perf_counter() - t0}
        self.identity = {"source": self.source_name, "key": info.get("key"), "rows": len(tokens)}

        def first_rows() -> list:  # (only for the error of a split whose every row is bad)
            with tempfile.TemporaryDirectory() as scratch:
                raw, _ = read_rows(source, split, load_dataset_kwargs, filter_fn, Path(scratch))
                return list(raw.select(range(min(len(raw), 20))).to_list() if hasattr(raw, "select") else raw[:20])

        self._keep = self._keep_or_raise(tokens, on_bad_example, first_rows)
        self._tokens = tokens.select_columns(["row", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_masked", "rejected_masked"])
        self._lengths = self._read_lengths(tokens.data)
        self.summary = self._summarize(batch_size)
        if _is_rank_zero():
            _info(self.summary)

    def _message(self, error: str, reason: str) -> str:
        # a source line's message names its own file and line; the encoder's name the row
        if reason == INVALID_JSON:
            return error
        return f"{self.source_name}: {error}"

    def _keep_or_raise(self, tokens: datasets.Dataset, on_bad_example: str, first_rows: Callable[[], list]) -> np.ndarray:
        """The one place ``on_bad_example`` is acted on: the indices of the good rows (drop: the
        bad ones counted in ``self.dropped`` and logged), or the first bad row raised, in row
        order (error).

        Raises:
            BadExample: (error mode) the first bad row.
            ValueError: no row is usable.
        """
        ok = pc.equal(tokens.data.column("bad"), "").to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~ok)
        self.num_rows = len(ok)
        # (row order: a build's shards are contiguous)
        reasons, errors = (tokens.select(bad)[c] for c in ("bad", "error")) if len(bad) else ([], [])
        self.dropped: Counter = Counter(reasons)
        if len(bad) and on_bad_example == "error":
            hint = "; fix or delete that line, or set on_bad_example=drop to skip it" if reasons[0] == INVALID_JSON else ""
            raise BadExample(self._message(errors[0], reasons[0]) + hint, reasons[0])
        if self.dropped and _is_rank_zero():
            # a line that is not a row is a broken file: each one named, so it can be fixed
            for reason, error in zip(reasons, errors):
                if reason == INVALID_JSON:
                    log.warning("%s; the row is dropped", error)
            log.warning(
                "%s: dropped %d of %d rows (%s); set on_bad_example=error to stop at the first one",
                self.source_name,
                sum(self.dropped.values()),
                self.num_rows,
                ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())),
            )
        keep = np.flatnonzero(ok)
        if not len(keep):
            first = {}  # each reason's first row
            for reason, error in zip(reasons, errors):
                first.setdefault(reason, self._message(error, reason))
            raise ValueError(
                f"{self.source_name}: no usable preference pairs (dropped: {dict(self.dropped)}); the first row of each reason: "
                + "; ".join(f"[{k}] {v}" for k, v in first.items()) + format_hint(first_rows(), self.format)
            )
        return keep

    def close(self) -> None:
        """Unmap the token table (the data set cannot be read afterwards): a recipe's ``cleanup``
        releases the run's Arrow data while every library is alive (:mod:`prefopt.teardown`)."""
        self._tokens = None

    def lengths(self) -> Dict[str, np.ndarray]:
        """Token counts of the kept pairs, in item order: ``prompt``, ``chosen``, ``rejected``
        (after truncation; the responses without the prompt) and ``{prompt,chosen,rejected}_full``
        (before truncation). Each [len(self)] int64 (a copy)."""
        return {k: v.copy() for k, v in self._lengths.items()}

    def _read_lengths(self, table: Any) -> Dict[str, np.ndarray]:
        # list lengths come from the Arrow offsets: no token is read
        out = {}
        for k in ("prompt", "chosen", "rejected"):
            out[k] = pc.list_value_length(table.column(f"{k}_ids")).to_numpy().astype(np.int64)[self._keep]
            out[f"{k}_full"] = table.column(f"{k}_len").to_numpy().astype(np.int64)[self._keep]
        return out

    def _summarize(self, batch_size: Optional[int]) -> str:
        L = self._lengths
        n = len(self._keep)
        truncated = int(np.sum((L["prompt"] < L["prompt_full"]) | (L["chosen"] < L["chosen_full"]) | (L["rejected"] < L["rejected_full"])))
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        c = self.cache_info
        where = {"hit": "read from the cache", "built": f"tokenized ({c.get('num_proc')} process(es)) and cached", None: "tokenized (not cached)"}[c["cache"]]
        lines = [
            f"{self.source_name} (format {self.format}): {n} pairs kept of {self.num_rows}; dropped: {dropped}",
            f"  {where} in {c['seconds']:.1f} s" + (f": {c['path']}" if c.get("path") else ""),
            "  tokens before truncation     p50     p90     p99     max",
            f"    prompt                 {_percentiles(L['prompt_full'])}",
            f"    chosen                 {_percentiles(L['chosen_full'])}",
            f"    rejected               {_percentiles(L['rejected_full'])}",
            f"  truncated: {truncated} pairs ({100 * truncated / n:.1f}%) at max_seq_len={self.max_seq_len}, max_prompt_len={self.max_prompt_len}",
        ]
        if batch_size:
            share = padding_share(L["prompt"] + L["chosen"], L["prompt"] + L["rejected"], batch_size)
            lines.append(f"  padding: {100 * share:.1f}% of the tokens of a padded batch of {batch_size} pairs")
            packed = packed_share(L["prompt"], L["chosen"], L["rejected"], batch_size)
            lines.append(f"  packed (packed: True): {100 * packed:.1f}% of the padded batch's positions computed "
                         "(each prompt once, no padding between pairs)")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        r = self._tokens[int(self._keep[index])]
        prompt = r["prompt_ids"]
        out: Dict[str, Any] = {}
        for key in ("chosen", "rejected"):
            resp = r[f"{key}_ids"]
            labels = list(resp)
            for j in r[f"{key}_masked"]:
                labels[j] = CROSS_ENTROPY_IGNORE_IDX
            out[f"{key}_input_ids"] = prompt + resp
            out[f"{key}_labels"] = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + labels
        out["row"] = r["row"]
        return out


def preference_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    format: str = "messages",
    column_map: Optional[Dict[str, str]] = None,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    filter_fn: Optional[Callable] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    max_prompt_len: Optional[int] = None,
    prompt_truncation: str = "keep_end",
    on_bad_example: str = "drop",
    num_proc: Optional[int] = None,
    cache_dir: Optional[str] = None,
    batch_size: Optional[int] = None,
    **load_dataset_kwargs: Any,
) -> PreferenceDataset:
    """Builder with ``torchtune.datasets.preference_dataset``'s arguments plus the format,
    truncation, and the tokenization's processes and cache.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer (adds BOS/EOS and the chat template).
            Leave its own ``max_seq_len`` unset (or larger): it cuts the end of the sequence
            before this builder's prompt-first truncation can act.
        source (str): hub name, or ``json``/``csv``/``parquet``/... with ``data_files``.
        format (str): how a row holds the pair: ``"messages"`` (default; torchtune's /
            HuggingFaceH4's), ``"trl_conversational"``, ``"trl_strings"`` or ``"princeton"``
            (see the module docstring).
        column_map (Optional[Dict[str, str]]): ``{format's column: file's column}`` where the
            names differ, e.g. ``{"chosen": "better", "rejected": "worse"}``.
        train_on_input (bool): must be False (kept for torchtune signature compatibility).
        new_system_prompt (Optional[str]): replaces any system message.
        filter_fn (Optional[Callable]): ``datasets`` filter applied before anything else (row
            indices in messages are counted after it).
        split (str): dataset split, e.g. ``"train"`` or ``"train[:95%]"``.
        max_seq_len (Optional[int]): limit on prompt + response tokens (princeton's ``max_length``).
        max_prompt_len (Optional[int]): prompt limit applied when the pair is too long
            (princeton's ``max_prompt_length``).
        prompt_truncation (str): ``"keep_end"`` (default, princeton) or ``"keep_start"``.
        on_bad_example (str): ``"drop"`` (count and log) or ``"error"`` (raise the first one,
            in row order, after the whole split is checked). Text that is not UTF-8 inside a
            JSON Lines string is such a row ("undecodable text"). A file that ``datasets``
            cannot load at all (a lone surrogate escape such as ``"\\ud800"``, bad bytes in a
            JSON array file) is always an error, naming the file, line, row and field: there is
            no row to drop.
        num_proc (Optional[int]): processes that tokenize (default: the cores this process may
            use; one below 2,000 rows per process). The cache does not depend on it.
        cache_dir (Optional[str]): where tokenized data is cached (default
            :func:`default_cache_dir`: ``$PREFOPT_CACHE_DIR`` or ``~/.cache/prefopt``).
        batch_size (Optional[int]): pairs per padded batch, only for the start-up summary's
            padding figure (configs pass ``${batch_size}``); the data do not depend on it.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``data_files``, ...).

    Returns:
        PreferenceDataset: items are dicts with ``chosen_input_ids``, ``chosen_labels``,
        ``rejected_input_ids``, ``rejected_labels`` (lists of ints) and ``row`` (source row).

    Raises:
        ValueError: on bad arguments, a column the format needs that the split lacks, if no row
            is usable, or (``on_bad_example="error"``) for the first bad row, naming source, row
            and field; :class:`BadExample` (a ValueError) for a file with undecodable text that
            does not load.
    """
    return PreferenceDataset(
        source=source,
        tokenizer=tokenizer,
        format=format,
        column_map=column_map,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        filter_fn=filter_fn,
        max_seq_len=max_seq_len,
        max_prompt_len=max_prompt_len,
        prompt_truncation=prompt_truncation,
        on_bad_example=on_bad_example,
        split=split,
        num_proc=num_proc,
        cache_dir=cache_dir,
        batch_size=batch_size,
        **load_dataset_kwargs,
    )
