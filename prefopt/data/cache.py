"""The tokenized-pairs cache: a build's Arrow files under ``<cache_dir>/preference/<key>/``, keyed
on everything that decides the tokens, written once per node and memory-mapped by every rank.

A build writes into a temporary folder and renames it (a reader sees a complete build or none);
the node's first rank builds while the node's other ranks wait (:class:`NodeBuilderFirst`).
"""

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import datasets
import torch

from prefopt.data.encoding import FEATURES, FORMATS, PairEncoder, format_hint

__all__ = ["default_cache_dir", "default_num_proc", "cache_key", "read_cached", "build_tokens", "NodeBuilderFirst"]

log = logging.getLogger("prefopt.data")

# Bump when the encoding changes what a cached file holds: old caches then miss.
_CACHE_VERSION = 3
# Below this many rows per process, forking workers costs more than it saves.
_MIN_ROWS_PER_PROC = 2000
# A build's scratch folders older than this were left by a build that was killed (a build of
# millions of rows takes minutes): the next build removes them.
_STALE_SECONDS = 24 * 3600


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


def cache_key(data_fingerprint: str, encoder: PairEncoder) -> Optional[str]:
    """Hex key of everything that decides the tokens: the data (``datasets``' fingerprint of the
    loaded, filtered split, or for local JSON Lines files the files' paths, sizes and times),
    the tokenizer (its pickled state: model, special tokens, chat template), the format,
    column_map and truncation settings. None if the tokenizer cannot be hashed (then nothing is
    cached)."""
    from datasets.fingerprint import Hasher

    # torchtune's sentencepiece tokenizer sets the ids of its whitespace prefix at its first use,
    # which changes its pickled state: a tokenizer that had tokenized would get another key than
    # a fresh one. They are left out of the hash.
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
        "tokenizer": [type(tok_obj).__module__, type(tok_obj).__qualname__, tok],
        "settings": encoder.settings(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def read_cached(folder: Path) -> Optional[datasets.Dataset]:
    """The tokens of the complete build in ``folder``, memory-mapped; None if there is none.

    A build that cannot be read (a file cut short or changed on disk) is moved out of the way
    with a warning, so that this start builds it again, instead of failing at every start."""
    if not (folder / "manifest.json").exists():
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        parts = [datasets.Dataset.from_file(str(folder / f)) for f in manifest["files"]]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(ds) != manifest["rows"] or ds.features != FEATURES:
            raise ValueError(f"{len(ds)} rows of {ds.features}, the manifest says {manifest['rows']} rows")
        return ds
    except Exception as e:  # noqa: BLE001 (pyarrow's errors, JSON, a missing file: all mean "rebuild")
        log.warning("%s: the cached tokens cannot be read (%s: %s); building them again", folder, type(e).__name__, e)
        aside = folder.with_name(f"{folder.name}.tmp-corrupt-{os.getpid()}-{time.time_ns()}")
        try:
            folder.rename(aside)  # (a ".tmp-" name: removed now, or by a later build once stale)
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:  # another rank moved it first
            pass
        return None


def _remove_stale(folder: Path) -> None:
    """Remove the scratch folders (``raw-*``, ``*.tmp-*``) a killed build left in ``folder``:
    those not modified for a day (age, not the owner's pid: on a disk shared by several nodes
    the owner may run on another machine)."""
    now = time.time()
    for p in folder.iterdir():
        if (p.name.startswith("raw-") or ".tmp-" in p.name) and p.is_dir():
            try:
                if now - p.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
                    log.info("removed %s, left by a build that did not finish", p)
            except OSError:  # another builder removed it first
                pass


def build_tokens(
    raw: Any, encoder: PairEncoder, *, key: Optional[str], root: Path, num_proc: Optional[int]
) -> Tuple[datasets.Dataset, Dict[str, Any]]:
    """Every row of ``raw`` through ``encoder`` (bad rows included, marked) with ``Dataset.map``
    into ``root/<key>/`` (a temporary folder when ``key`` is None: not cached).

    Returns:
        (tokens, info): a memory-mapped Dataset of :data:`FEATURES` columns, one row per source
        row; info has ``cache`` ("built", or None when not cached), ``path``, ``num_proc``.

    Raises:
        ValueError: a column the format reads is not in ``raw``.
    """
    if not isinstance(raw, datasets.Dataset):
        # A loader that hands over Python rows (not Arrow): tokenized in memory, not cached.
        rows = list(raw)
        return datasets.Dataset.from_dict(encoder.encode_rows(rows, range(len(rows))), features=FEATURES), {"cache": None}
    missing = sorted(set(encoder.cols.values()) - set(raw.column_names))
    if missing:
        raise ValueError(
            f"{encoder.source_name}: no column {', '.join(map(repr, missing))} (columns: {raw.column_names}); format "
            f"{encoder.format!r} reads {FORMATS[encoder.format]}: set format, or column_map to rename them"
            + format_hint(raw.select(range(min(len(raw), 20))).to_list(), encoder.format)
        )
    encoder.features = raw.features
    n_proc = max(1, min(num_proc or default_num_proc(), len(raw) // _MIN_ROWS_PER_PROC))
    tmp = root / f"{key or 'uncached'}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    try:
        out = raw.with_format("arrow").map(
            encoder,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            features=FEATURES,
            num_proc=n_proc if n_proc > 1 else None,
            cache_file_name=str(tmp / "tokens.arrow"),
            load_from_cache_file=False,  # our key decides; datasets would hash the tokenizer again
            new_fingerprint=key or None,
            desc=f"tokenizing {encoder.source_name}",
        )
        files = [os.path.basename(f["filename"]) for f in out.cache_files]
        (tmp / "manifest.json").write_text(json.dumps({"rows": len(out), "files": files, "num_proc": n_proc}))
        del out
        if key is None:
            return read_cached(tmp), {"cache": None, "path": str(tmp), "num_proc": n_proc}
        try:
            tmp.rename(root / key)  # atomic: a reader sees a complete build or none
        except OSError:  # another process (another node's builder on a shared disk) was first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ds = read_cached(root / key)
    if ds is None:
        raise RuntimeError(f"{root / key}: the tokenized data just written cannot be read back")
    return ds, {"cache": "built", "path": str(root / key), "num_proc": n_proc}


class NodeBuilderFirst:
    """Under ``torch.distributed``: the node's first rank (``LOCAL_RANK`` 0) runs the block
    first, the node's other ranks wait at a barrier and run it after (then it reads the cache
    the builder wrote). Every rank calls the barrier exactly once, also when the builder's block
    raises (the others then run it themselves and meet the same error). Without an initialized
    process group of more than one rank it does nothing. So under torch.distributed every rank
    must build the same data sets in the same order (the recipes do), or the barrier waits."""

    def __enter__(self) -> "NodeBuilderFirst":
        d = torch.distributed
        self.on = d.is_available() and d.is_initialized() and d.get_world_size() > 1
        self.builder = True
        if self.on:
            self.builder = int(os.environ.get("LOCAL_RANK", d.get_rank())) == 0
            if not self.builder:
                d.barrier()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.on and self.builder:
            torch.distributed.barrier()


def cache_root(cache_dir: Optional[Union[str, Path]]) -> Path:
    """The folder of the preference caches: ``<cache_dir or default_cache_dir()>/preference``."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "preference"
