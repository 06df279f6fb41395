"""Tier 1: prefopt.checkpointing: checkpoint sizes, the free-space check, write-error messages."""

import shutil
from collections import namedtuple

import pytest
import torch

from prefopt.checkpointing import (
    OVERHEAD_BYTES,
    NotEnoughSpaceError,
    check_checkpoint_space,
    checkpoint_bytes,
    checkpoint_write_error,
    describe_write_error,
    optimizer_states_per_param,
)

Usage = namedtuple("Usage", "total used free")


def test_optimizer_states_per_param():
    assert optimizer_states_per_param(lambda p: torch.optim.AdamW(p, lr=1e-3)) == 2
    assert optimizer_states_per_param(lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True)) == 3
    assert optimizer_states_per_param(lambda p: torch.optim.SGD(p, lr=0.1)) == 0
    assert optimizer_states_per_param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) == 1

    def broken(params):
        raise RuntimeError("needs a GPU")

    assert optimizer_states_per_param(broken) == 2  # the AdamW default when the probe cannot run


def test_checkpoint_bytes():
    sizes = checkpoint_bytes(trainable_numel=1000, trainable_dtype=torch.float32, optimizer_states=2,
                             export_numel=5000, export_dtype=torch.bfloat16)
    assert sizes == {"resume_state": 12_000, "export": 10_000, "overhead": OVERHEAD_BYTES,
                     "total": 22_000 + OVERHEAD_BYTES}


def test_free_space_check_names_dir_needed_and_free(tmp_path, monkeypatch):
    sizes = checkpoint_bytes(trainable_numel=8 << 20, trainable_dtype=torch.float32, optimizer_states=2,
                             export_numel=8 << 20, export_dtype=torch.bfloat16)
    seen = []

    def usage(path):
        seen.append(path)
        return Usage(10 << 30, 0, 50 << 20)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(NotEnoughSpaceError) as e:
        check_checkpoint_space(tmp_path, sizes, what="8,388,608 parameters")
    assert seen == [tmp_path]
    msg = str(e.value)
    assert msg.startswith(f"output_dir='{tmp_path}' has 52,428,800 bytes (50.0 MiB) free, but the first checkpoint "
                          "(8,388,608 parameters) needs about 118,489,088 bytes (113.0 MiB)")
    assert "a resume state of 100,663,296 bytes (96.0 MiB) and an epoch-end export of 16,777,216 bytes (16.0 MiB)" in msg
    assert isinstance(e.value, OSError)
    # enough room: returns the free bytes
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 << 30, 0, sizes["total"]))
    assert check_checkpoint_space(tmp_path, sizes) == sizes["total"]


def test_write_error_messages(tmp_path):
    # what torch.save raises on a full disk, and what torch.distributed.checkpoint raises
    assert describe_write_error(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")) == (
        "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534 "
        "(torch.save could not write the file: is the disk full?)"
    )
    from torch.distributed.checkpoint.api import CheckpointException

    dcp_error = CheckpointException("failed", {1: (OSError(28, "No space left on device"), None)})
    assert describe_write_error(dcp_error) == "rank 1: OSError: [Errno 28] No space left on device"
    tmp = tmp_path / "checkpoints" / "step_4.tmp"
    tmp.parent.mkdir()
    err = checkpoint_write_error(tmp, tmp_path / "checkpoints" / "step_2", ["rank 1: OSError: disk full"])
    assert isinstance(err, OSError)
    assert str(err).startswith(f"could not write the resume state {tmp}: rank 1: OSError: disk full. "
                               f"The last complete resume state, {tmp_path}/checkpoints/step_2, is intact: make room (")
    assert "No complete resume state exists yet" in str(checkpoint_write_error(tmp, None, ["x"]))


def test_optimizer_probe_does_not_step_anything():
    # A step would run the process's global optimizer hooks (profilers, the benchmark's step clock).
    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(opt))
    try:
        assert optimizer_states_per_param(lambda p: torch.optim.AdamW(p, lr=1e-3)) == 2
    finally:
        handle.remove()
    assert calls == []


def test_resume_state_writer_and_reader_agree(tmp_path):
    """The writer (tmp folder, COMPLETE marker last, rename) and the reader share one layout."""
    from prefopt.checkpointing import (
        begin_state,
        complete_states,
        latest_complete,
        mark_complete,
        publish_state,
        state_dirs,
        state_root,
    )

    final, tmp = state_dirs(tmp_path, 7)
    assert not tmp.exists()  # naming the folders writes nothing
    begin_state(tmp)
    assert tmp.is_dir() and tmp.name == "step_7.tmp" and final == state_root(tmp_path) / "step_7"
    (tmp / "adapter.pt").write_bytes(b"x")
    assert complete_states(state_root(tmp_path)) == []  # not complete, not renamed
    mark_complete(tmp, "step 7")
    assert complete_states(state_root(tmp_path)) == []  # complete but still .tmp: a kill here loses it
    publish_state(tmp, final)
    assert latest_complete(state_root(tmp_path)) == final and (final / "adapter.pt").exists() and not tmp.exists()
    # a save that was killed after mkdir leaves a .tmp that the next save of that step replaces
    _, tmp2 = state_dirs(tmp_path, 9)
    begin_state(tmp2)
    (tmp2 / "junk").write_text("half")
    begin_state(tmp2)
    assert list(tmp2.iterdir()) == []
