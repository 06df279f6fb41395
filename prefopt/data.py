"""Preference data for SimPO: torchtune's ``PreferenceDataset`` plus princeton-style truncation,
row validation and a collate that keeps the source row ids.

Config use (same sources and ``column_map`` as ``torchtune.datasets.preference_dataset``)::

    dataset:
      _component_: prefopt.data.preference_dataset
      source: json
      data_files: my_pairs.jsonl
      split: train
      max_seq_len: 2048
      max_prompt_len: 1800
"""

import json
import logging
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, ChosenRejectedToMessages
from torchtune.datasets import PreferenceDataset as _TorchtunePreferenceDataset
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from prefopt.logprobs import score_plan_from_labels

__all__ = [
    "PreferenceDataset",
    "preference_dataset",
    "padded_collate_preference",
    "truncate_pair",
    "find_undecodable_text",
    "scan_json_lines",
]

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant", "ipython", "tool")
_PROMPT_TRUNCATION = ("keep_end", "keep_start")
_ON_BAD = ("drop", "error")


class BadExample(ValueError):
    """A row that cannot become a training pair; the message names the source, row and field,
    ``reason`` is the short category counted when such rows are dropped."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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


class PreferenceDataset(_TorchtunePreferenceDataset):
    """torchtune's ``PreferenceDataset`` (same loading, message transform and tokenization),
    tokenized eagerly so that every row is checked once at start-up: rows that cannot become a
    pair with at least one response token on each side are dropped and counted in one log line,
    or raise (``on_bad_example="error"``) with the source, row index and field in the message.

    Why our own class: torchtune tokenizes lazily and truncates only at the end of the sequence
    (cutting responses to nothing and leaving rows that give NaN average log-probs later); SimPO
    needs princeton's prompt-first truncation and a guarantee that every kept row is scorable.

    Args: see :func:`preference_dataset`.
    """

    def __init__(
        self,
        *,
        source: str,
        tokenizer: ModelTokenizer,
        column_map: Optional[Dict[str, str]] = None,
        train_on_input: bool = False,
        new_system_prompt: Optional[str] = None,
        filter_fn: Optional[Callable] = None,
        max_seq_len: Optional[int] = None,
        max_prompt_len: Optional[int] = None,
        prompt_truncation: str = "keep_end",
        on_bad_example: str = "drop",
        split: str = "train",
        **load_dataset_kwargs: Any,
    ) -> None:
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
        self._column_map = column_map or {"chosen": "chosen", "rejected": "rejected"}
        files = load_dataset_kwargs.get("data_files")
        # Empty files and JSON Lines lines that are not JSON objects, before `datasets` sees them
        # (it fails on both without naming the file or line): an error, or (drop) such lines
        # are replaced by `{}` in a temporary copy and counted below as bad rows.
        scratch = tempfile.TemporaryDirectory(prefix="prefopt_jsonl_")
        load_files, unparsable = scan_json_lines(source, files, on_bad_example, scratch=Path(scratch.name))
        if unparsable:
            load_dataset_kwargs = {**load_dataset_kwargs, "data_files": load_files}
        try:
            super().__init__(
                source=source,
                message_transform=ChosenRejectedToMessages(
                    train_on_input=False, column_map=column_map, new_system_prompt=new_system_prompt
                ),
                tokenizer=tokenizer,
                filter_fn=filter_fn,
                split=split,
                **load_dataset_kwargs,
            )
        except Exception as e:
            # `datasets` fails deep inside pyarrow on text it cannot decode; find the line.
            found = _undecodable_in_files(source, files)
            if found is None:
                raise
            # Always an error, also with on_bad_example=drop: the file does not load, so there
            # is no row to drop. Fix or delete that line.
            raise BadExample(f"{found}; the file cannot be loaded, fix or delete that line", "undecodable text") from e
        finally:
            scratch.cleanup()  # `datasets` has its own copy (arrow cache) now
        self.source_name = f"{source}:{files}" if files else f"{source}[{split}]"
        self.max_seq_len = max_seq_len
        self.max_prompt_len = max_prompt_len
        self.prompt_truncation = prompt_truncation
        self.dropped: Counter = Counter()
        self._examples: List[Dict[str, Any]] = []
        for row in range(len(self._data)):
            if row in unparsable:
                self.dropped["invalid JSON"] += 1
                continue
            try:
                self._examples.append(self._build(row, self._row(row)))
            except BadExample as e:
                if on_bad_example == "error":
                    raise
                self.dropped[e.reason] += 1
        if self.dropped:
            log.warning(
                "%s: dropped %d of %d rows (%s); set on_bad_example=error to stop at the first one",
                self.source_name,
                sum(self.dropped.values()),
                len(self._data),
                ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())),
            )
        if not self._examples:
            raise ValueError(f"{self.source_name}: no usable preference pairs (dropped: {dict(self.dropped)})")

    def _bad(self, row: int, field: str, what: str, reason: str) -> BadExample:
        return BadExample(f"{self.source_name}: row {row}, field {field!r}: {what}", reason)

    def _row(self, row: int) -> Mapping[str, Any]:
        """``self._data[row]``; bytes that are not UTF-8 inside a JSON string get through
        pyarrow's JSON reader and fail only here, when the row is decoded: a bad example."""
        try:
            return self._data[row]
        except UnicodeDecodeError as e:
            table = self._data.with_format("arrow")[row : row + 1]
            field = "?"
            for name in table.column_names:
                try:
                    table.column(name).to_pylist()
                except UnicodeDecodeError:
                    field = name
                    break
            raise self._bad(row, field, f"text that is not UTF-8 ({_undecodable_bytes(e)})", "undecodable text") from e

    def _check_messages(self, row: int, sample: Mapping[str, Any], key: str) -> None:
        col = self._column_map[key]
        if col not in sample or sample[col] is None:
            raise self._bad(row, col, "missing", "missing field")
        msgs = sample[col]
        if not isinstance(msgs, (list, tuple)) or not msgs:
            raise self._bad(row, col, f"expected a non-empty list of messages, got {type(msgs).__name__}", "wrong type")
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
                raise self._bad(
                    row, col, f"message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {m!r:.120}", "wrong type"
                )
            bad = _SURROGATE.search(m["content"])
            if bad:  # a lone surrogate: no tokenizer can encode it (not valid Unicode text)
                raise self._bad(
                    row, col, f"message {i} holds a lone surrogate {bad.group()!r} at character {bad.start()}: "
                    "not valid Unicode text", "undecodable text"
                )
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise self._bad(row, col, "has no non-empty assistant message", "empty response")

    def _build(self, row: int, sample: Mapping[str, Any]) -> Dict[str, Any]:
        self._check_messages(row, sample, "chosen")
        self._check_messages(row, sample, "rejected")
        messages = self._message_transform(dict(sample))
        parts = {}
        for key in ("chosen", "rejected"):
            msgs = messages[key]
            if msgs[-1].role != "assistant":
                raise self._bad(row, self._column_map[key], "the last message must be the assistant's response", "no final response")
            # Only the final assistant turn is the response (princeton's prompt is the whole
            # conversation before it): earlier assistant turns are shared context, and scoring
            # them would dilute the average log-prob with tokens both sides have.
            for m in msgs[:-1]:
                m.masked = True
            ids, mask = self._tokenizer.tokenize_messages(msgs)
            p = next((i for i, masked in enumerate(mask) if not masked), len(ids))
            parts[key] = (list(ids[:p]), list(ids[p:]), [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(ids[p:], mask[p:])])
        prompt = parts["chosen"][0]
        if prompt != parts["rejected"][0]:
            raise self._bad(
                row, self._column_map["rejected"], "its prompt (the messages before the first response) differs from the chosen one", "different prompts"
            )
        prompt, n_c, n_r = truncate_pair(
            prompt,
            parts["chosen"][1],
            parts["rejected"][1],
            max_seq_len=self.max_seq_len,
            max_prompt_len=self.max_prompt_len,
            prompt_truncation=self.prompt_truncation,
            bos_id=getattr(self._tokenizer, "bos_id", None),
        )
        out: Dict[str, Any] = {"row": row}
        for key, n in (("chosen", n_c), ("rejected", n_r)):
            _, resp_ids, resp_labels = parts[key]
            resp_ids, resp_labels = list(resp_ids[:n]), list(resp_labels[:n])
            if not any(l != CROSS_ENTROPY_IGNORE_IDX for l in resp_labels):
                raise self._bad(
                    row, self._column_map[key],
                    f"no response token left after truncation to max_seq_len={self.max_seq_len} "
                    f"(prompt is {len(prompt)} tokens; set max_prompt_len)",
                    "empty after truncation",
                )
            out[f"{key}_input_ids"] = list(prompt) + resp_ids
            out[f"{key}_labels"] = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt) + resp_labels
        if parts["chosen"][1][:n_c] == parts["rejected"][1][:n_r]:
            raise self._bad(
                row, self._column_map["rejected"],
                "chosen and rejected responses are identical" + (" after truncation" if (n_c, n_r) != (len(parts["chosen"][1]), len(parts["rejected"][1])) else ""),
                "identical responses",
            )
        return out

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self._examples[index]


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


