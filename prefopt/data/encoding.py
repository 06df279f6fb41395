"""Encoding one source row into a training pair: the four row formats read and checked,
torchtune's tokenizer applied to both conversations, princeton-style truncation, and the
tokenized columns that the cache stores.

:class:`PairEncoder` is the ``Dataset.map`` function (picklable, so ``num_proc`` worker
processes can run it); :func:`truncate_pair` is princeton-nlp/SimPO's truncation rule on ids.
"""

import gc
import itertools
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import pyarrow as pa
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from prefopt.data.sources import INVALID_JSON, BadExample, has_surrogate, undecodable_bytes

__all__ = ["FORMATS", "PROMPT_TRUNCATION", "FEATURES", "PairEncoder", "truncate_pair"]

ROLES = ("system", "user", "assistant", "ipython", "tool")
_ROLE_SET = frozenset(ROLES)
PROMPT_TRUNCATION = ("keep_end", "keep_start")
# format -> the columns it reads (the keys ``column_map`` may rename)
FORMATS: Dict[str, Tuple[str, ...]] = {
    "messages": ("chosen", "rejected"),
    "trl_conversational": ("prompt", "chosen", "rejected"),
    "trl_strings": ("prompt", "chosen", "rejected"),
    "princeton": ("prompt", "chosen", "rejected"),
}

_TOKENS = datasets.List(datasets.Value("int32"))
FEATURES = datasets.Features(
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
_SCHEMA = FEATURES.arrow_schema
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



class PairEncoder:
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
        # {row: message} of source lines that were not rows (read_rows'), set before mapping
        self.line_errors: Dict[int, str] = {}
        self._arrow_text = False  # rows come from Arrow (valid UTF-8), set by __call__
        # What torchtune's ChosenRejectedToMessages does (a new system prompt replaces the rows'
        # system messages), done in `_messages_of`: it built the prompt turns' Messages twice.
        self._system = (Message(role="system", content=new_system_prompt, masked=True, eot=True),) if new_system_prompt is not None else ()

    def settings(self) -> Dict[str, Any]:
        """What, besides the tokenizer and the data, decides the tokens (for the cache key)."""
        return {k: getattr(self, k) for k in ("format", "cols", "new_system_prompt", "max_seq_len", "max_prompt_len", "prompt_truncation")}

    # -- row checks -------------------------------------------------------------------------
    def _bad(self, row: int, field: str, what: str, reason: str) -> BadExample:
        # no "<source>: " prefix: the message is stored in the cache, and the same data read
        # under another spelling of its path (same key) is named as given, when it is raised
        return BadExample(f"row {row}, field {field!r}: {what}", reason)

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
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLE_SET:
                raise self._bad(
                    row, col, f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}", "wrong type"
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
        bad = has_surrogate(text)
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
        # Both sides share the prompt, and the tokenizer is most of a build's time: without a
        # memo the rejected side's prompt turns are encoded a second time (benchmarks/README.md).
        # torchtune's tokenizers encode message by message through `self.encode`, so a memo of
        # it for this row gives the rejected side the very ids a fresh call would (same text,
        # same arguments); a tokenizer that does not call `self.encode` is simply not sped up.
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
        # (slices only where needed: every copy of a response's ids is paid on every row)
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
                rows.append(self._bad(row, field, f"text that is not UTF-8 ({undecodable_bytes(e)})", "undecodable text"))
        return rows

    def encode_rows(self, rows: Sequence[Any], indices: Sequence[int]) -> Dict[str, List[Any]]:
        """Columns (:data:`FEATURES`) for a batch of rows; bad rows keep their place, with
        ``bad`` (the reason) and ``error`` (the message) set and empty token lists."""
        out: Dict[str, List[Any]] = {k: [] for k in FEATURES}
        for row, sample in zip(indices, rows):
            try:
                if row in self.line_errors:
                    raise BadExample(self.line_errors[row], INVALID_JSON)
                if isinstance(sample, BadExample):
                    raise sample
                enc = self.encode(row, sample)
                enc["bad"], enc["error"] = "", ""
            except BadExample as e:
                enc = dict(_EMPTY, bad=e.reason, error=str(e))
            enc["row"] = row
            for k in out:
                out[k].append(enc[k])
        return out

    def __call__(self, table: Any, indices: Sequence[int]) -> Any:
        cols = [c for c in set(self.cols.values()) if c in table.column_names]
        # Text decoded from Arrow is valid UTF-8, so it holds no lone surrogate: skip that scan.
        self._arrow_text = True
        # No cyclic garbage collection during a batch: encoding makes millions of small lists and
        # dicts, none in a reference cycle (refcounting frees them), while each collection of the
        # oldest generation walks every object of a process that has imported torch (about a
        # tenth of a build's CPU time: benchmarks/README.md). Collections run between batches.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            out = self.encode_rows(self.rows_of(table.select(cols), indices), indices)
        finally:
            if was_enabled:
                gc.enable()
        # An Arrow table, not a dict (datasets' generic conversion of Python lists is slower), its
        # token lists through numpy (faster than pyarrow's own conversion of nested lists here:
        # benchmarks/README.md)
        return pa.table({k: _token_lists(v) if k in _LIST_COLUMNS else v for k, v in out.items()}, schema=_SCHEMA)



def format_hint(rows: Sequence[Any], current: str) -> str:
    """``"; the rows read as format 'x'"`` when every one of ``rows`` (a few source rows, Python
    dicts) gives both conversations under another format with its own column names, else ``""``
    (for the errors of a split whose rows all fail)."""
    fits = []
    for name, cols in FORMATS.items():
        if name == current or not rows:
            continue
        enc = PairEncoder(tokenizer=None, format=name, column_map={c: c for c in cols}, new_system_prompt=None,
                          max_seq_len=None, max_prompt_len=None, prompt_truncation="keep_end", source_name="")
        try:
            for i, r in enumerate(rows):
                enc.conversations(i, r)
        except (BadExample, AttributeError, TypeError, IndexError):
            continue
        fits.append(name)
    return f"; the rows read as format {' or '.join(map(repr, fits))}: set dataset.format" if fits else ""
