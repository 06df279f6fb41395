"""Room for checkpoints: how many bytes a recipe's first checkpoint needs, and a check of the free
space in ``output_dir`` that fails before training instead of at the first save, hours in.

Both recipes call :func:`check_checkpoint_space` at start-up with sizes counted on a meta-device
copy of the model (no memory, no weights read). The estimate is a lower bound on what the run
writes: ONE resume state (trainable weights + optimizer state) and the epoch-end export (the full
model in the compute dtype); a run that keeps several resume states needs a multiple of the
resume state (see ``keep_last_n_checkpoints`` in the full recipe). Pure functions, no torch
distributed: the recipes decide which rank checks.

Resume states live in ``<output_dir>/checkpoints/step_<N>/``; a recipe writes one into
``step_<N>.tmp``, writes a ``COMPLETE`` marker last and renames the folder, so a kill during a save
leaves no complete-looking state. :func:`complete_states` / :func:`latest_complete` read that layout.
"""

import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch

__all__ = [
    "STATE_DIR",
    "COMPLETE",
    "state_root",
    "state_dirs",
    "begin_state",
    "mark_complete",
    "publish_state",
    "check_output_dir",
    "complete_states",
    "latest_complete",
    "NotEnoughSpaceError",
    "optimizer_states_per_param",
    "checkpoint_bytes",
    "check_checkpoint_space",
    "describe_write_error",
    "checkpoint_write_error",
]

# .metadata of torch.distributed.checkpoint, recipe_state.pt, RNG states, config and logs.
OVERHEAD_BYTES = 1 << 20

STATE_DIR = "checkpoints"  # <output_dir>/checkpoints/step_<N>/
COMPLETE = "COMPLETE"  # the marker written last into a resume state


def state_root(output_dir: Union[str, Path]) -> Path:
    """``<output_dir>/checkpoints``: where the resume states live."""
    return Path(output_dir) / STATE_DIR


def state_dirs(output_dir: Union[str, Path], step: int) -> Tuple[Path, Path]:
    """(final ``step_<N>``, temporary ``step_<N>.tmp``) folders of the resume state of ``step``.
    The writer calls :func:`begin_state` on the temporary one, fills it, then
    :func:`mark_complete` and :func:`publish_state`."""
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


def check_output_dir(path: Path) -> None:
    """Create ``path`` and write a 4 KiB probe file into it; fail before any model is built if
    checkpoints could not be written.

    Raises:
        OSError: naming ``output_dir`` and the underlying error.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise OSError(f"output_dir={str(path)!r} is not writable: {e}") from e


def complete_states(root: Path) -> List[Path]:
    """``step_<N>`` folders under ``root`` that have their ``COMPLETE`` marker, oldest first
    (numeric order): not a ``step_<N>.tmp`` (killed before the rename), nor a folder without one."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / COMPLETE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_complete(root: Path) -> Optional[Path]:
    """The newest of :func:`complete_states`, or None."""
    done = complete_states(root)
    return done[-1] if done else None


class NotEnoughSpaceError(OSError):
    """``output_dir`` has less free space than the first checkpoint needs."""


def optimizer_states_per_param(make_optimizer: Callable[[list], torch.optim.Optimizer], default: int = 2) -> int:
    """How many parameter-sized tensors an optimizer keeps per parameter (SGD 0, SGD with
    momentum 1, Adam/AdamW 2, AdamW with amsgrad 3, Adagrad 1, RMSprop 1-3), read from a
    throwaway instance's class and ``defaults``; ``default`` (AdamW's 2) for any other optimizer
    or if building it fails.

    The instance is built but never stepped: a step would run every global optimizer hook of the
    process (profilers, step counters) for an optimizer that does not train anything.

    Args:
        make_optimizer: builds the optimizer from a list of parameters, e.g.
            ``lambda params: config.instantiate(cfg.optimizer, params)``.
        default (int): the answer for optimizers not listed above.
    """
    try:
        opt = make_optimizer([torch.nn.Parameter(torch.ones(7))])
    except Exception:  # noqa: BLE001 - an estimate: any failure falls back to the default
        return default
    d = opt.defaults
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return 3 if d.get("amsgrad") else 2
    if isinstance(opt, torch.optim.SGD):
        return 1 if d.get("momentum", 0) else 0
    if isinstance(opt, torch.optim.Adagrad):
        return 1
    if isinstance(opt, torch.optim.RMSprop):
        return 1 + bool(d.get("momentum", 0)) + bool(d.get("centered"))
    return default


