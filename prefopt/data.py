"""Preference data for SimPO: the formats users have, princeton-style truncation, row
validation, tokenized once with ``datasets`` into memory-mapped Arrow files that are cached on
disk and shared by every rank, and a collate that keeps the source row ids.

Config use (``source`` / ``data_files`` / ``split`` as in ``torchtune.datasets.preference_dataset``)::

    dataset:
      _component_: prefopt.data.preference_dataset
      source: json
      data_files: my_pairs.jsonl
      split: train
      format: messages          # or trl_conversational, trl_strings, princeton
      max_seq_len: 2048
      max_prompt_len: 1800
      batch_size: ${batch_size} # only for the start-up summary's padding figure

Formats (``column_map`` renames the columns when a file's names differ):

- ``messages`` (torchtune's, HuggingFaceH4/ultrafeedback_binarized): ``chosen`` and ``rejected``
  are message lists (``{"role", "content"}``) that include the prompt;
- ``trl_conversational`` (TRL's standard conversational format, trl-lib/ultrafeedback_binarized):
  ``prompt`` is a message list, ``chosen`` / ``rejected`` lists of only the response message(s);
- ``trl_strings`` (TRL's standard format with plain text): ``prompt``, ``chosen``, ``rejected``
  strings; the prompt becomes a user message and each response an assistant message, so the
  tokenizer's chat template applies (``prompt_template: null`` means raw concatenation);
- ``princeton`` (princeton-nlp/llama3-ultrafeedback-armorm and its siblings): a ``prompt`` string
  plus ``chosen`` / ``rejected`` message lists; lists that hold the prompt turn(s) (the published
  sets do) are used as they are, lists of only the response get the prompt as a user message.
"""

import gc
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping as _Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets import load_dataset
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from prefopt.logprobs import score_plan_from_labels

__all__ = [
    "PreferenceDataset",
    "preference_dataset",
    "padded_collate_preference",
    "truncate_pair",
    "find_undecodable_text",
    "padding_share",
    "FORMATS",
    "scan_json_lines",
]

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant", "ipython", "tool")
_ROLE_SET = frozenset(_ROLES)
_PROMPT_TRUNCATION = ("keep_end", "keep_start")
_ON_BAD = ("drop", "error")
# format -> the columns it reads (the keys ``column_map`` may rename)
FORMATS: Dict[str, Tuple[str, ...]] = {
    "messages": ("chosen", "rejected"),
    "trl_conversational": ("prompt", "chosen", "rejected"),
    "trl_strings": ("prompt", "chosen", "rejected"),
    "princeton": ("prompt", "chosen", "rejected"),
}
# Bump when the encoding below changes what a cached file holds: old caches then miss.
_CACHE_VERSION = 2
# Below this many rows per process, forking workers costs more than it saves.
_MIN_ROWS_PER_PROC = 2000


