"""What a resume must keep, and the one text that says it does not: the comparison half of
:mod:`prefopt.resume` (which re-exports all of this).

A resume continues a saved run only if everything that decides the rest of the run is the same:

- the config keys of :data:`RESUME_KEYS` (and each recipe's own), compared block by block with the
  saved ``config.yaml`` (:func:`resume_mismatches`); a key of :data:`SAVED_IF_NULL` left null is
  taken from the saved run instead;
- values the config alone does not fix (a seed drawn at random, ``batch_size x world_size``);
- the data (:func:`data_identity`: source, cache key, rows): the same config can read other rows
  (rows appended to the file, a file replaced), which would silently give another order, some
  pairs trained twice and others never (:func:`data_mismatches`).

:func:`check_resume` raises :class:`ResumeMismatchError` with every difference, in one text for
every recipe.
"""

from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "CONFIG_FILE",
    "RESUME_KEYS",
    "SAVED_IF_NULL",
    "ResumeMismatchError",
    "resume_mismatches",
    "data_identity",
    "data_mismatches",
    "check_resume",
    "checkpoint_files_state",
    "code_state",
    "input_changes",
]

CONFIG_FILE = "config.yaml"  # the run config, in output_dir and in every resume state (prefopt.resume)

# Top-level config keys (whole blocks: every key inside them) that must be the same in a resumed
# run as in the run that wrote the resume state: they decide which pairs make up each step (the
# data, its truncation, the order), how many steps there are (the LR schedule's length), and the
# shapes of what is restored (the model, e.g. model.lora_rank). A new such key (say `packed`) is
# one more entry here. Recipes add their own (e.g. optimizer_in_bwd) and derived values (the
# distributed recipe: batch_size x world_size, since the world size may change on resume).
RESUME_KEYS: Tuple[str, ...] = (
    "model",
    "dataset",
    "seed",
    "shuffle",
    "batch_size",
    "gradient_accumulation_steps",
    "epochs",
    "max_steps_per_epoch",
    "packed",
)
# Keys that a resume takes from the saved run when this run's config leaves them null: `seed: null`
# draws a seed at random, and a resume must go on with the one the saved run drew, not refuse
# because of a seed the user never set (the recipe restores it and says so).
SAVED_IF_NULL: Tuple[str, ...] = ("seed",)


class ResumeMismatchError(ValueError):
    """The config, or the data, differs from the saved run's in what a resume must keep."""


def _flat(value: Any, prefix: str) -> Dict[str, Any]:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        out: Dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out or {prefix: {}}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple, DictConfig, ListConfig)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def resume_mismatches(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] = RESUME_KEYS
) -> List[str]:
    """The config keys (dotted, e.g. ``model.lora_rank``) among ``keys`` whose values differ
    between the saved run's config and this run's, as ``"key=<this run> in the config but
    <saved> in the saved run"`` lines. A key missing on one side counts as ``<unset>``.
    Interpolations are resolved on both sides; ``1`` and ``1.0`` are equal.

    Args:
        saved, current: configs (DictConfig or plain mappings).
        keys: top-level keys to compare (default :data:`RESUME_KEYS`).
    """
    unset = "<unset>"
    problems = []
    for key in keys:
        a = _flat(saved[key], key) if key in saved else {key: unset}
        b = _flat(current[key], key) if key in current else {key: unset}
        for k in sorted(set(a) | set(b), key=lambda s: (s not in b, s)):
            va, vb = a.get(k, unset), b.get(k, unset)
            if va != vb:
                problems.append(f"{k}={vb!r} in the config but {va!r} in the saved run")
    return problems


def data_identity(dataset: Any) -> Any:
    """What a resume compares of a data set, as plain values (saved in a recipe's state, read
    back with weights_only): a :class:`prefopt.data.PreferenceDataset`'s ``identity`` (its
    source, the cache key of data + tokenizer + settings, the source's row count), a list of
    those for torchtune's ConcatDataset, and for any other data set its class and length."""
    parts = getattr(dataset, "_datasets", None)  # torchtune's ConcatDataset
    if type(dataset).__name__ == "ConcatDataset" and isinstance(parts, list):
        return [data_identity(d) for d in parts]
    identity = getattr(dataset, "identity", None)
    if isinstance(identity, dict):
        return dict(identity)
    return {"source": type(dataset).__qualname__, "key": None, "rows": len(dataset)}


def _data_line(name: str, now: Mapping[str, Any], was: Mapping[str, Any]) -> Optional[str]:
    if now.get("source") != was.get("source"):
        return f"{name} reads {now.get('source')} but the saved run read {was.get('source')}"
    if now.get("rows") != was.get("rows"):
        return f"{name}: {now['source']} has {now.get('rows')} rows but had {was.get('rows')} when the run was saved"
    if now.get("key") and was.get("key") and now["key"] != was["key"]:  # None: not cached, no key to compare
        return (
            f"{name}: {now['source']} has the same {now.get('rows')} rows but was changed or replaced since the run "
            f"was saved (tokenized data {now['key']}, the saved run's {was['key']})"
        )
    return None


def data_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """One line per data set (``dataset``, ``eval_dataset``: their :func:`data_identity`) that is
    not the data the saved run read: another source, another row count (rows appended), or the
    same count but another cache key (the file edited or replaced). A data set that one side
    does not have (an eval set added on resume) is not compared."""
    lines: List[str] = []
    for name, now in current.items():
        was = saved.get(name)
        if now is None or was is None:
            continue
        nows, wass = (now, was) if isinstance(now, list) and isinstance(was, list) else ([now], [was])
        if len(nows) != len(wass):
            lines.append(f"{name}: {len(nows)} data sets but {len(wass)} in the saved run")
            continue
        lines += [line for a, b in zip(nows, wass) if (line := _data_line(name, a, b))]
    return lines


