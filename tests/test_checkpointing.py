"""Tier 1: prefopt.checkpointing: checkpoint sizes, the free-space check."""

import shutil
from collections import namedtuple

import pytest
import torch

from prefopt.checkpointing import (
    OVERHEAD_BYTES,
    NotEnoughSpaceError,
    check_checkpoint_space,
    checkpoint_bytes,
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
