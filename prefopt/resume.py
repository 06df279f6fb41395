"""Resume states: the one place that knows how a run's state is written, found and checked.

Layout of an ``output_dir``::

    config.yaml                  the run's config (a fresh run writes it; a resumed run never does)
    checkpoints/step_<N>/        a resume state: the recipe's files, config.yaml, COMPLETE
    checkpoints/step_<N>.tmp/    a state being written (or what a killed save left)

A recipe says WHAT a state holds and restores; this module does HOW:

- :func:`start_fresh_run`: a fresh run refuses an ``output_dir`` that holds another run's states
  (their ``step_<N>`` would mix with the new run's on a later resume), unless told to delete
  them, and saves the run config.
- :func:`write_state`: ``step_<N>.tmp``, the recipe's files (its ``write`` callable), the run
  config, a ``COMPLETE`` marker last, then a rename, so that a kill at any moment leaves either no
  ``step_<N>`` or a whole one. A write error (a full disk) removes the temporary folder and raises
  one ``OSError`` naming it, the cause and the last complete state, which stays intact.
- :func:`read_newest_state`: the newest complete state whose files can be read (its ``read``
  callable, with :func:`load_checkpoint_file`: nothing a file holds can run code), falling back
  past corrupt or refused ones with a warning each; the config and the data compared with the
  saved run's in what a resume must keep (:data:`RESUME_KEYS` plus the recipe's own values,
  :func:`data_identity`), with one error text for every recipe (:func:`check_resume`; both in
  :mod:`prefopt.resume_check`). The epoch-end exports beside the states: :mod:`prefopt.export`.

``distributed=True`` (the FSDP recipe, on the default process group): rank 0 makes, completes,
renames and prunes the folder and writes the config; every rank runs ``write``, ``read`` and
``restore`` for its own files; a failure on any rank is gathered so that every rank raises the
same error, and every rank tries the states that rank 0 listed, in the same order.
"""

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

# what a resume must keep and the one mismatch text: prefopt.resume_check; how the files of a
# state are read without running code: prefopt.safe_load (both re-exported here)
from prefopt.resume_check import (
    CONFIG_FILE,
    RESUME_KEYS,
    SAVED_IF_NULL,
    ResumeMismatchError,
    check_resume,
    data_identity,
    data_mismatches,
    resume_mismatches,
)
from prefopt.safe_load import CorruptCheckpointError, load_checkpoint_file