def check_resume(
    state: Path,
    saved_cfg: Optional[Mapping[str, Any]],
    cfg: Mapping[str, Any],
    keys: Iterable[str] = RESUME_KEYS,
    values: Optional[Mapping[str, Any]] = None,
    saved_values: Optional[Mapping[str, Any]] = None,
    data: Optional[Mapping[str, Any]] = None,
    saved_data: Optional[Mapping[str, Any]] = None,
) -> None:
    """Raise if this run may not continue the resume state in folder ``state``: the ``keys`` of
    ``cfg`` against the state's saved config ``saved_cfg`` (:func:`resume_mismatches`; skipped
    if None), each of ``values`` (this run's values that the config alone does not fix, e.g.
    a seed drawn at random) against the same key of ``saved_values`` (a key that the config
    comparison named already is not named twice), and this run's ``data`` identities against
    ``saved_data`` (:func:`data_mismatches`; skipped if None) for each data set whose config
    block is the same as the saved run's (a changed block is the config's business). A key of
    :data:`SAVED_IF_NULL` that ``cfg`` leaves null is not compared: the saved run's is used.

    Raises:
        ResumeMismatchError: a ValueError naming the saved config (or the state) and every
            differing key with both values, and every data set that is not the saved run's:
            the one text of every recipe.
    """
    from_saved = {k for k in SAVED_IF_NULL if k in cfg and cfg[k] is None}
    keys = [k for k in keys if k not in from_saved]
    wrong = resume_mismatches(saved_cfg, cfg, keys) if saved_cfg is not None else []
    named = {w.split("=")[0] for w in wrong}
    saved_values = saved_values or {}
    wrong += [
        f"{k}={mine!r} in the config but {saved_values[k]!r} in the saved run"
        for k, mine in (values or {}).items()
        if k not in named and k not in from_saved and saved_values[k] != mine
    ]
    other_data: List[str] = []
    if data is not None and saved_data is not None:
        same_block = [k for k in data if saved_cfg is None or not resume_mismatches(saved_cfg, cfg, [k])]
        other_data = data_mismatches(saved_data, {k: data[k] for k in same_block})
    if wrong or other_data:
        what = " and ".join(w for w, on in (("the config", wrong), ("the data", other_data)) if on)
        use = " and ".join(u for u, on in (("the saved values", wrong), ("the data the saved run trained on", other_data)) if on)
        source = state / CONFIG_FILE if saved_cfg is not None and wrong else state
        raise ResumeMismatchError(
            f"resume: {what} {'differ' if wrong and other_data else 'differs'} from the saved run's ({source}) in what "
            f"a resume must keep: " + "; ".join(wrong + other_data) + f". Use {use}, or start a fresh run in another "
            "output_dir."
        )


# ------------------------------------------------------------------------------------------------
# inputs the config names but does not fix: a checkpoint re-trained into the same folder, a
# scoring function whose code changed


def checkpoint_files_state(block: Mapping[str, Any]) -> Dict[str, Optional[List[int]]]:
    """``{file: [size, mtime_ns]}`` (None: missing) of each file a torchtune checkpointer block
    reads (``checkpoint_dir`` + ``checkpoint_files``, a list or torchtune's ``{filename_format,
    max_filename}``): tells a checkpoint written again into the same folder (a policy re-trained
    between on-policy rounds) from the one earlier progress was made with, without reading GBs.
    Empty for a block without those keys."""
    folder, files = block.get("checkpoint_dir"), block.get("checkpoint_files")
    if folder is None or files is None:
        return {}
    if isinstance(files, Mapping):  # {filename_format, max_filename}: torchtune's own expansion
        from torchtune.training import FormattedCheckpointFiles

        files = FormattedCheckpointFiles.from_dict(dict(files)).build_checkpoint_filenames()
    out: Dict[str, Optional[List[int]]] = {}
    for name in files:
        path = Path(str(folder)) / str(name)
        try:
            st = path.stat()
            out[str(path)] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[str(path)] = None
    return out


def code_state(component: str) -> Optional[str]:
    """The sha256 of the source file of the module that defines ``component`` (a dotted path such
    as ``my_rewards.length_reward``): changes when that code is edited. None if it has no
    source file (a builtin) or cannot be imported (start-up reports that elsewhere)."""
    import hashlib
    import importlib
    import inspect

    module = str(component).rpartition(".")[0]
    try:
        path = inspect.getsourcefile(importlib.import_module(module))
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except (ImportError, TypeError, OSError):
        return None


def input_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """One line per input that differs between two records of ``{name: state}`` (what
    :func:`checkpoint_files_state` or :func:`code_state` gave when progress was written, and now),
    naming the input and what changed. An input missing from ``saved`` is not compared (progress
    written before it was recorded)."""
    lines = []
    for name, was in saved.items():
        if name not in now or now[name] == was:
            continue
        cur = now[name]
        if isinstance(was, Mapping) and isinstance(cur, Mapping):
            changed = sorted(f for f in set(was) | set(cur) if was.get(f) != cur.get(f))
            lines.append(f"{name}: {', '.join(changed)} changed (size or modification time) since the progress was written")
        else:
            lines.append(f"{name}: its code changed since the progress was written")
    return lines
