"""Reading a split's rows: local files and hub data sets into an Arrow-backed ``datasets.Dataset``,
with the lines that are not rows named.

One path for every source (:func:`read_rows`): check the local files (an empty file is an error;
in a JSON Lines file each line that is not a JSON object becomes a bad row, kept in place as
``{}`` so that the rows after it keep their numbers), read them, apply ``filter_fn``. Whether a
bad row is dropped or raised is not decided here: :class:`prefopt.data.PreferenceDataset` decides
it, for these rows and the encoder's alike.
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import pyarrow as pa
from datasets import load_dataset

__all__ = ["BadExample", "INVALID_JSON", "find_undecodable_text", "scan_json_lines", "expand_data_files", "local_json_lines",
           "files_fingerprint", "read_rows", "data_files_problems"]

log = logging.getLogger("prefopt.data")

# the reason of a JSON Lines line that is not a JSON object
INVALID_JSON = "invalid JSON"
_TEXT_SOURCES = ("json", "csv", "text")
_SURROGATE = re.compile("[\ud800-\udfff]")
# a \\uD800-\\uDFFF escape (not preceded by an escaping backslash), with the low half if it has one
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?")


class BadExample(ValueError):
    """A row that cannot become a training pair; the message names the source, row and field,
    ``reason`` is the short category counted when such rows are dropped."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable with its reason (worker processes may raise it)
        return (type(self), (str(self), self.reason))


# ---------------------------------------------------------------------------------- undecodable text
def undecodable_bytes(e: UnicodeDecodeError) -> str:
    """The bytes a decode error is about, with some context (for messages)."""
    return f"{e.object[e.start : e.end]!r} at byte {e.start} of {e.object[max(0, e.start - 20) : e.end + 20]!r}"


def has_surrogate(text: str) -> Optional[re.Match]:
    """The first lone surrogate in ``text`` (not valid Unicode: no tokenizer can encode it)."""
    return _SURROGATE.search(text)


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
                return f"{where}{', field ' + repr(field) if field else ''}: bytes that are not UTF-8 ({undecodable_bytes(e)})"
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


# ---------------------------------------------------------------------------------- local files
def _file_list(files: Any) -> List[Any]:
    """``data_files`` (a path, a list, or ``{split: path(s)}``) as a flat list."""
    if isinstance(files, Mapping):
        return [f for v in files.values() for f in ([v] if isinstance(v, (str, Path)) else v)]
    if isinstance(files, (str, Path)):
        return [files]
    return list(files) if isinstance(files, (list, tuple)) or hasattr(files, "__iter__") else []


def _local_files(source: str, files: Any) -> List[Path]:
    """The plain local files of a text source (globs and remote files are left to ``datasets``)."""
    if source not in _TEXT_SOURCES or files is None:
        return []
    return [Path(f) for f in _file_list(files) if isinstance(f, (str, Path)) and Path(f).is_file()]


# which files of a folder each source reads (a folder given as data_files)
_SUFFIXES = {"json": (".json", ".jsonl", ".ndjson"), "csv": (".csv",), "text": (".txt",), "parquet": (".parquet",), "arrow": (".arrow",)}
# the first bytes of binary formats a text source cannot read
_MAGIC = {b"PAR1": ("a Parquet file", "source: parquet"), b"ARROW1": ("an Arrow file", "source: arrow"),
          b"\x1f\x8b": ("gzip-compressed", "a .gz name (datasets decompresses it)"), b"PK\x03\x04": ("a zip archive", "its extracted files")}


def expand_data_files(source: str, files: Any) -> Any:
    """``data_files`` with each local folder replaced by the files in it that ``source`` reads
    (sorted; ``datasets`` does not read a folder given as a file: "Unable to find").

    Raises:
        ValueError: a folder with no such file, naming it and what it holds.
    """
    def expand(f: Any) -> List[Any]:
        if not isinstance(f, (str, Path)) or not Path(f).is_dir():
            return [f]
        found = sorted(str(p) for p in Path(f).iterdir() if p.is_file() and p.suffix in _SUFFIXES.get(source, ()))
        if not found:
            held = sorted(p.name for p in Path(f).iterdir())[:8]
            raise ValueError(f"data_files: {f} is a folder with no {'/'.join(_SUFFIXES.get(source, ('?',)))} file for source "
                             f"{source!r} (it holds {held}); name the files, or a glob such as {Path(f) / '*.jsonl'}")
        return found

    if isinstance(files, Mapping):
        return {k: [x for f in ([v] if isinstance(v, (str, Path)) else v) for x in expand(f)] for k, v in files.items()}
    if isinstance(files, (str, Path)):
        out = expand(files)
        return out[0] if len(out) == 1 and out[0] == files else out
    if isinstance(files, (list, tuple)):
        return [x for f in files for x in expand(f)]
    return files