__all__ = [
    # what the recipes call
    "RESUME_KEYS",
    "SAVED_IF_NULL",
    "data_identity",
    "start_fresh_run",
    "write_state",
    "read_newest_state",
    "load_checkpoint_file",
    "describe_write_error",
    "CorruptCheckpointError",
    "ResumeMismatchError",
    "ExistingRunError",
    # the layout and the steps those are made of (tests, tools)
    "STATE_DIR",
    "COMPLETE",
    "CONFIG_FILE",
    "state_root",
    "state_dirs",
    "begin_state",
    "mark_complete",
    "publish_state",
    "complete_states",
    "latest_complete",
    "checkpoint_write_error",
    "check_fresh_output_dir",
    "save_run_config",
    "load_run_config",
    "resume_mismatches",
    "data_mismatches",
    "check_resume",
    "load_newest_intact",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
PathLike = Union[str, Path]

STATE_DIR = "checkpoints"  # <output_dir>/checkpoints/step_<N>/
COMPLETE = "COMPLETE"  # the marker written last into a resume state
# CONFIG_FILE (prefopt.resume_check, which names it in the mismatch text): the run config, in
# output_dir and in every resume state

# ------------------------------------------------------------------------------------------------
# the layout


def state_root(output_dir: PathLike) -> Path:
    """``<output_dir>/checkpoints``: where the resume states live."""
    return Path(output_dir) / STATE_DIR


def state_dirs(output_dir: PathLike, step: int) -> Tuple[Path, Path]:
    """(final ``step_<N>``, temporary ``step_<N>.tmp``) folders of the resume state of ``step``;
    names only, nothing is created."""
    final = state_root(output_dir) / f"step_{step}"
    return final, final.with_name(final.name + ".tmp")


def begin_state(tmp: Path) -> None:
    """Make ``tmp`` an empty folder (what a previous, killed save left there is removed).

    Raises:
        OSError: if the folder cannot be made.
    """
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def mark_complete(tmp: Path, note: str) -> None:
    """Write the ``COMPLETE`` marker, last, once every file of the state is on disk."""
    (tmp / COMPLETE).write_text(note + "\n")


def publish_state(tmp: Path, final: Path) -> None:
    """Rename the finished ``step_<N>.tmp`` to ``step_<N>`` (atomic on POSIX: a kill leaves either
    the old folder or the whole new one)."""
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def complete_states(root: Path) -> List[Path]:
    """``step_<N>`` folders under ``root`` (:func:`state_root`) that have their ``COMPLETE``
    marker, oldest first (numeric order): not a ``step_<N>.tmp`` (killed before the rename), nor
    a folder without one."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_complete(root: Path) -> Optional[Path]:
    """The newest of :func:`complete_states`, or None."""
    done = complete_states(root)
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------------
# the run config


def save_run_config(cfg: DictConfig, path: PathLike) -> None:
    """Write ``cfg`` (interpolations resolved) to ``path`` as YAML, atomically (a temporary
    name, then a rename), so that a kill never leaves half a config beside a resume state."""
    path = Path(path)
    # a new, exclusively created name (not a fixed "config.yaml.tmp", which a link planted in a
    # shared output_dir could point elsewhere); the rename replaces a link at `path`, never its target
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_run_config(path: PathLike) -> Optional[DictConfig]:
    """The config saved by :func:`save_run_config`, or None if there is none (a resume state
    written before configs were saved)."""
    path = Path(path)
    return OmegaConf.load(path) if path.is_file() else None


class ExistingRunError(FileExistsError):
    """A fresh run was pointed at an output_dir that holds another run's resume states."""


def check_fresh_output_dir(output_dir: PathLike, *, overwrite: bool) -> List[Path]:
    """For a fresh run (``resume_from_checkpoint=False``): refuse an ``output_dir`` whose
    ``checkpoints/`` holds resume states (``step_<N>``, complete or not), unless ``overwrite``, in
    which case they, the saved ``config.yaml`` and the epoch exports (``epoch_<N>/``) are
    removed so that the new run starts clean. Returns what was removed.

    Why: the new run's ``step_<N>`` would sit beside (or replace) the old run's, and a later
    ``resume_from_checkpoint=True`` would continue whichever is newest: a mix of two runs.

    Raises:
        ExistingRunError: naming the folder, what it holds and the two switches.
    """
    out = Path(output_dir)
    root = state_root(out)
    states = sorted(p for p in root.glob("step_*")) if root.is_dir() else []
    if not states:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in states[:5]) + (f", ... ({len(states)} in all)" if len(states) > 5 else "")
        raise ExistingRunError(
            f"output_dir={str(out)!r} holds resume states of an earlier run ({root}: {names}), and this is a fresh run "
            "(resume_from_checkpoint=False). Set resume_from_checkpoint=True to continue that run, "
            "overwrite_output_dir=True to delete its states and start clean, or choose another output_dir."
        )
    removed = [root] + [p for p in [out / CONFIG_FILE, *sorted(out.glob("epoch_*"))] if p.exists()]
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.warning("overwrite_output_dir=True: removed %s", ", ".join(str(p) for p in removed))
    return removed


def start_fresh_run(output_dir: PathLike, cfg: DictConfig, *, overwrite: bool) -> List[Path]:
    """A fresh run's start (one process: rank 0): :func:`check_fresh_output_dir`, then ``cfg``
    saved as ``<output_dir>/config.yaml`` (a resumed run keeps the first run's). Returns what
    ``overwrite`` removed.

    Raises:
        ExistingRunError: ``output_dir`` holds resume states and ``overwrite`` is False.
    """
    removed = check_fresh_output_dir(output_dir, overwrite=overwrite)
    save_run_config(cfg, Path(output_dir) / CONFIG_FILE)
    return removed


# ------------------------------------------------------------------------------------------------
# writing


def describe_write_error(e: BaseException) -> str:
    """One line for an exception raised while writing (or reading) a checkpoint. torch.save
    reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected
    pos``, and torch.distributed.checkpoint wraps each rank's error in a multi-line
    CheckpointException; both are reduced to what happened."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
    if isinstance(failures, dict) and failures:
        return "; ".join(
            f"rank {r}: {describe_write_error(f[0] if isinstance(f, tuple) else f)}" for r, f in sorted(failures.items())
        )
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, RuntimeError) and "inline_container" in text:
        text += " (torch.save could not write the file: is the disk full?)"
    return f"{type(e).__name__}: {text}"


def checkpoint_write_error(path: PathLike, last_complete: Optional[Path], causes: List[str]) -> OSError:
    """The error raised when a resume state could not be written to ``path`` (its temporary
    folder): names the path, the causes, the free space left and the last complete resume state,
    which the atomic save left untouched."""
    path = Path(path)
    try:
        free = f" ({shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free:,} bytes free)"
    except OSError:
        free = ""
    if last_complete is not None:
        keep = (
            f"The last complete resume state, {last_complete}, is intact: make room{free} and rerun with "
            "resume_from_checkpoint=True."
        )
    else:
        keep = f"No complete resume state exists yet{free}."
    return OSError(f"could not write the resume state {path}: {'; '.join(causes)}. {keep}")


def _names_ranks(e: BaseException) -> bool:
    """DCP's CheckpointException: raised alike on every rank, it names the ranks that failed."""
    return isinstance(getattr(e, "failures", None), dict)