class BadExample(ValueError):
    """A row that cannot become a training pair; the message names the source, row and field,
    ``reason`` is the short category counted when such rows are dropped."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable with its reason (worker processes may raise it)
        return (type(self), (str(self), self.reason))


def truncate_pair(
    prompt: List[int],
    chosen: List[int],
    rejected: List[int],
    *,
    max_seq_len: Optional[int],
    max_prompt_len: Optional[int],
    prompt_truncation: str = "keep_end",
    bos_id: Optional[int] = None,
) -> Tuple[List[int], int, int]:
    """princeton-nlp/SimPO's truncation rule on token ids (pure function).

    If prompt + the longer response exceed ``max_seq_len``, the prompt is cut to
    ``max_prompt_len`` tokens (its end is kept by default; a leading ``bos_id`` is always kept);
    if they still exceed it, both responses are cut to ``max_seq_len - len(prompt)`` tokens
    (their starts are kept).

    Args:
        prompt, chosen, rejected (List[int]): token ids (responses without the prompt).
        max_seq_len (Optional[int]): limit on prompt + response; None for no limit.
        max_prompt_len (Optional[int]): limit on the prompt when truncating; None keeps it whole.
        prompt_truncation (str): ``"keep_end"`` (princeton's default) or ``"keep_start"``.
        bos_id (Optional[int]): a leading token that ``keep_end`` must not drop.

    Returns:
        Tuple[List[int], int, int]: the truncated prompt and how many tokens of the chosen and
        rejected responses to keep (0 means the response cannot be kept).
    """
    if max_seq_len is None:
        return prompt, len(chosen), len(rejected)
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_seq_len and max_prompt_len is not None and len(prompt) > max_prompt_len:
        if prompt_truncation == "keep_start":
            prompt = prompt[:max_prompt_len]
        elif bos_id is not None and prompt and prompt[0] == bos_id:
            prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_len - 1) :]
        else:
            prompt = prompt[len(prompt) - max_prompt_len :]
    room = max(max_seq_len - len(prompt), 0)
    return prompt, min(len(chosen), room), min(len(rejected), room)


class _PairEncoder:
    """Turns one source row into a tokenized, truncated, checked pair (the ``Dataset.map``
    function; picklable, so ``num_proc`` worker processes can run it).

    Pure apart from the tokenizer: ``encode(row, sample)`` depends only on its arguments and the
    settings given here (which, with the tokenizer, are what the cache key hashes).
    """

    def __init__(
        self,
        *,
        tokenizer: ModelTokenizer,
        format: str,
        column_map: Mapping[str, str],
        new_system_prompt: Optional[str],
        max_seq_len: Optional[int],
        max_prompt_len: Optional[int],
        prompt_truncation: str,
        source_name: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.format = format
        self.cols = dict(column_map)
        self.new_system_prompt = new_system_prompt
        self.max_seq_len = max_seq_len
        self.max_prompt_len = max_prompt_len
        self.prompt_truncation = prompt_truncation
        self.source_name = source_name
        self.features: Optional[datasets.Features] = None  # the split's, set before mapping
        self._arrow_text = False  # rows come from Arrow (valid UTF-8), set by __call__
        # What torchtune's ChosenRejectedToMessages does (a new system prompt replaces the rows'
        # system messages), built in `_messages_of` without it: it made the prompt turns' Message
        # objects twice per row, ~12% of the build's Python time on UltraFeedback.
        self._system = (Message(role="system", content=new_system_prompt, masked=True, eot=True),) if new_system_prompt is not None else ()

    def settings(self) -> Dict[str, Any]:
        """What, besides the tokenizer and the data, decides the tokens (for the cache key)."""
        return {k: getattr(self, k) for k in ("format", "cols", "new_system_prompt", "max_seq_len", "max_prompt_len", "prompt_truncation")}

    # -- row checks -------------------------------------------------------------------------
    def _bad(self, row: int, field: str, what: str, reason: str) -> BadExample:
        return BadExample(f"{self.source_name}: row {row}, field {field!r}: {what}", reason)

    def _field(self, row: int, sample: Mapping[str, Any], key: str) -> Any:
        col = self.cols[key]
        if col not in sample or sample[col] is None:
            raise self._bad(row, col, "missing", "missing field")
        return sample[col]

    def _messages(self, row: int, sample: Mapping[str, Any], key: str, *, response: bool) -> List[Dict[str, Any]]:
        """The column as a checked list of messages; ``response``: it must hold a non-empty
        assistant message."""
        col, msgs = self.cols[key], self._field(row, sample, key)
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise self._bad(row, col, f"expected a non-empty list of messages, got {type(msgs).__name__}", "wrong type")
        for i, m in enumerate(msgs):
            # collections.abc's Mapping: an isinstance against typing's costs ~2% of a build
            if not isinstance(m, _Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLE_SET:
                raise self._bad(
                    row, col, f"message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r:.120}", "wrong type"
                )
            self._valid_text(row, col, m["content"], f"message {i}")
        # isspace, not strip: no copy of every response's text
        if response and not any(m["role"] == "assistant" and m["content"] and not m["content"].isspace() for m in msgs):
            raise self._bad(row, col, "has no non-empty assistant message", "empty response")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]

    def _string(self, row: int, sample: Mapping[str, Any], key: str, *, response: bool) -> str:
        col, text = self.cols[key], self._field(row, sample, key)
        if not isinstance(text, str):
            raise self._bad(row, col, f"expected a string, got {type(text).__name__}", "wrong type")
        self._valid_text(row, col, text, "the text")
        if response and not text.strip():
            raise self._bad(row, col, "is an empty response", "empty response")
        return text

    def _valid_text(self, row: int, col: str, text: str, what: str) -> None:
        if self._arrow_text:
            return
        bad = _SURROGATE.search(text)
        if bad:  # a lone surrogate: no tokenizer can encode it (not valid Unicode text)
            raise self._bad(
                row, col, f"{what} holds a lone surrogate {bad.group()!r} at character {bad.start()}: "
                "not valid Unicode text", "undecodable text"
            )

    def conversations(self, row: int, sample: Mapping[str, Any]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """The chosen and rejected conversations (prompt turns + response) of a row in any format.

        Raises:
            BadExample: a missing field, a wrong type, an empty response, undecodable text.
        """
        if self.format == "messages":
            return (self._messages(row, sample, "chosen", response=True), self._messages(row, sample, "rejected", response=True))
        if self.format == "trl_conversational":
            prompt = self._messages(row, sample, "prompt", response=False)
            return (
                prompt + self._messages(row, sample, "chosen", response=True),
                prompt + self._messages(row, sample, "rejected", response=True),
            )
        if self.format == "trl_strings":
            user = [{"role": "user", "content": self._string(row, sample, "prompt", response=False)}]
            return tuple(
                user + [{"role": "assistant", "content": self._string(row, sample, k, response=True)}] for k in ("chosen", "rejected")
            )
        # princeton: the published sets' lists hold the prompt turn; lists of only the response
        # get the prompt string as a user message.
        prompt = self._string(row, sample, "prompt", response=False)
        out = []
        for k in ("chosen", "rejected"):
            msgs = self._messages(row, sample, k, response=True)
            out.append(([{"role": "user", "content": prompt}] if msgs[0]["role"] == "assistant" else []) + msgs)
        return out[0], out[1]

    def _messages_of(self, row: int, chosen: List[Dict[str, Any]], rejected: List[Dict[str, Any]]) -> Dict[str, List[Message]]:
        """torchtune Messages of both conversations: the new system prompt (if any) in place of
        theirs, every turn before the final response masked, the final one the response.

        Only the final assistant turn is the response (princeton's prompt is the whole
        conversation before it): earlier assistant turns are shared context, and scoring them
        would dilute the average log-prob with tokens both sides have.

        Raises:
            BadExample: a conversation that does not end with an assistant message.
        """
        convs = {}
        for key, conv in (("chosen", chosen), ("rejected", rejected)):
            if self._system:
                conv = [m for m in conv if m["role"] != "system"]
            if conv[-1]["role"] != "assistant":
                raise self._bad(row, self.cols[key], "the last message must be the assistant's response", "no final response")
            convs[key] = conv
        out, prompt = {}, None
        for key, conv in convs.items():
            if prompt is None or conv[:-1] != convs["chosen"][:-1]:  # the rejected side reuses the chosen prompt's Messages
                prompt = [*self._system, *(Message(role=m["role"], content=m["content"], masked=True) for m in conv[:-1])]
            out[key] = [*prompt, Message(role="assistant", content=conv[-1]["content"], masked=False)]
        return out

    # -- one row ----------------------------------------------------------------------------
    def encode(self, row: int, sample: Mapping[str, Any]) -> Dict[str, Any]:
        """One row -> ``prompt_ids``, ``{chosen,rejected}_ids`` (the response, truncated),
        ``{chosen,rejected}_masked`` (positions in the response whose label is ignored, e.g.
        Llama 3's final end-of-text token), ``{prompt,chosen,rejected}_len`` (before truncation).

        Raises:
            BadExample: the row cannot become a pair with a response token on each side; the
                message names the source, row and field.
        """
        chosen, rejected = self.conversations(row, sample)
        messages = self._messages_of(row, chosen, rejected)
        tok = self.tokenizer
        # Both sides share the prompt: the rejected side's prompt turns would be encoded a
        # second time (~15% of the tokenizer's time on UltraFeedback). torchtune's tokenizers
        # encode message by message through `self.encode`, so a memo of it for this row gives
        # the rejected side the very ids a fresh call would (same text, same arguments); a
        # tokenizer that does not call `self.encode` is simply not sped up.
        memo: Dict[Any, List[int]] = {}
        orig = tok.encode

        def encode(text: str, *args: Any, **kwargs: Any) -> List[int]:
            k = (text, args, tuple(kwargs.items()))  # the same call site passes them in the same order
            if k not in memo:
                memo[k] = orig(text, *args, **kwargs)
            return list(memo[k])

        tok.encode = encode  # an instance attribute shadows the method, for this row only
        try:
            # (ids, mask, where the response starts: the first labelled token)
            sides = {}
            for key in ("chosen", "rejected"):
                ids, mask = tok.tokenize_messages(messages[key])
                try:
                    p = mask.index(False)
                except ValueError:
                    p = len(ids)
                sides[key] = (ids, mask, p)
        finally:
            del tok.encode
        # Slices and scans only where needed: each copy of a ~1,000-token list costs a few
        # microseconds, and the several per side there were took ~10% of a build's CPU time.
        (ids_c, _, p_c), (ids_r, _, p_r) = sides["chosen"], sides["rejected"]
        prompt = ids_c[:p_c]
        if p_c != p_r or ids_r[:p_r] != prompt:
            raise self._bad(
                row, self.cols["rejected"], "its prompt (the messages before the first response) differs from the chosen one", "different prompts"
            )
        resp = {"chosen": ids_c[p_c:], "rejected": ids_r[p_r:]}
        n_prompt = len(prompt)
        prompt, n_c, n_r = truncate_pair(
            prompt,
            resp["chosen"],
            resp["rejected"],
            max_seq_len=self.max_seq_len,
            max_prompt_len=self.max_prompt_len,
            prompt_truncation=self.prompt_truncation,
            bos_id=getattr(self.tokenizer, "bos_id", None),
        )
        out: Dict[str, Any] = {"prompt_ids": prompt, "prompt_len": n_prompt}
        for key, n in (("chosen", n_c), ("rejected", n_r)):
            _, mask, p = sides[key]
            kept = mask[p : p + n]
            # positions of the kept response whose label is ignored (any(): a bool's truth test is
            # cheaper than list.index's comparisons, and most responses have none)
            masked = [i for i, m in enumerate(kept) if m] if any(kept) else []
            if len(masked) == n:  # no labelled token left
                raise self._bad(
                    row, self.cols[key],
                    f"no response token left after truncation to max_seq_len={self.max_seq_len} "
                    f"(prompt is {len(prompt)} tokens; set max_prompt_len)",
                    "empty after truncation",
                )
            full = resp[key]
            out[f"{key}_ids"] = full if n == len(full) else full[:n]
            out[f"{key}_masked"] = masked
            out[f"{key}_len"] = len(full)
        if out["chosen_ids"] == out["rejected_ids"]:
            raise self._bad(
                row, self.cols["rejected"],
                "chosen and rejected responses are identical" + (" after truncation" if (n_c, n_r) != (len(resp["chosen"]), len(resp["rejected"])) else ""),
                "identical responses",
            )
        return out

    # -- a batch (the Dataset.map function) -------------------------------------------------
    def rows_of(self, table: Any, indices: Sequence[int]) -> List[Any]:
        """Python rows of an Arrow batch, decoded as ``datasets`` decodes them (e.g. its
        ``Json`` feature, for a column whose rows mix types); a row whose text is not UTF-8
        becomes a BadExample (pyarrow's JSON reader lets such bytes through; they fail only when
        decoded). We map over Arrow batches, not datasets' Python ones, so that one such row
        does not fail its whole batch."""
        feats = datasets.Features({c: f for c, f in (self.features or {}).items() if c in table.column_names})
        decode = any(datasets.features.features.require_decoding(f) for f in feats.values())
        try:
            rows = table.to_pylist()
            return [feats.decode_example(r) for r in rows] if decode else rows
        except UnicodeDecodeError:
            pass
        rows: List[Any] = []
        for i, row in enumerate(indices):
            one = table.slice(i, 1)
            try:
                r = one.to_pylist()[0]
                rows.append(feats.decode_example(r) if decode else r)
            except UnicodeDecodeError as e:
                field = "?"
                for name in one.column_names:
                    try:
                        one.column(name).to_pylist()
                    except UnicodeDecodeError:
                        field = name
                        break
                rows.append(self._bad(row, field, f"text that is not UTF-8 ({_undecodable_bytes(e)})", "undecodable text"))
        return rows

    def encode_rows(self, rows: Sequence[Any], indices: Sequence[int]) -> Dict[str, List[Any]]:
        """Columns (:data:`_FEATURES`) for a batch of rows; bad rows keep their place, with
        ``bad`` (the reason) and ``error`` (the message) set and empty token lists."""
        out: Dict[str, List[Any]] = {k: [] for k in _FEATURES}
        for row, sample in zip(indices, rows):
            try:
                if isinstance(sample, BadExample):
                    raise sample
                enc = self.encode(row, sample)
                enc["bad"], enc["error"] = "", ""
            except BadExample as e:
                # stored without the "<source>: " prefix: the same data read under another
                # spelling of its path (same key) gets its own name at raise time
                msg = str(e)
                prefix = f"{self.source_name}: "
                enc = dict(_EMPTY, bad=e.reason, error=msg[len(prefix):] if msg.startswith(prefix) else msg)
            enc["row"] = row
            for k in out:
                out[k].append(enc[k])
        return out

    def __call__(self, table: Any, indices: Sequence[int]) -> Any:
        cols = [c for c in set(self.cols.values()) if c in table.column_names]
        # Text decoded from Arrow is valid UTF-8, so it holds no lone surrogate: skip that scan.
        self._arrow_text = True
        # No cyclic garbage collection during a batch: encoding makes millions of small lists and
        # dicts, none in a reference cycle (refcounting frees them), and each collection of the
        # oldest generation walks every object of a process that has imported torch: ~13% of
        # a one-process build's CPU time (10k UltraFeedback rows, 4 runs each way).
        # Collections run again between batches.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            out = self.encode_rows(self.rows_of(table.select(cols), indices), indices)
        finally:
            if was_enabled:
                gc.enable()
        # An Arrow table, not lists: datasets' generic list conversion took ~10% of the build.
        return pa.table({k: _token_lists(v) if k in _LIST_COLUMNS else v for k, v in out.items()}, schema=_SCHEMA)


_TOKENS = datasets.List(datasets.Value("int32"))
_FEATURES = datasets.Features(
    {
        "row": datasets.Value("int64"),
        "prompt_ids": _TOKENS,
        "chosen_ids": _TOKENS,
        "rejected_ids": _TOKENS,
        "chosen_masked": _TOKENS,
        "rejected_masked": _TOKENS,
        "prompt_len": datasets.Value("int32"),
        "chosen_len": datasets.Value("int32"),
        "rejected_len": datasets.Value("int32"),
        "bad": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)
_SCHEMA = _FEATURES.arrow_schema
_LIST_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_masked", "rejected_masked")


def _token_lists(lists: Sequence[List[int]]) -> Any:
    """A list<int32> Arrow array of Python int lists, through numpy (pure)."""
    lens = np.fromiter(map(len, lists), dtype=np.int32, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


_EMPTY = {
    "prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "chosen_masked": [], "rejected_masked": [],
    "prompt_len": 0, "chosen_len": 0, "rejected_len": 0,
}


_SURROGATE = re.compile("[\ud800-\udfff]")
# a \\uD800-\\uDFFF escape (not preceded by an escaping backslash), with the low half if it has one
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?")
_TEXT_SOURCES = ("json", "csv", "text")


def _undecodable_bytes(e: UnicodeDecodeError) -> str:
    return f"{e.object[e.start : e.end]!r} at byte {e.start} of {e.object[max(0, e.start - 20) : e.end + 20]!r}"


def _field_path(obj: Any, prefix: str = "") -> Optional[str]:
    """Where in a decoded JSON value the first string (or key) holding a surrogate is."""
    if isinstance(obj, str):
        return prefix or "(value)" if _SURROGATE.search(obj) else None
    if isinstance(obj, list):
        for i, x in enumerate(obj):
            found = _field_path(x, f"{prefix}[{i}]")
            if found:
                return found
    if isinstance(obj, dict):
        for k, x in obj.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if _SURROGATE.search(str(k)):
                return f"key {name!r}"
            found = _field_path(x, name)
            if found:
                return found
    return None


def find_undecodable_text(path: Union[str, Path]) -> Optional[str]:
    """The first line of a UTF-8 text file (JSON, JSON Lines, CSV) that holds undecodable text,
    described with the file, the line (1-based), for JSON Lines the row (0-based: the non-blank
    lines before it), the field and the bytes; None if every line is valid UTF-8 with no
    lone-surrogate escape.

    Two kinds: bytes that are not UTF-8, and JSON escapes of a lone surrogate (``"\\ud800"``),
    which decode in Python but are not Unicode text (pyarrow's JSON reader rejects the whole
    file for either, or passes the bytes on to fail when the row is read).
    """
    row, jsonl = 0, None  # JSON Lines (the first non-blank line is an object): row = non-blank lines before
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            blank = not raw.strip()
            if jsonl is None and not blank:
                jsonl = raw.lstrip().startswith(b"{")
            where = f"{path}: line {lineno}" + (f" (row {row})" if jsonl and not blank else "")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                try:  # which field: decode with the bad bytes as surrogates, then look for them
                    field = _field_path(json.loads(raw.decode("utf-8", errors="surrogateescape")))
                except ValueError:
                    field = None
                return f"{where}{', field ' + repr(field) if field else ''}: bytes that are not UTF-8 ({_undecodable_bytes(e)})"
            lone = next(
                (m.group(1) for m in _SURROGATE_ESCAPE.finditer(line) if m.group(1)[1] in "cdefCDEF" or not m.group(2)),
                None,
            )
            if lone:
                try:  # JSON Lines: which field
                    field = _field_path(json.loads(line))
                except ValueError:
                    field = None
                return f"{where}{', field ' + repr(field) if field else ''}: a lone surrogate escape \"\\u{lone}\" (not Unicode text)"
            row += not blank
    return None


def _file_list(files: Any) -> List[Any]:
    if isinstance(files, Mapping):
        return [f for v in files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    if isinstance(files, (str, Path)):
        return [files]
    return list(files) if isinstance(files, (list, tuple)) or hasattr(files, "__iter__") else []


def _first_nonblank_line(path: Path) -> Optional[bytes]:
    """The first line of a file that is not blank, or None if it has none (read line by line)."""
    with open(path, "rb") as fh:
        return next((line for line in fh if line.strip()), None)


def _is_json_lines(path: Path, first: bytes) -> bool:
    """A ``.jsonl``/``.ndjson`` name, or a ``.json`` whose first non-blank line is a whole
    JSON object (else a JSON document: an array, a pretty-printed object)."""
    if path.suffix in (".jsonl", ".ndjson"):
        return True
    if path.suffix != ".json":
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _invalid_json(line_message: str) -> BadExample:
    """The error for a JSON Lines line that is not a JSON object (error mode)."""
    return BadExample(line_message + "; fix or delete that line, or set on_bad_example=drop to skip it", "invalid JSON")


def scan_json_lines(
    source: str, files: Any, on_bad_example: str = "drop", *, scratch: Optional[Path] = None, thorough: bool = True
) -> Tuple[Any, Dict[int, str], Optional[int]]:
    """Check local data files before ``datasets.load_dataset`` reads them.

    - A file with no content (0 bytes or only blank lines) is an error in either mode: it names
      the file (``datasets`` raises a bare ``StopIteration`` or loads 0 rows).
    - In a JSON Lines file (``source="json"``, a ``.jsonl``/``.ndjson`` name, or a ``.json`` whose
      first non-blank line is a whole JSON object), a line that is not a JSON object is a bad
      row, named by file, line (1-based) and row (0-based, non-blank lines before it; rows of
      several files are counted on across them, as ``datasets`` concatenates them):
      ``on_bad_example="error"`` raises, ``"drop"`` writes a copy of the file to ``scratch``
      with each such line replaced by ``{}`` (so the rows after it keep their numbers) and
      returns those rows for the dataset to drop and count.

    Only plain local files are read; other sources and a JSON document read with ``field=`` are
    left to ``datasets`` (pass ``source`` as given to :func:`preference_dataset`).

    ``thorough=False`` parses only the lines that do not look like an object (first and last
    non-blank bytes ``{`` and ``}``): parsing every line took 2 s of a 30 s first build on 60k
    UltraFeedback rows. What that lets through, pyarrow's reader then rejects (invalid JSON
    between braces) or reads as more rows than lines (``{...}{...}``); the caller scans again
    thoroughly when either happens (:func:`_load_raw`).

    Returns:
        Tuple[Any, Dict[int, str], Optional[int]]: ``data_files`` to load (the copies where lines
        were replaced, same structure as given), ``{row: message}`` of the replaced lines, and
        the number of rows (non-blank lines) when every file is a local JSON Lines file, else None.

    Raises:
        ValueError: an empty file; :class:`BadExample` (error mode) for the first bad line.
    """
    if source not in _TEXT_SOURCES or files is None:
        return files, {}, None
    listed = _file_list(files)
    paths = [Path(f) for f in listed if isinstance(f, (str, Path)) and Path(f).is_file()]
    replaced: Dict[str, str] = {}
    bad_rows: Dict[int, str] = {}
    offset = 0
    all_jsonl = source == "json" and len(paths) == len(listed)
    # Every file is read line by line, never whole (a 390 MB file read whole, and its lines,
    # took ~750 MB at the peak and left ~100 MB in the allocator).
    for path in paths:
        first = _first_nonblank_line(path)
        if first is None:
            raise ValueError(f"{path}: the data file is empty (no rows): check the path in data_files or the export that wrote it")
        if source != "json":
            all_jsonl = False
            continue
        if not _is_json_lines(path, first):
            all_jsonl = False
            continue
        bad_lines = set()
        row = 0
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                # "{" first and "}" last (the last 3 bytes: "}\n", "}\r\n" or a final "}")
                if not thorough and raw[:1] == b"{" and raw[-3:].rstrip()[-1:] == b"}":  # an object, presumably
                    row += 1
                    continue
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
                except UnicodeDecodeError:
                    problem = None  # undecodable bytes: find_undecodable_text's job (a row error later)
                except ValueError as e:
                    problem = f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
                if problem is not None:
                    msg = f"{path}: line {lineno} (row {row}): {problem}"
                    if on_bad_example == "error":
                        raise _invalid_json(msg)
                    bad_rows[offset + row] = msg
                    bad_lines.add(lineno)
                row += 1
        offset += row
        if bad_lines:
            if scratch is None:
                scratch = Path(tempfile.mkdtemp(prefix="prefopt_jsonl_"))
            copy = scratch / f"{len(replaced)}_{path.name}"
            with open(path, "rb") as src, open(copy, "wb") as dst:
                for lineno, raw in enumerate(src, start=1):
                    dst.write(b"{}\n" if lineno in bad_lines else raw)
            replaced[str(path)] = str(copy)
    rows = offset if all_jsonl else None
    if not replaced:
        return files, bad_rows, rows

    def swap(f: Any) -> Any:
        return replaced.get(str(f), f) if isinstance(f, (str, Path)) else f

    if isinstance(files, Mapping):
        files = {k: (swap(v) if isinstance(v, (str, Path)) else [swap(f) for f in v]) for k, v in files.items()}
    elif isinstance(files, (str, Path)):
        files = swap(files)
    else:
        files = [swap(f) for f in files]
    return files, bad_rows, rows


def _undecodable_in_files(source: str, files: Any) -> Optional[str]:
    if source not in _TEXT_SOURCES or files is None:
        return None
    if isinstance(files, Mapping):
        files = [f for v in files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    elif isinstance(files, (str, Path)):
        files = [files]
    for f in files:
        if isinstance(f, (str, Path)) and Path(f).is_file():
            found = find_undecodable_text(f)
            if found:
                return found
    return None


def default_cache_dir() -> Path:
    """``$PREFOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/prefopt``, else ``~/.cache/prefopt``."""
    env = os.environ.get("PREFOPT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefopt"


def default_num_proc() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cache_key(data_fingerprint: str, encoder: _PairEncoder) -> Optional[str]:
    """Hex key of everything that decides the tokens: the data (``datasets``' fingerprint of the
    loaded, filtered split: files, their modification times, the hub revision, filter_fn; for
    local JSON Lines files :func:`_files_fingerprint`), the
    tokenizer (its pickled state: model, special tokens, chat template), the format, column_map
    and truncation settings. None if the tokenizer cannot be hashed (then nothing is cached)."""
    from datasets.fingerprint import Hasher

    # torchtune's sentencepiece tokenizer sets the ids of its whitespace prefix at its first use,
    # which changes its pickled state: hashed with them, a tokenizer that had tokenized (the
    # training set's, building the eval set after a cache hit of the first) gave another key
    # than a fresh one, and its cache missed. They are left out of the hash.
    from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

    tok_obj = encoder.tokenizer
    parts = [tok_obj, *(v for v in getattr(tok_obj, "__dict__", {}).values() if isinstance(v, SentencePieceBaseTokenizer))]
    lazy = [(o, k, o.__dict__.pop(k)) for o in parts if isinstance(o, SentencePieceBaseTokenizer) for k in ("prefix", "encoded_prefix") if k in o.__dict__]
    try:
        tok = Hasher.hash(tok_obj)
    except Exception as e:  # e.g. a tokenizer holding an unpicklable handle
        log.warning("cannot hash the tokenizer (%s: %s); the tokenized data will not be cached", type(e).__name__, e)
        return None
    finally:
        for o, k, v in lazy:
            o.__dict__[k] = v
    payload = {
        "version": _CACHE_VERSION,
        "data": data_fingerprint,
        "tokenizer": [type(encoder.tokenizer).__module__, type(encoder.tokenizer).__qualname__, tok],
        "settings": encoder.settings(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:24]


class _NodeBuilderFirst:
    """Under ``torch.distributed``: the node's first rank (``LOCAL_RANK`` 0) runs the block
    first, the node's other ranks wait at a barrier and run it after (then it reads the cache
    the builder wrote). Every rank calls the barrier exactly once, also when the builder's block
    raises (the others then run it themselves and meet the same error). Without an initialized
    process group of more than one rank it does nothing. So under torch.distributed every rank
    must build the same data sets in the same order (the recipes do), or the barrier waits."""

    def __enter__(self) -> "_NodeBuilderFirst":
        self.on = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        self.builder = True
        if self.on:
            self.builder = int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())) == 0
            if not self.builder:
                torch.distributed.barrier()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.on and self.builder:
            torch.distributed.barrier()


def _is_rank_zero() -> bool:
    d = torch.distributed
    return not (d.is_available() and d.is_initialized()) or d.get_rank() == 0


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


def _json_lines_files(source: str, split: str, kwargs: Dict[str, Any]) -> Optional[List[Path]]:
    """The local JSON Lines files of a ``source="json"`` load that :func:`_read_json_lines` can
    read (``data_files`` and the ``train`` split only, every file a JSON Lines file), else None."""
    files = kwargs.get("data_files")
    if source != "json" or set(kwargs) != {"data_files"} or split != "train" or not isinstance(files, (str, Path, list, tuple)):
        return None
    listed = _file_list(files)
    paths = [Path(f) for f in listed if isinstance(f, (str, Path))]
    if not paths or len(paths) != len(listed) or not all(p.is_file() for p in paths):
        return None
    for p in paths:
        first = _first_nonblank_line(p)
        if first is not None and not _is_json_lines(p, first):
            return None
    return paths


def _files_fingerprint(paths: Sequence[Path], split: str, filter_fn: Optional[Callable]) -> Optional[str]:
    """What identifies the rows of local files without reading them: each file's resolved path,
    size and modification time (as ``datasets`` fingerprints local files), the split and the
    filter. None if the filter cannot be hashed."""
    from datasets.fingerprint import Hasher

    try:
        fn = Hasher.hash(filter_fn) if filter_fn is not None else None
    except Exception:
        return None
    stats = [[str(p.resolve()), st.st_size, st.st_mtime_ns] for p, st in ((p, p.stat()) for p in paths)]
    return hashlib.sha256(json.dumps(["json-lines", stats, split, fn]).encode()).hexdigest()


def _read_json_lines(files: Sequence[Any], out: Path, fingerprint: str) -> Optional[datasets.Dataset]:
    """Local JSON Lines files -> one memory-mapped Arrow file ``out`` -> a Dataset; None when
    pyarrow cannot read them as one table (invalid JSON, a column whose type changes, files of
    different columns): ``datasets.load_dataset`` then reads them its own way.

    Why not ``load_dataset("json")``: it parses each 10 MB chunk in one thread (its guard against
    a pyarrow crash on small blocks) and keeps a copy of the whole file in its cache for good;
    pyarrow's streaming reader parses 1 MB blocks on every core into a file that lives only
    while the tokens are built: 1.2 s instead of 2.7 s for a 375 MB file on 2 cores, and the
    same rows (the same reader, the same type inference).
    """
    from datasets.table import MemoryMappedTable

    block = 1 << 20
    while True:
        try:
            if not _write_json_lines(files, out, block):
                log.debug("%s: files of different columns; datasets.load_dataset reads them", files)
                return None
            break
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            if isinstance(e, pa.ArrowInvalid) and "straddling" in str(e) and block < (64 << 20):  # a line longer than a block
                block *= 8
                continue
            log.debug("pyarrow cannot read %s as one table (%s); datasets.load_dataset reads it", files, e)
            return None
    return datasets.Dataset(MemoryMappedTable.from_file(str(out)), fingerprint=fingerprint)


def _write_json_lines(files: Sequence[Any], out: Path, block: int) -> bool:
    """Every row of ``files`` into the Arrow stream file ``out`` (blocks of ``block`` bytes
    parsed in parallel); False if the files' columns differ.

    Raises:
        pyarrow.ArrowInvalid: JSON pyarrow cannot parse, a column whose type changes."""
    import pyarrow.json as paj

    with pa.OSFile(str(out), "wb") as sink:
        writer, schema = None, None
        for f in files:
            reader = paj.open_json(str(f), read_options=paj.ReadOptions(block_size=block, use_threads=True))
            if writer is None:
                schema = reader.schema
                writer = pa.ipc.new_stream(sink, schema)
            elif reader.schema != schema:
                return False
            for batch in reader:
                writer.write_batch(batch)
        if writer is not None:
            writer.close()
    return True


def _load_raw(
    source: str,
    split: str,
    filter_fn: Optional[Callable],
    kwargs: Dict[str, Any],
    on_bad_example: str = "drop",
    *,
    fast: Optional[Tuple[Path, str]] = None,
) -> Tuple[Any, Dict[int, str]]:
    """(the raw split, {row: message} of JSON Lines lines that are not JSON objects).

    ``fast``: (a scratch folder, the files' fingerprint) for local JSON Lines files, which
    :func:`_read_json_lines` reads (``datasets.load_dataset`` where it cannot)."""
    files = kwargs.get("data_files")
    # Empty files and JSON Lines lines that are not JSON objects, before `datasets` sees them
    # (it fails on both without naming the file or line): an error, or (drop) such lines are
    # replaced by `{}` in a temporary copy and counted as bad rows ("invalid JSON").
    # The quick scan first (only lines that do not look like objects are parsed); every line
    # is parsed only when the load then fails or reads more rows than there are lines.
    scratch = tempfile.TemporaryDirectory(prefix="prefopt_jsonl_")
    pool = ThreadPoolExecutor(max_workers=1) if fast is not None else None
    try:
        for thorough in (False, True):
            # The files are read while the quick scan runs (pyarrow's reader works in its own
            # threads, without the GIL): that read is used when the scan replaced no line, the
            # common case (0.5 s of a 375 MB file's 2 s).
            early = pool.submit(_read_json_lines, _file_list(files), fast[0] / "raw-early.arrow", fast[1]) if pool and not thorough else None
            try:
                load_files, unparsable, rows = scan_json_lines(source, files, on_bad_example, scratch=Path(scratch.name), thorough=thorough)
            finally:
                read = early.result() if early is not None else None  # (also before the scan's error)
            try:
                data = None
                if fast is not None:
                    if early is not None and not unparsable:
                        data = read
                    else:  # the thorough pass, or lines replaced: read the files the scan gives
                        data = _read_json_lines(_file_list(load_files), fast[0] / f"raw-{int(thorough)}.arrow", fast[1])
                    if data is None and not thorough:
                        continue  # pyarrow failed: a line the quick scan let through, presumably
                if data is None:
                    data = load_dataset(source, split=split, **({**kwargs, "data_files": load_files} if unparsable else kwargs))
            except Exception as e:
                # `datasets` fails deep inside pyarrow on text it cannot decode; find the line.
                found = _undecodable_in_files(source, files)
                if found is not None:
                    # Always an error, also with on_bad_example=drop: the file does not load, so
                    # there is no row to drop. Fix or delete that line.
                    raise BadExample(f"{found}; the file cannot be loaded, fix or delete that line", "undecodable text") from e
                if thorough:
                    raise
                continue
            # (a split slice or a JSON document read with field= has other row counts)
            if thorough or rows is None or "[" in split or "field" in kwargs or len(data) == rows:
                break
    finally:
        if pool is not None:
            pool.shutdown()
        scratch.cleanup()  # the rows are in an Arrow file now (datasets' cache, or fast[0])
    if filter_fn is not None:
        data = data.filter(filter_fn)
    return data, unparsable


def _read_manifest(folder: Path) -> Optional[Tuple[datasets.Dataset, Dict[int, str]]]:
    """(the cached tokens in ``folder``, memory-mapped; {row: message} of the source lines that
    were not JSON objects), or None if it holds no complete build."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        parts = [datasets.Dataset.from_file(str(folder / f)) for f in manifest["files"]]
        unparsable = {int(k): v for k, v in manifest.get("unparsable", {}).items()}
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return (ds, unparsable) if len(ds) == manifest["rows"] else None


# A build's scratch folders older than this are left over from a build that was killed
# (a build of millions of rows takes minutes): they are removed at the next build.
_STALE_SECONDS = 24 * 3600


def _remove_stale(folder: Path) -> None:
    """Remove the scratch folders (``raw-*``, ``*.tmp-*``) a killed build left in ``folder``:
    those not modified for :data:`_STALE_SECONDS` (age, not the owner's pid: on a disk shared by
    several nodes the owner may run on another machine)."""
    now = time.time()
    for p in folder.iterdir():
        if (p.name.startswith("raw-") or ".tmp-" in p.name) and p.is_dir():
            try:
                if now - p.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
                    log.info("removed %s, left by a build that did not finish", p)
            except OSError:  # another builder removed it first
                pass


def _tokenize(
    raw: Any,
    encoder: _PairEncoder,
    *,
    num_proc: Optional[int],
    cache_dir: Optional[Union[str, Path]],
    data_fingerprint: Optional[str] = None,
    unparsable: Optional[Dict[int, str]] = None,
) -> Tuple[datasets.Dataset, Dict[str, Any]]:
    """Every row of ``raw`` through ``encoder`` (bad rows included, marked), from the cache when
    a build with the same key is there, else built with ``Dataset.map`` and cached with
    ``unparsable`` ({row: message} of lines that were not JSON objects) in its manifest.
    ``data_fingerprint``: what identifies the data in the key (default: ``raw``'s fingerprint).

    Returns:
        (tokens, info): a memory-mapped Dataset of :data:`_FEATURES` columns, one row per source
        row; info has ``cache`` ("hit", "built", or None when not cached), ``path``, ``num_proc``.
    """
    if not isinstance(raw, datasets.Dataset):
        # A loader that hands over Python rows (not Arrow): tokenized in memory, not cached.
        rows = list(raw)
        return datasets.Dataset.from_dict(encoder.encode_rows(rows, range(len(rows))), features=_FEATURES), {"cache": None}
    missing = sorted(set(encoder.cols.values()) - set(raw.column_names))
    if missing:
        raise ValueError(
            f"{encoder.source_name}: no column {', '.join(map(repr, missing))} (columns: {raw.column_names}); format "
            f"{encoder.format!r} reads {FORMATS[encoder.format]}: set format, or column_map to rename them"
        )
    encoder.features = raw.features
    n_proc = max(1, min(num_proc or default_num_proc(), len(raw) // _MIN_ROWS_PER_PROC))
    key = _cache_key(data_fingerprint or raw._fingerprint, encoder)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "preference" / key if key else None
    if final is not None:
        hit = _read_manifest(final)
        if hit is not None:
            return hit[0], {"cache": "hit", "path": str(final), "num_proc": 0}
    tmp = root / "preference" / f"{key or 'uncached'}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir(parents=True, exist_ok=True)
    _remove_stale(tmp.parent)
    try:
        out = raw.with_format("arrow").map(
            encoder,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=_FEATURES,
            num_proc=n_proc if n_proc > 1 else None,
            cache_file_name=str(tmp / "tokens.arrow"),
            load_from_cache_file=False,  # our key decides; datasets would hash the tokenizer again
            new_fingerprint=key or None,
            desc=f"tokenizing {encoder.source_name}",
        )
        files = [os.path.basename(f["filename"]) for f in out.cache_files]
        manifest = {"rows": len(out), "files": files, "num_proc": n_proc, "unparsable": {str(k): v for k, v in (unparsable or {}).items()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        del out
        if final is None:
            return _read_manifest(tmp)[0], {"cache": None, "path": str(tmp), "num_proc": n_proc}
        try:
            tmp.rename(final)  # atomic: a reader sees a complete build or none
        except OSError:  # another process (another node's builder on a shared disk) was first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ds = _read_manifest(final)
    if ds is None:
        raise RuntimeError(f"{final}: the tokenized data just written cannot be read back")
    return ds[0], {"cache": "built", "path": str(final), "num_proc": n_proc}


def _load_and_tokenize(
    source: str,
    split: str,
    filter_fn: Optional[Callable],
    kwargs: Dict[str, Any],
    on_bad_example: str,
    encoder: _PairEncoder,
    *,
    num_proc: Optional[int],
    cache_dir: Optional[Union[str, Path]],
) -> Tuple[datasets.Dataset, Dict[int, str], Dict[str, Any]]:
    """(tokens, {row: message} of lines that were not JSON objects, cache info).

    Local JSON Lines files are keyed on their paths, sizes and modification times, so a cached
    start reads neither them nor a copy of them; other sources on ``datasets``' fingerprint of
    the loaded split (which ``load_dataset`` reads from its own cache)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = _json_lines_files(source, split, kwargs)
    fingerprint = _files_fingerprint(paths, split, filter_fn) if paths else None
    if fingerprint is None:
        raw, unparsable = _load_raw(source, split, filter_fn, kwargs, on_bad_example)
        tokens, info = _tokenize(raw, encoder, num_proc=num_proc, cache_dir=cache_dir, unparsable=unparsable)
        return tokens, unparsable, info
    key = _cache_key(fingerprint, encoder)
    hit = _read_manifest(root / "preference" / key) if key else None
    if hit is not None:
        tokens, unparsable = hit
        if unparsable and on_bad_example == "error":  # what the scan raises when it reads the file
            raise _invalid_json(unparsable[min(unparsable)])
        return tokens, unparsable, {"cache": "hit", "path": str(root / "preference" / key), "num_proc": 0}
    (root / "preference").mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"raw-{os.getpid()}-", dir=root / "preference"))  # on the cache's disk, not in a RAM /tmp
    try:
        raw, unparsable = _load_raw(source, split, filter_fn, kwargs, on_bad_example, fast=(scratch, fingerprint))
        tokens, info = _tokenize(raw, encoder, num_proc=num_proc, cache_dir=cache_dir, data_fingerprint=fingerprint, unparsable=unparsable)
        del raw
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tokens, unparsable, info


def padding_share(chosen_lens: np.ndarray, rejected_lens: np.ndarray, batch_size: int, seed: int = 0) -> float:
    """Share of the tokens of :func:`padded_collate_preference` batches that are padding, for
    batches of ``batch_size`` pairs drawn in a seeded random order (as a shuffling sampler
    does; the last partial batch is left out). Pure.

    Args:
        chosen_lens, rejected_lens (np.ndarray): [n] tokens of each pair's two sequences.
        batch_size (int): pairs per batch (each batch is 2 * batch_size rows).

    Returns:
        float: padding tokens / all tokens, 0.0 if there is not one full batch.
    """
    n = len(chosen_lens) // batch_size * batch_size
    if n == 0:
        return 0.0
    perm = np.random.default_rng(seed).permutation(len(chosen_lens))[:n]
    c = np.asarray(chosen_lens)[perm].reshape(-1, batch_size)
    r = np.asarray(rejected_lens)[perm].reshape(-1, batch_size)
    longest = np.maximum(c.max(1), r.max(1)).astype(np.int64)
    real = c.sum(dtype=np.int64) + r.sum(dtype=np.int64)
    return float(1.0 - real / (longest.sum() * 2 * batch_size))


def packed_share(prompt_lens: np.ndarray, chosen_lens: np.ndarray, rejected_lens: np.ndarray, batch_size: int,
                 seed: int = 0) -> float:
    """Positions the packed, prefix-shared layout computes (each prompt once, no padding between
    pairs; the padding at the end of its rows left out) as a share of the padded layout's, for
    batches as in :func:`padding_share`. Pure.

    Args:
        prompt_lens, chosen_lens, rejected_lens (np.ndarray): [n] tokens of each pair's prompt and
            responses (without the prompt).
        batch_size (int): pairs per batch.

    Returns:
        float: packed positions / padded positions, 1.0 if there is not one full batch.
    """
    n = len(prompt_lens) // batch_size * batch_size
    if n == 0:
        return 1.0
    perm = np.random.default_rng(seed).permutation(len(prompt_lens))[:n]
    p, c, r = (np.asarray(x, dtype=np.int64)[perm].reshape(-1, batch_size) for x in (prompt_lens, chosen_lens, rejected_lens))
    padded = (np.maximum((p + c).max(1), (p + r).max(1)) * 2 * batch_size).sum()
    return float((p + c + r).sum() / padded)


def _percentiles(x: np.ndarray) -> str:
    if len(x) == 0:
        return "-"
    p = np.percentile(x, [50, 90, 99])
    return f"{p[0]:>7.0f} {p[1]:>7.0f} {p[2]:>7.0f} {x.max():>7d}"


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
    of reasons), ``cache_info``, ``summary`` (the start-up text). Args: see
    :func:`preference_dataset`.
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
        if prompt_truncation not in _PROMPT_TRUNCATION:
            raise ValueError(f"prompt_truncation must be one of {_PROMPT_TRUNCATION}, got {prompt_truncation!r}")
        if on_bad_example not in _ON_BAD:
            raise ValueError(f"on_bad_example must be one of {_ON_BAD}, got {on_bad_example!r}")
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
        files = load_dataset_kwargs.get("data_files")
        self.source_name = f"{source}:{files}" if files else f"{source}[{split}]"
        self.format = format
        self.max_seq_len = max_seq_len
        self.max_prompt_len = max_prompt_len
        self.prompt_truncation = prompt_truncation
        self._tokenizer = tokenizer
        encoder = _PairEncoder(
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
        with _NodeBuilderFirst(), _ProgressBars(sys.stderr.isatty()):
            tokens, unparsable, self.cache_info = _load_and_tokenize(
                source, split, filter_fn, load_dataset_kwargs, on_bad_example, encoder, num_proc=num_proc, cache_dir=cache_dir
            )
        if _is_rank_zero():
            for msg in unparsable.values():
                log.warning("%s; the row is dropped", msg)
        # JSON parsing and the map's writer leave freed buffers in Arrow's allocator (~100 MB
        # for 60k UltraFeedback rows); hand them back, the tokens are memory-mapped.
        pa.default_memory_pool().release_unused()
        self.cache_info["seconds"] = time.perf_counter() - t0

        import pyarrow.compute as pc

        table = tokens.data
        ok = pc.equal(table.column("bad"), "").to_numpy(zero_copy_only=False)
        self._keep = np.flatnonzero(ok)
        bad = np.flatnonzero(~ok)
        self.num_rows = len(ok)
        reasons = tokens.select(bad)["bad"] if len(bad) else []
        if unparsable:  # lines replaced by {} before loading: count them as what they were
            rows = tokens.select(bad)["row"]
            reasons = ["invalid JSON" if r in unparsable else why for r, why in zip(rows, reasons)]
        self.dropped: Counter = Counter(reasons)
        if len(bad) and on_bad_example == "error":
            first = tokens[int(bad[0])]  # the first bad row, in row order (shards are contiguous)
            raise BadExample(f"{self.source_name}: {first['error']}", first["bad"])
        self._tokens = tokens.select_columns(["row", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_masked", "rejected_masked"])
        if self.dropped and _is_rank_zero():
            log.warning(
                "%s: dropped %d of %d rows (%s); set on_bad_example=error to stop at the first one",
                self.source_name,
                sum(self.dropped.values()),
                self.num_rows,
                ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())),
            )
        if not len(self._keep):
            raise ValueError(f"{self.source_name}: no usable preference pairs (dropped: {dict(self.dropped)})")
        self._lengths = self._read_lengths(table)
        self.summary = self._summarize(batch_size)
        if _is_rank_zero():
            _info(self.summary)

    def lengths(self) -> Dict[str, np.ndarray]:
        """Token counts of the kept pairs, in item order: ``prompt``, ``chosen``, ``rejected``
        (after truncation; the responses without the prompt) and ``{prompt,chosen,rejected}_full``
        (before truncation). Each [len(self)] int64 (a copy)."""
        return {k: v.copy() for k, v in self._lengths.items()}

    def _read_lengths(self, table: Any) -> Dict[str, np.ndarray]:
        # list lengths come from the Arrow offsets: no token is read
        import pyarrow.compute as pc

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


def _info(text: str) -> None:
    # Like torchtune's get_logger: a handler of our own only when logging is not configured,
    # so that the summary shows under `tune run` (which configures torchtune's logger only).
    if not log.hasHandlers():
        log.addHandler(logging.StreamHandler())
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.info(text)


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


def padded_collate_preference(
    batch: Sequence[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
) -> Dict[str, Any]:
    """Concatenate chosen then rejected rows into one right-padded batch for a single forward.

    Same layout as torchtune's ``padded_collate_dpo`` (rows ``[:b]`` chosen, ``[b:]`` rejected),
    plus ``rows`` (the source row of each pair, so an error can name the examples of a bad
    step) and ``pad_to_multiple_of`` (fewer distinct shapes under ``torch.compile``).

    Args:
        batch: items of :class:`PreferenceDataset` (token sequences as lists or numpy arrays).
        padding_idx (int): token id for padding.
        ignore_idx (int): label for padding.
        pad_to_multiple_of (int): round the padded length up to a multiple of this.

    Returns:
        Dict[str, Any]: ``tokens`` [2b, s], ``labels`` [2b, s], ``plan`` (the
        :class:`~prefopt.logprobs.ScorePlan`), ``rows`` [b], ``num_tokens`` (0-d: real,
        non-padding tokens in the batch, for throughput figures) and ``chosen_tokens`` (0-d:
        scored chosen tokens).

    Raises:
        ValueError: naming the rows of the batch with no scored token.
    """
    ids = [torch.as_tensor(ex[f"{k}_input_ids"], dtype=torch.long) for k in ("chosen", "rejected") for ex in batch]
    labels = [torch.as_tensor(ex[f"{k}_labels"], dtype=torch.long) for k in ("chosen", "rejected") for ex in batch]
    tokens = pad_sequence(ids, batch_first=True, padding_value=padding_idx)
    labels_t = pad_sequence(labels, batch_first=True, padding_value=ignore_idx)
    extra = -tokens.shape[1] % pad_to_multiple_of
    if extra:
        tokens = torch.nn.functional.pad(tokens, (0, extra), value=padding_idx)
        labels_t = torch.nn.functional.pad(labels_t, (0, extra), value=ignore_idx)
    rows = torch.tensor([ex.get("row", -1) for ex in batch])
    seq_lens = torch.tensor([len(x) for x in ids])
    # which positions score which tokens, built here on the CPU: the training step then needs
    # no device sync to find them (prefopt.logprobs.ScorePlan)
    plan = score_plan_from_labels(labels_t, ignore_idx, seq_lens=seq_lens)
    return {
        "tokens": tokens,
        "labels": labels_t,
        "plan": plan,
        "rows": rows,
        "num_tokens": seq_lens.sum(),
        "chosen_tokens": plan.seq_num_tokens[: len(batch)].sum(),
    }
