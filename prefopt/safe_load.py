"""Reading back the files a run saved, without running code.

A resume state is a folder that anyone who can write to ``output_dir`` (a shared folder, a copied
run) could have replaced. ``torch.load(..., weights_only=False)`` and the ``pickle.load`` that
torch.distributed.checkpoint does on ``.metadata`` run whatever a crafted file names (e.g.
``os.system``) the moment it is read. Nothing a recipe saves needs that: its files hold tensors,
numbers, strings, lists and dicts only (the recipes convert anything else before saving), so:

- :func:`load_checkpoint_file`: ``torch.load`` with ``weights_only=True``, always;
- :func:`dcp_load`: ``torch.distributed.checkpoint.load`` whose ``.metadata`` is unpickled with
  an allow-list of DCP's own metadata classes, and whose non-tensor items (the optimizer's
  ``param_groups``) are read with ``weights_only=True``.

A file that holds anything else is refused as a damaged file (:class:`CorruptCheckpointError`,
naming it): :func:`prefopt.resume.read_newest_state` falls back to the next older state.
"""

import pickle
import re
import zipfile
from pathlib import Path, PosixPath, WindowsPath
from typing import Any, Dict, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import StorageMeta

__all__ = ["CorruptCheckpointError", "load_checkpoint_file", "dcp_load"]

PathLike = Union[str, Path]


class CorruptCheckpointError(RuntimeError):
    """A file of a resume state cannot be read (truncated, overwritten, bit rot), or holds objects
    that only code could rebuild (refused: see the module docstring)."""


# what torch.load / torch.distributed.checkpoint raise on a truncated or garbled file
_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _weights_only_reason(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what failed (the rest advises setting
    weights_only=False: exactly what must not be done with a file one did not write oneself)."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Please file an issue", "Check the documentation"))]
    return lines[0] if lines else _first_line(e)


def load_checkpoint_file(path: PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with any read error turned
    into a :class:`CorruptCheckpointError` naming the file; a file that holds more than tensors
    and plain values (a pickle that would call a function or build a class) is refused unread."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(e)
        named = re.search(r"GLOBAL (\S+)", reason)
        if named:  # a function or class: what a crafted file uses to run code
            raise CorruptCheckpointError(
                f"{path}: refused: it names {named.group(1)}, which loading would call; a resume state holds "
                "tensors and plain values only and is read with weights_only=True"
            ) from e
        raise CorruptCheckpointError(f"{path}: cannot be read (UnpicklingError: {reason})") from e
    except _READ_ERRORS as e:
        raise CorruptCheckpointError(f"{path}: cannot be read ({type(e).__name__}: {_first_line(e)})") from e


# ------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint

# What DCP pickles into .metadata (torch 2.6 - 2.13): its metadata dataclasses and enum, the
# storage info of each item, torch.Size, dtypes/layouts, and the path type of relative paths.
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a name -> a torch.layout
    ("pathlib", "PosixPath"): PosixPath,
    ("pathlib", "WindowsPath"): WindowsPath,
}
_DCP_METADATA_CLASSES = (
    "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata", "TensorStorageMetadata",
    "BytesStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: the classes above and torch's dtypes/layouts/memory formats,
    nothing else (no function a crafted file could name gets called)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__ and name in _DCP_METADATA_CLASSES:
            return getattr(dcp_metadata, name)
        if (module, name) in _DCP_CLASSES:
            return _DCP_CLASSES[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something torch.distributed.checkpoint saves")


class _WeightsOnlyReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        # FileSystemReader.read_metadata with the unpickler above instead of pickle.load
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise CorruptCheckpointError(f"{path}: refused: {e} (loading it could run code)") from e
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: Any) -> None:
        # DefaultLoadPlanner.load_bytes reads these (e.g. optimizer.param_groups.0.lr) with weights_only=False
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state_dict: Dict[str, Any], folder: PathLike) -> None:
    """``torch.distributed.checkpoint.load(state_dict, checkpoint_id=folder)`` (collective, in
    place, resharding as DCP does), reading nothing that could run code. A refused or damaged
    file raises DCP's CheckpointException on every rank, naming the ranks and the cause."""
    dcp.load(state_dict, checkpoint_id=folder, storage_reader=_WeightsOnlyReader(folder), planner=_WeightsOnlyPlanner())