def _is_write_error(e: BaseException) -> bool:
    # torch.save on a full disk raises RuntimeError; DCP's CheckpointException is a BaseException
    return isinstance(e, (OSError, RuntimeError)) or _names_ranks(e)


def _all_errors(local: Optional[str], distributed: bool) -> List[str]:
    """Every rank's error line (``local``: this rank's, None if it had none), in rank order
    without repeats: the same list on every rank (collective with ``distributed``)."""
    if not distributed:
        return [local] if local else []
    errors: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local)
    return list(dict.fromkeys(e for e in errors if e))


def write_state(
    output_dir: PathLike,
    step: int,
    cfg: DictConfig,
    write: Callable[[Path], None],
    *,
    note: Optional[str] = None,
    keep_last: Optional[int] = None,
    distributed: bool = False,
) -> Path:
    """Write the resume state of ``step`` atomically; return its folder ``<output_dir>/checkpoints/step_<step>``.

    In order: (rank 0) an empty ``step_<step>.tmp``; ``write(tmp)`` on every rank, then (rank 0)
    ``cfg`` as ``config.yaml``; (rank 0) the ``COMPLETE`` marker once every rank's files are on
    disk; (rank 0) the rename to ``step_<step>`` (replacing a state of the same step) and, with
    ``keep_last``, the removal of all but the newest ``keep_last`` complete states. With
    ``distributed``, every rank learns after each of the first three parts whether any rank
    failed, and the call ends with a barrier: no rank goes on before the state is published.

    Args:
        output_dir: the run's output_dir (it exists).
        step (int): the global step after which the state resumes.
        cfg (DictConfig): the run's config, saved beside the state: what a resume is compared with.
        write: writes this rank's files of the state into the folder it is given. A write error
            is an ``OSError``, a ``RuntimeError`` (torch.save on a full disk) or DCP's
            ``CheckpointException``; anything else propagates as it is.
        note (str): the text of the COMPLETE marker (default ``"step <step>"``).
        keep_last (int): keep only this many complete states (None: all).
        distributed (bool): the default process group's ranks write the state together.

    Raises:
        OSError: on every rank, if any part could not be written: names the temporary folder,
            each failed rank's cause, the free space and the last complete state. The temporary
            folder is removed; the earlier states are untouched.
    """
    rank = dist.get_rank() if distributed else None
    lead = not rank  # rank 0, or the only process: the folder, the config, COMPLETE, the rename
    final, tmp = state_dirs(output_dir, step)

    def part(here: bool, fn: Callable[[], None]) -> None:
        """``fn()`` where ``here``; then, on every rank, the same OSError if it failed anywhere."""
        local, exc = None, None
        if here:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - filtered: DCP's CheckpointException is a BaseException
                if not _is_write_error(e):
                    raise
                local, exc = describe_write_error(e), e
                if rank is not None and not _names_ranks(e):
                    local = f"rank {rank}: {local}"
        errors = _all_errors(local, distributed)
        if errors:
            if lead:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier states stay
            raise checkpoint_write_error(tmp, latest_complete(state_root(output_dir)), errors) from exc

    def files() -> None:
        write(tmp)
        if lead:
            save_run_config(cfg, tmp / CONFIG_FILE)  # what a resume of this state is compared with

    part(lead, lambda: begin_state(tmp))
    part(True, files)
    part(lead, lambda: mark_complete(tmp, note or f"step {step}"))
    if lead:
        publish_state(tmp, final)
        if keep_last is not None:
            for old in complete_states(state_root(output_dir))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


# ------------------------------------------------------------------------------------------------
# reading


def load_newest_intact(states: Sequence[Path], load: Callable[[Path], T]) -> Tuple[Path, T, List[str]]:
    """Try ``load(state)`` on ``states`` (complete resume states, oldest first) from the newest
    down; return the first that loads, its result, and one line per newer state that did not
    (``load`` raises :class:`CorruptCheckpointError` for those, logged as a warning; any other
    error, e.g. a config mismatch, propagates at once: an older state would not fix it).

    Raises:
        FileNotFoundError: ``states`` is empty.
        CorruptCheckpointError: every state is corrupt (one line per state).
    """
    if not states:
        raise FileNotFoundError("no complete resume state")
    skipped: List[str] = []
    for state in reversed(list(states)):
        try:
            return state, load(state), skipped
        except CorruptCheckpointError as e:
            skipped.append(str(e))
            if state is not states[0]:
                log.warning("resume state %s is corrupt (%s); trying the next older one", state, e)
    raise CorruptCheckpointError(
        "every complete resume state is corrupt, none can be resumed from:\n  - " + "\n  - ".join(skipped)
    )


