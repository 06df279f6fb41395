"""conftest.spawn_gloo, the in-process 2-rank tests' launcher: a collective that times out is run
once more, and only once; the worker's own errors are never retried."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import init_gloo, spawn_gloo


def _stalling_worker(rank, init, marker, stall_every_time):
    init_gloo(rank, 2, init)
    # the stalled collective runs in a group of its own with a short timeout; joining the default
    # group keeps the usual one, so a slow process start is not taken for a stall
    group = dist.new_group(timeout=timedelta(seconds=8))
    with open(marker, "a") as f:
        f.write(f"{rank}\n")
    first = open(marker).read().count("1\n") == 1
    if rank == 1 and (first or stall_every_time):
        time.sleep(20)  # rank 1 does not join the all-reduce in time: rank 0's times out
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    assert t.item() == 2.0
    dist.destroy_process_group()


def _failing_worker(rank, init, marker):
    with open(marker, "a") as f:
        f.write(f"{rank} {os.path.basename(init)}\n")  # the attempt's store: gloo_store_<attempt>
    raise ValueError(f"rank {rank} failed")


def test_a_timed_out_collective_is_run_once_more(tmp_path):
    marker = tmp_path / "attempts"
    with pytest.warns(UserWarning, match="timed out; running the 2 processes once more"):
        spawn_gloo(_stalling_worker, tmp_path, str(marker), False)
    assert sorted(marker.read_text().split()) == ["0", "0", "1", "1"]  # two attempts, both ranks


def test_a_second_timeout_fails(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(mp.ProcessRaisedException, match="Timed out"):
        spawn_gloo(_stalling_worker, tmp_path, str(tmp_path / "attempts"), True)


def test_other_errors_are_not_retried(tmp_path):
    marker = tmp_path / "attempts"
    with pytest.raises(mp.ProcessRaisedException, match="failed"):
        spawn_gloo(_failing_worker, tmp_path, str(marker))
    # one attempt: every line written came from the first (the other rank may have been stopped
    # before writing its own)
    stores = [line.split()[1] for line in marker.read_text().splitlines()]
    assert stores and set(stores) == {"gloo_store_0"}, stores
