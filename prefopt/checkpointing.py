"""Room for checkpoints: how many bytes a recipe's first checkpoint needs, and a check of the free
space in ``output_dir`` that fails before training instead of at the first save, hours in.

Both recipes call :func:`check_checkpoint_space` at start-up with sizes counted on a meta-device
copy of the model (no memory, no weights read). The estimate is a lower bound on what the run
writes: ONE resume state (trainable weights + optimizer state) and the epoch-end export (the full
model in the compute dtype); a run that keeps several resume states needs a multiple of the
resume state (see ``keep_last_n_checkpoints`` in the full recipe). Pure functions, no torch
distributed: the recipes decide which rank checks. How a resume state is written and read is
:mod:`prefopt.resume`'s.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch

__all__ = [
    "check_output_dir",
    "NotEnoughSpaceError",
    "optimizer_states_per_param",
    "checkpoint_bytes",
    "check_checkpoint_space",
]

# .metadata of torch.distributed.checkpoint, recipe_state.pt, RNG states, config and logs.
OVERHEAD_BYTES = 1 << 20


def check_output_dir(path: Path) -> None:
    """Create ``path`` and write a 4 KiB probe file into it; fail before any model is built if
    checkpoints could not be written.

    The probe gets a new random name, created exclusively (``tempfile.mkstemp``: ``O_CREAT |
    O_EXCL``): a fixed name would follow a symbolic link planted in a shared ``output_dir`` and
    overwrite (then delete the name of) whatever file it points to.

    Raises:
        OSError: naming ``output_dir`` and the underlying error.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe-", dir=path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"0" * 4096)
        finally:
            os.unlink(probe)
    except OSError as e:
        raise OSError(f"output_dir={str(path)!r} is not writable: {e}") from e


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