def read_newest_state(
    output_dir: PathLike,
    cfg: Mapping[str, Any],
    read: Callable[[Path], T],
    *,
    keys: Iterable[str] = RESUME_KEYS,
    values: Optional[Mapping[str, Any]] = None,
    saved_values: Optional[Callable[[T], Mapping[str, Any]]] = None,
    data: Optional[Mapping[str, Any]] = None,
    saved_data: Optional[Callable[[T], Optional[Mapping[str, Any]]]] = None,
    restore: Optional[Callable[[Path, T], None]] = None,
    distributed: bool = False,
) -> Tuple[Path, T]:
    """The newest complete resume state under ``output_dir`` that can be read and that this run
    may continue: ``(its folder, read(folder))``.

    Each complete state, newest first: ``read(folder)`` (this rank's files; any exception counts
    as a damaged file) and the saved ``config.yaml``; then :func:`check_resume` (``keys`` of
    ``cfg`` against the saved config, ``values`` against ``saved_values(read's result)``, ``data``
    against ``saved_data(read's result)``); then
    ``restore(folder, result)`` for what may only be loaded once the config is known to match
    (e.g. sharded weights into the model: a mismatched shape would look like a damaged file). A
    state that cannot be read (or whose ``restore`` finds a damaged file) is skipped with a
    warning and the next older one tried.

    Args:
        output_dir: the run's output_dir.
        cfg: this run's config.
        read: loads a state's files (e.g. with :func:`load_checkpoint_file`); its result is returned.
        keys: top-level config keys a resume must keep (default :data:`RESUME_KEYS`).
        values: this run's values compared with the saved run's besides the config, by name.
        saved_values: the saved run's ``values`` (every key of them), from ``read``'s result;
            needed with ``values``.
        data: this run's data sets by config key (``dataset``, ``eval_dataset``: their
            :func:`data_identity`, None for none), compared with the saved run's.
        saved_data: the saved run's ``data``, from ``read``'s result (None: a state saved
            before data identities were kept, not compared, with a warning).
        restore: loads the rest, after the check. A damaged file: it raises CorruptCheckpointError,
            or torch.distributed.checkpoint raises its CheckpointException (on every rank).
        distributed (bool): every rank of the default process group calls this; rank 0 lists the
            states, a read error on any rank skips the state on every rank.

    Raises:
        FileNotFoundError: no complete resume state.
        ResumeMismatchError: the newest readable state's config or data differs (an older state
            would not fix it).
        CorruptCheckpointError: no complete state can be read (one line per state).
    """
    lead = not distributed or dist.get_rank() == 0
    box = [complete_states(state_root(output_dir)) if lead else None]
    if distributed:
        dist.broadcast_object_list(box, src=0)  # every rank tries the folders rank 0 listed, in order
    states = box[0]
    if not states:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {state_root(output_dir)} holds no complete checkpoint "
            "(a step_<N>/ folder with a COMPLETE marker)"
        )

    def attempt(d: Path) -> T:
        local, exc = None, None
        try:
            result = read(d)
            saved_cfg = load_run_config(d / CONFIG_FILE)
        except Exception as e:  # noqa: BLE001 - a YAML or key error is a damaged file as well
            local, exc = (str(e) if isinstance(e, CorruptCheckpointError) else f"{d}: {type(e).__name__}: {e}"), e
        errors = _all_errors(local, distributed)  # every rank skips the state if any rank cannot read it
        if errors:
            raise CorruptCheckpointError(errors[0]) from exc
        if saved_cfg is None and lead:
            only = f", only the saved {', '.join(values)}" if values else ""
            log.warning("%s has no %s (an older run): the config is not compared with it%s", d, CONFIG_FILE, only)
        old_data = saved_data(result) if saved_data is not None else None
        if data is not None and old_data is None and lead:
            log.warning("%s keeps no identity of its data (an older run): the data is not compared with it", d)
        # the same inputs on every rank: the same decision
        check_resume(d, saved_cfg, cfg, keys, values, saved_values(result) if saved_values else None, data, old_data)
        if restore is not None:
            try:
                restore(d, result)
            except BaseException as e:  # noqa: BLE001 - filtered: DCP's CheckpointException is a BaseException
                if not _names_ranks(e):
                    raise
                # DCP raises it alike on every rank, naming the ranks that failed: every rank skips the state
                raise CorruptCheckpointError(
                    f"{d}: the sharded state (*.distcp) cannot be read ({describe_write_error(e)})"
                ) from e
        return result

    chosen, result, skipped = load_newest_intact(states, attempt)
    if skipped and lead:
        log.warning("resuming from %s, the newest intact resume state; skipped: %s", chosen, "; ".join(skipped))
    return chosen, result