def scan_json_lines(
    source: str, files: Any, on_bad_example: str = "drop", *, scratch: Optional[Path] = None
) -> Tuple[Any, Dict[int, str]]:
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

    Returns:
        Tuple[Any, Dict[int, str]]: ``data_files`` to load (the copies where lines were replaced,
        same structure as given) and ``{row: message}`` of the replaced lines.

    Raises:
        ValueError: an empty file; :class:`BadExample` (error mode) for the first bad line.
    """
    if source not in _TEXT_SOURCES or files is None:
        return files, {}
    paths = [Path(f) for f in _file_list(files) if isinstance(f, (str, Path)) and Path(f).is_file()]
    replaced: Dict[str, str] = {}
    bad_rows: Dict[int, str] = {}
    offset = 0
    for path in paths:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines(keepends=True)
        if not any(line.strip() for line in lines):
            raise ValueError(f"{path}: the data file is empty (no rows): check the path in data_files or the export that wrote it")
        if source != "json":
            continue
        first = next(line for line in lines if line.strip())
        jsonl = path.suffix in (".jsonl", ".ndjson")
        if not jsonl and path.suffix == ".json":
            try:
                jsonl = isinstance(json.loads(first), dict)
            except ValueError:
                jsonl = False  # a JSON document (an array, a pretty-printed object): not line based
        if not jsonl:
            continue
        out, row, changed = [], 0, False
        for lineno, raw in enumerate(lines, start=1):
            if not raw.strip():
                out.append(raw)
                continue
            try:
                obj = json.loads(raw)
                problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
            except UnicodeDecodeError:
                problem = None  # undecodable bytes: find_undecodable_text's job (a row error later)
            except ValueError as e:
                problem = f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
            if problem is None:
                out.append(raw)
            else:
                msg = f"{path}: line {lineno} (row {row}): {problem}"
                if on_bad_example == "error":
                    raise BadExample(msg + "; fix or delete that line, or set on_bad_example=drop to skip it", "invalid JSON")
                log.warning("%s; the row is dropped", msg)
                bad_rows[offset + row] = msg
                out.append(b"{}\n")
                changed = True
            row += 1
        offset += row
        if changed:
            if scratch is None:
                scratch = Path(tempfile.mkdtemp(prefix="prefopt_jsonl_"))
            copy = scratch / f"{len(replaced)}_{path.name}"
            copy.write_bytes(b"".join(out))
            replaced[str(path)] = str(copy)
    if not replaced:
        return files, bad_rows

    def swap(f: Any) -> Any:
        return replaced.get(str(f), f) if isinstance(f, (str, Path)) else f

    if isinstance(files, Mapping):
        files = {k: (swap(v) if isinstance(v, (str, Path)) else [swap(f) for f in v]) for k, v in files.items()}
    elif isinstance(files, (str, Path)):
        files = swap(files)
    else:
        files = [swap(f) for f in files]
    return files, bad_rows


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


def preference_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    column_map: Optional[Dict[str, str]] = None,
    train_on_input: bool = False,
    new_system_prompt: Optional[str] = None,
    filter_fn: Optional[Callable] = None,
    split: str = "train",
    max_seq_len: Optional[int] = None,
    max_prompt_len: Optional[int] = None,
    prompt_truncation: str = "keep_end",
    on_bad_example: str = "drop",
    **load_dataset_kwargs: Any,
) -> PreferenceDataset:
    """Builder with ``torchtune.datasets.preference_dataset``'s arguments plus truncation.

    Args:
        tokenizer (ModelTokenizer): the model's tokenizer (adds BOS/EOS and the chat template).
            Leave its own ``max_seq_len`` unset (or larger): it cuts the end of the sequence
            before this builder's prompt-first truncation can act.
        source (str): hub name, or ``json``/``csv``/``parquet``/... with ``data_files``.
        column_map (Optional[Dict[str, str]]): ``{"chosen": col, "rejected": col}``; each column
            holds a list of ``{"role", "content"}`` messages sharing the same prompt.
        train_on_input (bool): must be False (kept for torchtune signature compatibility).
        new_system_prompt (Optional[str]): replaces any system message.
        filter_fn (Optional[Callable]): ``datasets`` filter applied before anything else (row
            indices in messages are counted after it).
        split (str): dataset split, e.g. ``"train"`` or ``"train[:95%]"``.
        max_seq_len (Optional[int]): limit on prompt + response tokens (princeton's ``max_length``).
        max_prompt_len (Optional[int]): prompt limit applied when the pair is too long
            (princeton's ``max_prompt_length``).
        prompt_truncation (str): ``"keep_end"`` (default, princeton) or ``"keep_start"``.
        on_bad_example (str): ``"drop"`` (count and log) or ``"error"`` (raise at the first one).
            Text that is not UTF-8 inside a JSON Lines string is such a row ("undecodable
            text"). A file that ``datasets`` cannot load at all (a lone surrogate escape such
            as ``"\\ud800"``, bad bytes in a JSON array file) is always an error, naming the
            file, line, row and field: there is no row to drop.
        **load_dataset_kwargs: passed to ``datasets.load_dataset`` (``data_files``, ...).

    Returns:
        PreferenceDataset: items are dicts with ``chosen_input_ids``, ``chosen_labels``,
        ``rejected_input_ids``, ``rejected_labels`` (lists of ints) and ``row`` (source row).

    Raises:
        ValueError: on bad arguments, if no row is usable, or (``on_bad_example="error"``) on the
            first bad row, naming source, row and field; :class:`BadExample` (a ValueError) for
            a file with undecodable text that does not load.
    """
    return PreferenceDataset(
        source=source,
        tokenizer=tokenizer,
        column_map=column_map,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        filter_fn=filter_fn,
        max_seq_len=max_seq_len,
        max_prompt_len=max_prompt_len,
        prompt_truncation=prompt_truncation,
        on_bad_example=on_bad_example,
        split=split,
        **load_dataset_kwargs,
    )


def padded_collate_preference(
    batch: Sequence[Mapping[str, Any]],
    padding_idx: int = 0,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    pad_to_multiple_of: int = 1,
) -> Dict[str, torch.Tensor]:
    """Concatenate chosen then rejected rows into one right-padded batch for a single forward.

    Same layout as torchtune's ``padded_collate_dpo`` (rows ``[:b]`` chosen, ``[b:]`` rejected),
    plus ``rows`` (the source row of each pair, so an error can name the examples of a bad
    step) and ``pad_to_multiple_of`` (fewer distinct shapes under ``torch.compile``).

    Args:
        batch: items of :class:`PreferenceDataset`.
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
    ids = [torch.tensor(ex[f"{k}_input_ids"]) for k in ("chosen", "rejected") for ex in batch]
    labels = [torch.tensor(ex[f"{k}_labels"]) for k in ("chosen", "rejected") for ex in batch]
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