def _columns(path: Path, source: str) -> Optional[List[str]]:
    """The columns of a local file from its first row (JSON Lines) or header (CSV), else None."""
    first = _first_nonblank_line(path)
    if first is None:
        return None
    try:
        if source == "json" and _is_json_lines(path, first):
            return sorted(json.loads(first))
        if source == "csv":
            import csv

            return next(csv.reader([first.decode("utf-8")]))
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    return None


def different_columns(source: str, files: Any) -> Optional[str]:
    """A message naming the files of one ``data_files`` list and their columns when the local
    files' columns differ (``datasets`` fails on them with a bare DatasetGenerationError), else
    None."""
    cols = {str(p): _columns(p, source) for p in _local_files(source, files)}
    seen = {tuple(c) for c in cols.values() if c is not None}
    if len(seen) < 2:
        return None
    listed = "; ".join(f"{f}: {c}" for f, c in cols.items() if c is not None)
    return f"data_files: the files do not have the same columns ({listed}): give them the same columns, or load them as separate data sets"


def _first_nonblank_line(path: Path) -> Optional[bytes]:
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


def scan_json_lines(path: Path, first_row: int = 0) -> Tuple[Dict[int, Tuple[int, str]], int]:
    """Every line of a JSON Lines file parsed: ``({row: (line, message)}`` of the lines that are
    not a JSON object, the number of rows``)``. Rows are the non-blank lines, numbered from
    ``first_row`` (rows of several files count on across them, as ``datasets`` concatenates
    them); a message names the file, the line (1-based) and the row.

    Every line, not only those that do not look like ``{...}``: invalid JSON between braces and
    two objects on one line look like one; parsing all of them costs ~2 s of a ~30 s first build
    of 375 MB, once, for one simple path (the tokens are cached).
    """
    bad: Dict[int, Tuple[int, str]] = {}
    row = first_row
    with open(path, "rb") as fh:  # line by line: a whole 390 MB file in memory took ~750 MB
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                problem = None if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
            except UnicodeDecodeError:
                problem = None  # undecodable bytes: the row is read and reported by the encoder
            except ValueError as e:
                problem = f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
            if problem is not None:
                bad[row] = (lineno, f"{path}: line {lineno} (row {row - first_row}): {problem}")
            row += 1
    return bad, row - first_row


def local_json_lines(source: str, split: str, kwargs: Dict[str, Any]) -> Optional[List[Path]]:
    """The files of a ``source="json"`` load of local JSON Lines files with ``data_files`` only
    and the whole ``train`` split (what :func:`files_fingerprint` can key and pyarrow can read
    directly), else None."""
    files = kwargs.get("data_files")
    if source != "json" or set(kwargs) != {"data_files"} or split != "train" or not isinstance(files, (str, Path, list, tuple)):
        return None
    listed = _file_list(files)
    paths = _local_files(source, files)
    if not paths or len(paths) != len(listed):
        return None
    for p in paths:
        first = _first_nonblank_line(p)
        if first is not None and not _is_json_lines(p, first):
            return None
    return paths


def files_fingerprint(paths: Sequence[Path], split: str, filter_fn: Optional[Callable]) -> Optional[str]:
    """What identifies the rows of local files without reading them: each file's resolved path,
    size, modification time, inode and status-change time, the split and the filter. None if the
    filter cannot be hashed.

    Size and mtime alone (``datasets``' fingerprint of local files) miss a corrected file copied
    in with ``cp -p`` or ``rsync -a`` (same size, mtime set back): a new file has a new inode, and
    no tool can set the status-change time, which any write moves. Reading the content instead
    would cost a cached start ~1 s per GB."""
    from datasets.fingerprint import Hasher

    try:
        fn = Hasher.hash(filter_fn) if filter_fn is not None else None
    except Exception:
        return None
    stats = [[str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] for p, st in ((p, p.stat()) for p in paths)]
    return hashlib.sha256(json.dumps(["json-lines", stats, split, fn]).encode()).hexdigest()