def checkpoint_bytes(
    *,
    trainable_numel: int,
    trainable_dtype: torch.dtype,
    optimizer_states: int,
    export_numel: int,
    export_dtype: torch.dtype,
) -> dict:
    """Bytes of one resume state and of the epoch-end export.

    Args:
        trainable_numel (int): elements of the trainable parameters (all of them for full
            fine-tuning, the adapter for LoRA), over all ranks.
        trainable_dtype (torch.dtype): their dtype (and their optimizer state's).
        optimizer_states (int): parameter-sized optimizer tensors per parameter
            (:func:`optimizer_states_per_param`).
        export_numel (int): elements written at an epoch end (the full model, plus the adapter
            for LoRA).
        export_dtype (torch.dtype): the dtype they are written in.

    Returns:
        dict: ``resume_state``, ``export``, ``overhead`` and ``total`` in bytes.
    """
    state = trainable_numel * trainable_dtype.itemsize * (1 + optimizer_states)
    export = export_numel * export_dtype.itemsize
    return {"resume_state": state, "export": export, "overhead": OVERHEAD_BYTES, "total": state + export + OVERHEAD_BYTES}


def _h(n: int) -> str:
    """``12,345,678 bytes (11.8 MiB)``."""
    x, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            break
        x /= 1024
    return f"{n:,} bytes" if unit == "bytes" else f"{n:,} bytes ({x:.1f} {unit})"


def check_checkpoint_space(output_dir: Union[str, Path], sizes: dict, *, what: Optional[str] = None) -> int:
    """Raise :class:`NotEnoughSpaceError` if the file system of ``output_dir`` has less free
    space than ``sizes["total"]`` (from :func:`checkpoint_bytes`); return the free bytes.

    The message names ``output_dir``, the bytes needed (and what they are made of) and the
    bytes free. ``output_dir`` must exist (the recipes create it first).
    """
    free = shutil.disk_usage(output_dir).free
    if free < sizes["total"]:
        raise NotEnoughSpaceError(
            f"output_dir={str(output_dir)!r} has {_h(free)} free, but the first checkpoint"
            f"{' (' + what + ')' if what else ''} needs about {_h(sizes['total'])}: a resume state of "
            f"{_h(sizes['resume_state'])} and an epoch-end export of {_h(sizes['export'])}. "
            "Free some space or choose another output_dir."
        )
    return free



def describe_write_error(e: BaseException) -> str:
    """One line for an exception raised while writing a checkpoint. torch.save reports a full
    disk as ``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos``, and
    torch.distributed.checkpoint wraps each rank's error in a multi-line CheckpointException;
    both are reduced to what happened."""
    failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
    if isinstance(failures, dict) and failures:
        return "; ".join(
            f"rank {r}: {describe_write_error(f[0] if isinstance(f, tuple) else f)}" for r, f in sorted(failures.items())
        )
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, RuntimeError) and "inline_container" in text:
        text += " (torch.save could not write the file: is the disk full?)"
    return f"{type(e).__name__}: {text}"


def checkpoint_write_error(path: Union[str, Path], last_complete: Optional[Path], causes: List[str]) -> OSError:
    """The error a recipe raises when a resume state could not be written to ``path`` (its
    temporary folder): names the path, the causes, the free space left and the last complete
    resume state, which the atomic save left untouched."""
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
