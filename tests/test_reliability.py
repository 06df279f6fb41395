"""Reliability of the LoRA recipe: real kills, non-finite steps, unwritable output, bad data."""

import json
import random
import signal
import subprocess
import time

import pytest
import torch
from torch.testing import assert_close

from conftest import REPO, read_log, tune_bin, tune_run

RECIPE = "recipes/simpo_lora_single_device.py"
CONFIG = "configs/tiny/simpo_lora.yaml"
pytestmark = pytest.mark.slow
FAST = ["eval_dataset=null", "eval_every_n_steps=null"]


def complete_steps(out):
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / "COMPLETE").exists())


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted(tmp_path):
    common = ["max_steps_per_epoch=16", "save_every_n_steps=2", "batch_size=32", *FAST]
    ref = tmp_path / "ref"
    tune_run(RECIPE, CONFIG, f"output_dir={ref}", *common)

    out = tmp_path / "killed"
    rng = random.Random()
    for attempt in range(3):  # the kill must land mid-run; retry with a shorter delay if the run won
        proc = subprocess.Popen([tune_bin(), "run", RECIPE, "--config", CONFIG, f"output_dir={out}", *common],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not complete_steps(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5) / (attempt + 1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and max(complete_steps(out), default=0) < 16:
            break
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.fail("could not kill the run before it finished")
    saved = complete_steps(out)
    assert saved, "no complete checkpoint before the kill"
    tune_run(RECIPE, CONFIG, f"output_dir={out}", *common, "resume_from_checkpoint=True")
    a = torch.load(ref / "checkpoints" / "step_16" / "adapter.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "step_16" / "adapter.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], atol=1e-6, rtol=1e-5)
    la, lb = read_log(ref), read_log(out)
    for s in range(max(saved) + 1, 17):
        assert abs(la[s]["loss"] - lb[s]["loss"]) <= 1e-5


def test_nonfinite_loss_stops_with_step_and_rows_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = tune_run(RECIPE, CONFIG, f"output_dir={out}", "optimizer.lr=1e30", "clip_grad_norm=null",
                    "lr_scheduler=null", "max_steps_per_epoch=6", "save_every_n_steps=1", *FAST, check=False)
    assert proc.returncode != 0
    assert "FloatingPointError: non-finite loss or gradient at step 2" in proc.stderr
    assert "example rows of this step: [" in proc.stderr
    assert complete_steps(out) == [1]  # the last good checkpoint is intact, nothing after it
    state = torch.load(out / "checkpoints" / "step_1" / "adapter.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nonfinite_skip_mode_skips_and_logs(tmp_path):
    out = tmp_path / "skip"
    proc = tune_run(RECIPE, CONFIG, f"output_dir={out}", "optimizer.lr=1e30", "clip_grad_norm=null",
                    "lr_scheduler=null", "max_steps_per_epoch=3", "save_every_n_steps=null", "on_nonfinite=skip",
                    "save_adapter_weights_only=True", *FAST)
    assert proc.stderr.count("step skipped (on_nonfinite=skip)") == 2


def test_unwritable_output_dir_reported_before_building(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = tune_run(RECIPE, CONFIG, f"output_dir={blocker}/run", check=False)
    assert proc.returncode != 0
    assert f"output_dir='{blocker}/run' is not writable" in proc.stderr
    assert "Model ready" not in proc.stdout + proc.stderr


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    proc = tune_run(RECIPE, CONFIG, f"output_dir={tmp_path}/none", "resume_from_checkpoint=True", *FAST, check=False)
    assert proc.returncode != 0
    assert "holds no complete checkpoint" in proc.stderr


def test_bad_rows_in_training_data_error_mode_names_file_row_field(tmp_path):
    rows = [json.loads(l) for l in (REPO / "prefopt/assets/tiny/train.jsonl").read_text().splitlines()[:40]]
    rows[17]["rejected"][1]["content"] = ""
    data = tmp_path / "broken.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = tune_run(RECIPE, CONFIG, f"output_dir={tmp_path}/o", f"dataset.data_files={data}",
                    "dataset.on_bad_example=error", *FAST, check=False)
    assert proc.returncode != 0
    assert f"{data}: row 17, field 'rejected': has no non-empty assistant message" in proc.stderr
    # default: the row is dropped, counted, and training goes on
    proc = tune_run(RECIPE, CONFIG, f"output_dir={tmp_path}/d", f"dataset.data_files={data}", "batch_size=4",
                    "max_steps_per_epoch=2", "save_every_n_steps=null", *FAST)
    assert "dropped 1 of 40 rows (empty response: 1)" in proc.stderr