# ---------------------------------------------------------------------------------- reading
def _check_files(source: str, files: Any, scratch: Path) -> Tuple[Any, Dict[int, str]]:
    """``(data_files to read, {row: message} of JSON Lines lines that are not JSON objects)``:
    an empty file is an error (``datasets`` raises a bare ``StopIteration`` or loads 0 rows); a
    file with such lines is read from a copy in ``scratch`` where each is ``{}``.

    Raises:
        ValueError: naming an empty file.
    """
    bad: Dict[int, str] = {}
    replaced: Dict[str, str] = {}
    rows = 0
    for path in _local_files(source, files):
        if path.suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
            continue  # compressed by name: datasets decompresses it
        with open(path, "rb") as fh:
            head = fh.read(8)
        for magic, (what, use) in _MAGIC.items():
            if head.startswith(magic):
                raise ValueError(f"{path}: {what} (its first bytes are {head[:len(magic)]!r}), not {source} text: use {use}")
        first = _first_nonblank_line(path)
        if first is None:
            raise ValueError(f"{path}: the data file is empty (no rows): check the path in data_files or the export that wrote it")
        if source != "json" or not _is_json_lines(path, first):
            continue
        found, n = scan_json_lines(path, rows)
        rows += n
        if found:
            bad.update((r, msg) for r, (_, msg) in found.items())
            lines = {lineno for lineno, _ in found.values()}
            copy = scratch / f"{len(replaced)}_{path.name}"
            with open(path, "rb") as src, open(copy, "wb") as dst:
                for lineno, raw in enumerate(src, start=1):
                    dst.write(b"{}\n" if lineno in lines else raw)
            replaced[str(path)] = str(copy)
    if not replaced:
        return files, bad

    def swap(f: Any) -> Any:
        return replaced.get(str(f), f) if isinstance(f, (str, Path)) else f

    if isinstance(files, Mapping):
        files = {k: (swap(v) if isinstance(v, (str, Path)) else [swap(f) for f in v]) for k, v in files.items()}
    elif isinstance(files, (str, Path)):
        files = swap(files)
    else:
        files = [swap(f) for f in files]
    return files, bad


def _read_json_lines(files: Sequence[Any], out: Path) -> Optional[datasets.Dataset]:
    """Local JSON Lines files -> one memory-mapped Arrow file ``out`` -> a Dataset; None when
    pyarrow cannot read them as one table (a column whose type changes, files of different
    columns): ``datasets.load_dataset`` then reads them its own way.

    Why not ``load_dataset("json")`` for every file: it parses in one thread and keeps a copy
    of the whole file in its cache for good; pyarrow's streaming reader parses blocks on every
    core into a file that lives only while the tokens are built (the same reader and type
    inference, so the same rows).
    """
    import pyarrow.json as paj
    from datasets.table import MemoryMappedTable

    block = 1 << 20
    while True:
        try:
            with pa.OSFile(str(out), "wb") as sink:
                writer, schema = None, None
                for f in files:
                    reader = paj.open_json(str(f), read_options=paj.ReadOptions(block_size=block, use_threads=True))
                    if writer is None:
                        schema = reader.schema
                        writer = pa.ipc.new_stream(sink, schema)
                    elif reader.schema != schema:
                        log.debug("%s: files of different columns; datasets.load_dataset reads them", files)
                        return None
                    for batch in reader:
                        writer.write_batch(batch)
                writer.close()
            return datasets.Dataset(MemoryMappedTable.from_file(str(out)))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            if isinstance(e, pa.ArrowInvalid) and "straddling" in str(e) and block < (64 << 20):  # a line longer than a block
                block *= 8
                continue
            log.debug("pyarrow cannot read %s as one table (%s); datasets.load_dataset reads it", files, e)
            return None


