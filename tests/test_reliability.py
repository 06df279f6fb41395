"""Reliability of the LoRA recipe: real kills, non-finite steps, unwritable output, bad data;
and of both recipes: an output_dir too small for a checkpoint, a disk that fills up mid-run.
(The 2-process kill test is in test_full_distributed.py, next to the run it is compared with.)"""

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, complete_steps, read_log, tune_bin, tune_run
from torch.testing import assert_close

RECIPE = "recipes/simpo_lora_single_device.py"
CONFIG = "configs/tiny/simpo_lora.yaml"
pytestmark = pytest.mark.slow
FAST = ["eval_dataset=null", "eval_every_n_steps=null"]


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
    """Step 1 (lr 1e30) blows the adapter up; steps 2 and 3 are non-finite and skipped: neither the
    weights, nor the optimizer state, nor the LR schedule move on a skipped step."""
    out = tmp_path / "skip"
    proc = tune_run(RECIPE, CONFIG, f"output_dir={out}", "optimizer.lr=1e30", "clip_grad_norm=null",
                    "lr_scheduler.num_warmup_steps=0", "max_steps_per_epoch=3", "save_every_n_steps=1",
                    "on_nonfinite=skip", "on_collapse=warn", "save_adapter_weights_only=True", *FAST)
    assert proc.stderr.count("step skipped (on_nonfinite=skip)") == 2
    states = {s: out / "checkpoints" / f"step_{s}" for s in (1, 2, 3)}
    adapters = {s: torch.load(p / "adapter.pt", weights_only=True) for s, p in states.items()}
    recipe = {s: torch.load(p / "recipe_state.pt", weights_only=False) for s, p in states.items()}
    for s in (2, 3):
        for k, v in adapters[1].items():
            assert torch.equal(adapters[s][k], v), (s, k)
        assert recipe[s]["lr_scheduler"]["last_epoch"] == recipe[1]["lr_scheduler"]["last_epoch"] == 1
        steps = [st["step"] for st in recipe[s]["optimizer"]["state"].values()]
        assert steps and all(float(x) == 1.0 for x in steps)  # Adam took exactly one step
    assert recipe[3]["global_step"] == 3  # the skipped steps count as steps of the epoch


# ----------------------------------------------------------------------------------------------
# A full disk, for real: output_dir on a tmpfs of a chosen size, mounted in a private user+mount
# namespace (`unshare`; no root needed where unprivileged user namespaces are enabled). Writes
# past its size fail with ENOSPC, as on a full disk.

FULL = "recipes/simpo_full_distributed.py"
FULL_CONFIG = "configs/tiny/simpo_full.yaml"


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory):
    unshare = shutil.which("unshare")
    probe = tmp_path_factory.mktemp("probe")
    ok = unshare and subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
        capture_output=True,
    ).returncode == 0
    if not ok:
        pytest.skip("cannot mount a small tmpfs (unshare --user --mount is not available here)")

    def run_on(size: int, mnt: Path, keep: Path, args: list, nproc: int = 0):
        """`tune run` with a fresh tmpfs of ``size`` bytes at ``mnt``; its contents are copied
        to ``keep`` at the end (the tmpfs goes away with the namespace)."""
        mnt.mkdir()
        keep.mkdir()
        script = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97; m="$2"; k="$3"; shift 3; "$@"; rc=$?; ' \
                 'cp -a "$m/." "$k/"; exit $rc'
        prefix = (unshare, "--user", "--map-root-user", "--mount", "bash", "-c", script, "bash", str(size), str(mnt),
                  str(keep))
        assert args[1] == "--config", args
        proc = tune_run(args[0], args[2], *args[3:], nproc=nproc, check=False, prefix=prefix)
        assert proc.returncode != 97, proc.stderr
        return proc

    return run_on


