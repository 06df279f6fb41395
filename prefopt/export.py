"""Epoch-end exports: ``<output_dir>/epoch_<N>/``, the model in the checkpointer's format, whole or
not at all.

An epoch end writes its resume state first (which says that the epoch is done), then the export.
Written in place, an export that a full disk or a kill stops halfway leaves ``epoch_<N>/`` empty
or partial beside a state that says all is done: a resume would train nothing, write nothing and
exit 0. So, as resume states are (:mod:`prefopt.resume`):

- :func:`write_export`: the checkpointer writes into ``epoch_<N>.tmp/epoch_<N>/`` (torchtune's
  checkpointers write ``<their output_dir>/epoch_<N>/``: :func:`checkpointer_writing_to`), then
  a rename to ``epoch_<N>/``: the folder exists only complete. A write error removes the
  temporary folder and raises one ``OSError`` naming the folder, the cause, the space it needs
  and the free space, and the resume state that will finish it.
- :func:`missing_export`: a resume from an epoch-end state whose export is not there finds the
  epoch, and the recipe writes the export from the restored weights before training on.

``distributed=True``: only rank 0 writes; its outcome reaches every rank, which raise the same error.
"""

import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from prefopt.checkpointing import _h

__all__ = ["export_dirs", "checkpointer_writing_to", "state_bytes", "write_export", "missing_export"]

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


def export_dirs(output_dir: PathLike, epoch: int) -> Tuple[Path, Path]:
    """(final ``epoch_<N>``, temporary ``epoch_<N>.tmp``) folders of the export of ``epoch``."""
    final = Path(output_dir) / f"epoch_{epoch}"
    return final, final.with_name(final.name + ".tmp")


@contextmanager
def checkpointer_writing_to(checkpointer: Any, root: Path) -> Iterator[None]:
    """torchtune's checkpointers (HF, Meta, torchtune) write an epoch to
    ``<their _output_dir>/epoch_<N>/``, a fixed name: this points them at ``root`` meanwhile."""
    before = checkpointer._output_dir
    checkpointer._output_dir = Path(root)
    try:
        yield
    finally:
        checkpointer._output_dir = before


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what an export of it writes, about."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, SafetensorError):  # 'Error while serializing: IoError(Os { code: 28, ..., message: "No space ..." })'
        m = re.search(r'message: "([^"]*)"', text)
        return f"safetensors could not write a file: {m.group(1) if m else text}"
    if isinstance(e, RuntimeError) and "inline_container" in text:
        return f"torch.save could not write a file (is the disk full?): {text}"
    return f"{type(e).__name__}: {text}"


def write_export(
    output_dir: PathLike,
    epoch: int,
    write: Callable[[Path], None],
    *,
    nbytes: int,
    state: Optional[Path] = None,
    distributed: bool = False,
) -> Path:
    """Write the export of ``epoch`` atomically; return its folder ``<output_dir>/epoch_<epoch>``.

    Args:
        output_dir: the run's output_dir.
        epoch (int): the finished epoch.
        write: (rank 0) writes the export into ``<root>/epoch_<epoch>/`` for the ``root`` it is
            given (e.g. a checkpointer's save under :func:`checkpointer_writing_to`). A write
            error is an ``OSError``, a ``RuntimeError`` (torch.save) or a ``SafetensorError``.
        nbytes (int): about what the export writes (:func:`state_bytes`), for the error.
        state: the resume state of this epoch end, named in the error (it finishes the export).
        distributed (bool): every rank of the default process group calls this; rank 0 writes.

    Raises:
        OSError: on every rank, if the export could not be written, naming its folder, the
            cause, the bytes it needs and the bytes free; the temporary folder is removed.
    """
    lead = not distributed or dist.get_rank() == 0
    final, tmp = export_dirs(output_dir, epoch)
    error, cause = None, None
    if lead:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # what a killed export left
            tmp.mkdir(parents=True)
            write(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp / final.name, final)
            shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, RuntimeError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            try:
                free = f"{_h(shutil.disk_usage(output_dir).free)} free"
            except OSError:
                free = "free space unknown"
            then = (
                f"The resume state {state} is intact: make room and rerun with resume_from_checkpoint=True, "
                "which writes the export before going on."
                if state is not None else "Make room and rerun."
            )
            error = (
                f"could not write the export of epoch {epoch} to {final}: {_describe(e)}. It needs about {_h(nbytes)} "
                f"({free} in {output_dir}). {then}"
            )
            cause = e
    if distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise OSError(error) from cause
    return final


def missing_export(output_dir: PathLike, epochs_run: int, step_in_epoch: int, *, distributed: bool = False) -> Optional[int]:
    """The epoch whose export a resume must write before training on: the one a state saved at
    its end (``step_in_epoch == 0``) says is done, if ``epoch_<N>/`` is not there (the run
    stopped while writing it); None otherwise. With ``distributed``, rank 0 looks (collective)."""
    epoch: Optional[int] = None
    if not distributed or dist.get_rank() == 0:
        if epochs_run > 0 and step_in_epoch == 0 and not export_dirs(output_dir, epochs_run - 1)[0].is_dir():
            epoch = epochs_run - 1
    if distributed:
        box = [epoch]
        dist.broadcast_object_list(box, src=0)
        epoch = box[0]
    return epoch