def read_rows(
    source: str, split: str, kwargs: Dict[str, Any], filter_fn: Optional[Callable], scratch: Path
) -> Tuple[datasets.Dataset, Dict[int, str]]:
    """A split's rows and ``{row: message}`` of its JSON Lines lines that are not JSON objects
    (those rows are ``{}``, in place, for the encoder to mark).

    Args:
        source, split, kwargs: as for ``datasets.load_dataset(source, split=split, **kwargs)``.
        filter_fn (Optional[Callable]): ``datasets`` filter, applied last.
        scratch (Path): a folder for copies and Arrow files that live while the tokens are built.

    Raises:
        ValueError: an empty file; :class:`BadExample` for a text file ``datasets`` cannot load
            because of undecodable text (there is no row to drop), naming file, line and field.
    """
    paths = local_json_lines(source, split, kwargs)
    # pyarrow's reader works in its own threads, without the GIL: the files are read while their
    # lines are checked, and that read is used when no line was replaced (the common case; it took
    # ~2 s off a ~24 s first build: benchmarks/README.md)
    pool = ThreadPoolExecutor(max_workers=1) if paths else None
    early = pool.submit(_read_json_lines, paths, scratch / "rows-early.arrow") if pool else None
    try:
        files, bad = _check_files(source, kwargs.get("data_files"), scratch)
    finally:
        read = early.result() if early else None  # (also before the check's error)
        if pool:
            pool.shutdown()
    if paths and bad:  # lines replaced: read the copies instead
        read = _read_json_lines(_file_list(files), scratch / "rows.arrow")
    data = read
    if data is None:
        try:
            data = load_dataset(source, split=split, **({**kwargs, "data_files": files} if bad else kwargs))
        except Exception as e:
            # `datasets` fails deep inside pyarrow on text it cannot decode; find the line. An
            # error in either mode: the file does not load, so there is no row to drop.
            for f in _local_files(source, kwargs.get("data_files")):
                found = find_undecodable_text(f)
                if found is not None:
                    raise BadExample(f"{found}; the file cannot be loaded, fix or delete that line", "undecodable text") from e
            differ = different_columns(source, kwargs.get("data_files"))
            if differ is not None:
                raise ValueError(differ) from e
            raise
    if filter_fn is not None:
        data = data.filter(filter_fn)
        if bad:  # rows renumbered by the filter: keep the messages of the rows it kept
            kept = data._indices.column(0).to_pylist() if data._indices is not None else range(len(data))
            bad = {new: bad[old] for new, old in enumerate(kept) if old in bad}
    return data, bad


_GLOB = re.compile(r"[*?\[]")


def data_files_problems(source: str, split: str, data_files: Any, key: str = "dataset") -> List[str]:
    """What is wrong with a config's local ``data_files`` and ``split``, found without reading a
    row (for the recipes' start-up check, before any model is built): files that do not exist or
    cannot be read, and a split the files do not have (local files have the split ``train``, or
    the keys of a ``{split: files}`` mapping; hub configs name others, e.g. ``train_prefs``).

    Returns:
        List[str]: one message per problem, each naming ``<key>.data_files`` or ``<key>.split``.
    """
    if data_files is None:
        return []
    problems = []
    for f in _file_list(data_files):
        if not isinstance(f, (str, Path)) or _GLOB.search(str(f)) or "://" in str(f):
            continue  # a glob or a remote file: datasets resolves it
        p = Path(f)
        if not p.exists():
            near = sorted(x.name for x in p.parent.iterdir())[:8] if p.parent.is_dir() else None
            problems.append(f"{key}.data_files: {f} does not exist" + (f" (its folder holds {near})" if near is not None else
                                                                       f" (nor does its folder {p.parent})"))
        elif not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
            problems.append(f"{key}.data_files: {f} cannot be read (permissions)")
    splits = list(data_files) if isinstance(data_files, Mapping) else ["train"]
    base = re.split(r"[\[+]", split, maxsplit=1)[0]
    if source in _SUFFIXES and base not in splits:
        problems.append(f"{key}.split: {split!r}, but the local data_files have only the split(s) {splits}"
                        + (" (data_files as a {split: files} mapping names others)" if not isinstance(data_files, Mapping) else ""))
    return problems