def _sizes(config: str, lora: bool, **overrides):
    """What the recipe's start-up check computes, from a meta-device copy of the tiny model."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.modules.peft import get_adapter_params

    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})
    from prefopt.checkpointing import checkpoint_bytes

    cfg = OmegaConf.load(REPO / config)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in get_adapter_params(model).values()) if lora else n_all
    export = n_train if overrides.get("save_adapter_weights_only") else n_all
    return checkpoint_bytes(trainable_numel=n_train, trainable_dtype=torch.float32, optimizer_states=2,
                            export_numel=export, export_dtype=torch.float32)


@pytest.mark.parametrize("recipe", ["lora", "full_2proc"])
def test_output_dir_too_small_for_a_checkpoint_reported_before_building(small_fs, tmp_path, recipe):
    lora = recipe == "lora"
    config = CONFIG if lora else FULL_CONFIG
    sizes = _sizes(config, lora)
    size = sizes["total"] - (256 << 10)  # a quarter MiB short
    mnt = tmp_path / "mnt"
    proc = small_fs(size, mnt, tmp_path / "keep",
                    [RECIPE if lora else FULL, "--config", config, f"output_dir={mnt}/run", *FAST],
                    nproc=0 if lora else 2)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"NotEnoughSpaceError: output_dir='{mnt}/run' has " in text, text[-3000:]
    assert "but the first checkpoint" in text and f"needs about {sizes['total']:,} bytes" in text
    assert f"a resume state of {sizes['resume_state']:,} bytes" in text
    assert "Model ready" not in text  # before any model was built


def test_lora_disk_full_during_a_periodic_save_keeps_the_last_complete_state(small_fs, tmp_path):
    """Room for the first checkpoint (the start-up check passes) and 1.5 more resume states:
    a later periodic save hits ENOSPC. The run stops naming the folder; the states before it
    are complete and load; the partial folder is removed."""
    sizes = _sizes(CONFIG, lora=True, save_adapter_weights_only=True)
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    proc = small_fs(sizes["total"] + 3 * sizes["resume_state"] // 2, mnt, keep,
                    [RECIPE, "--config", CONFIG, f"output_dir={mnt}/run", "save_adapter_weights_only=True",
                     "max_steps_per_epoch=8", "save_every_n_steps=1", "batch_size=8", *FAST])
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "bytes free; the first checkpoint needs about" in text  # the start-up check passed
    saved = complete_steps(keep / "run")
    assert saved and saved == list(range(1, len(saved) + 1)) and len(saved) < 8, (saved, text[-3000:])
    failed = len(saved) + 1
    assert (f"OSError: could not write the resume state {mnt}/run/checkpoints/step_{failed}.tmp: RuntimeError: "
            in text), text[-3000:]
    assert "(torch.save could not write the file: is the disk full?)" in text
    assert f"The last complete resume state, {mnt}/run/checkpoints/step_{failed - 1}, is intact" in text
    assert not (keep / "run" / "checkpoints" / f"step_{failed}.tmp").exists()
    last = keep / "run" / "checkpoints" / f"step_{failed - 1}"
    adapter = torch.load(last / "adapter.pt", weights_only=True)
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert torch.load(last / "recipe_state.pt", weights_only=False)["global_step"] == failed - 1


def test_full_2proc_disk_full_during_a_periodic_save_stops_every_rank(small_fs, tmp_path):
    """The same for the 2-process recipe: room for the first checkpoint and half a resume state
    more, so the second save (sharded, both ranks writing) fails; one message naming the folder
    on every rank, the first state intact and loadable."""
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    sizes = _sizes(FULL_CONFIG, lora=False)
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    proc = small_fs(sizes["total"] + sizes["resume_state"] // 2, mnt, keep,
                    [FULL, "--config", FULL_CONFIG, f"output_dir={mnt}/run", "max_steps_per_epoch=3",
                     "save_every_n_steps=1", *FAST], nproc=2)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert complete_steps(keep / "run") == [1], text[-3000:]
    msg = f"OSError: could not write the resume state {mnt}/run/checkpoints/step_2.tmp: rank "
    assert msg in text, text[-3000:]
    assert f"The last complete resume state, {mnt}/run/checkpoints/step_1, is intact" in text
    assert not (keep / "run" / "checkpoints" / "step_2.tmp").exists()
    cfg = OmegaConf.load(REPO / FULL_CONFIG)
    state = {"model": tt_config.instantiate(cfg.model).state_dict()}
    dcp.load(state, checkpoint_id=keep / "run" / "checkpoints" / "step_1")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
