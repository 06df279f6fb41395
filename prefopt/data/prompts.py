"""Prompts for generation: read from a preference file in any of the four formats (each pair's
prompt) or from a plain prompts file, deduplicated and ordered as princeton's
``on_policy_data_gen/decode.py`` does (``sorted(set(prompts))``).

Config use (the ``prompts`` block of ``recipes/generate_preference_pairs.py``)::

    prompts:
      _component_: prefopt.data.read_prompts
      source: json
      data_files: my_pairs.jsonl
      format: princeton     # messages, trl_conversational, trl_strings, princeton, or prompts
"""

import json
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from prefopt.data.encoding import FORMATS, ROLES, PairEncoder
from prefopt.data.sources import INVALID_JSON, BadExample, read_rows

__all__ = ["PROMPT_FORMATS", "PromptSet", "prompt_key", "read_prompts"]

# "prompts": a `prompt` column holding a string (one user turn) or a list of messages
PROMPT_FORMATS = (*FORMATS, "prompts")


@dataclass
class PromptSet:
    """Deduplicated prompts in princeton's order, and what reading them found.

    Attributes:
        prompts: each a list of ``{"role", "content"}`` messages ending with a user (or
            system/tool) turn, in :func:`prompt_key` order.
        rows: source rows read.
        duplicates: rows whose prompt an earlier row already had.
        bad: rows skipped, by reason (a missing field, a wrong type, invalid JSON, ...).
    """

    prompts: List[List[Dict[str, str]]]
    rows: int
    duplicates: int
    bad: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.prompts)


def prompt_key(messages: List[Dict[str, str]]) -> str:
    """What identifies a prompt (dedup, sort, the per-prompt seed): the text of a single user
    turn (princeton's prompts are those strings, sorted), else the messages as compact JSON."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))


def _plain_prompt(row: int, sample: Mapping[str, Any], col: str) -> List[Dict[str, str]]:
    value = sample.get(col)
    if value is None:
        raise BadExample(f"row {row}, field {col!r}: missing", "missing field")
    if isinstance(value, str):
        if not value.strip():
            raise BadExample(f"row {row}, field {col!r}: an empty prompt", "empty prompt")
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(m, Mapping) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise BadExample(f"row {row}, field {col!r}: expected a string or a list of messages, got {value!r:.80}", "wrong type")


def read_prompts(
    source: str = "json",
    data_files: Any = None,
    split: str = "train",
    format: str = "prompts",
    column_map: Optional[Dict[str, str]] = None,
    max_prompts: Optional[int] = None,
) -> PromptSet:
    """Read, check, deduplicate and sort the prompts of a split.

    Args:
        source, data_files, split: as for ``datasets.load_dataset``.
        format (str): one of :data:`PROMPT_FORMATS`; a preference format gives each pair's prompt
            (the turns before the final response), ``prompts`` reads a ``prompt`` column.
        column_map: renames the columns the format reads (as in :func:`prefopt.data.preference_dataset`).
        max_prompts (Optional[int]): keep the first N prompts after sorting (a trial run).

    Returns:
        PromptSet: rows that are not usable are skipped and counted by reason.

    Raises:
        ValueError: an unknown format, or no usable prompt at all.
    """
    if format not in PROMPT_FORMATS:
        raise ValueError(f"format: {format!r}, expected one of {list(PROMPT_FORMATS)}")
    kwargs = {"data_files": data_files} if data_files is not None else {}
    cols = {c: c for c in FORMATS.get(format, ("prompt",))}
    cols.update(column_map or {})
    encoder = PairEncoder(tokenizer=None, format=format if format in FORMATS else "princeton", column_map=cols,
                          new_system_prompt=None, max_seq_len=None, max_prompt_len=None,
                          prompt_truncation="keep_end", source_name=str(data_files or source))
    with tempfile.TemporaryDirectory(prefix="prefopt-prompts-") as scratch:
        data, line_errors = read_rows(source, split, kwargs, None, Path(scratch))
        rows = data.to_list()
    bad: Counter = Counter()
    seen: Dict[str, List[Dict[str, str]]] = {}
    for i, sample in enumerate(rows):
        try:
            if i in line_errors:
                raise BadExample(line_errors[i], INVALID_JSON)
            if format == "prompts":
                prompt = _plain_prompt(i, sample, cols["prompt"])
            else:
                prompt = encoder.conversations(i, sample)[0][:-1]
            if not prompt or prompt[-1]["role"] == "assistant":
                raise BadExample(f"row {i}: the prompt must end with a user turn", "no prompt")
        except BadExample as e:
            bad[e.reason] += 1
            continue
        seen.setdefault(prompt_key(prompt), prompt)
    if not seen:
        raise ValueError(f"{data_files or source}: no usable prompt in {len(rows)} rows (skipped: {dict(bad)}); "
                         f"check the format ({format!r}) and column_map")
    prompts = [seen[k] for k in sorted(seen)]
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    usable = len(rows) - sum(bad.values())
    return PromptSet(prompts=prompts, rows=len(rows), duplicates=usable - len(seen), bad=bad)
