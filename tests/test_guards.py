"""Reliability, second round: the guards in prefopt.guards / prefopt.resume / prefopt.config /
prefopt.data, as library functions and inside the real recipe classes (in-process, tiny model, a 48-pair file)."""

import logging
import os

import pytest
import torch
from conftest import REPO, TINY, load_recipe
from omegaconf import OmegaConf

from prefopt.config import ConfigError, validate_config
from prefopt.guards import CollapseGuard, OutputDirLockedError, TrainingCollapseError, check_device, lock_output_dir
from prefopt.resume import ExistingRunError

LORA = load_recipe("simpo_lora_single_device")


# ---------------------------------------------------------------------------------------------- device
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_requested_without_cuda_names_requested_and_available(tmp_path):
    with pytest.raises(RuntimeError) as e:
        check_device("cuda")
    assert str(e.value).startswith("device='cuda' was requested, but CUDA is not available (torch ")
    assert "available here: cpu. Set device to one of them (e.g. device=cpu)." in str(e.value)
    with pytest.raises(RuntimeError, match="device='cuda:1' was requested, but CUDA is not available"):
        check_device("cuda:1")
    with pytest.raises(RuntimeError, match="device='gpu' is not a torch device"):
        check_device("gpu")
    assert check_device("cpu") == torch.device("cpu")
    # the recipe stops before it builds anything (nothing written to output_dir)
    with pytest.raises(RuntimeError, match="device='cuda' was requested, but CUDA is not available"):
        LORA.SimPORecipeSingleDevice(_cfg(tmp_path / "o", "device=cuda"))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- output_dir
def test_output_dir_lock_names_the_holder_and_is_released(tmp_path):
    held = lock_output_dir(tmp_path)
    with pytest.raises(OutputDirLockedError) as e:
        lock_output_dir(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"output_dir='{tmp_path}' is in use by another run (pid {os.getpid()} on host ")
    assert f"lock file {tmp_path}/.lock" in msg
    held.close()  # what the end of the process does as well
    lock_output_dir(tmp_path).close()


# ---------------------------------------------------------------------------------------------- collapse
def _spreads(guard, logps, logits):
    class H:  # a SequenceLogps half
        def __init__(self, lp, lg):
            self.logps, self.logits_mean = torch.tensor(lp), torch.tensor(lg)

    guard.observe(H(logps[:2], logits[:2]), H(logps[2:], logits[2:]))
    return guard.spreads().tolist()


def test_collapse_guard_counts_steps_in_a_row():
    g = CollapseGuard(patience=3, action="error")
    healthy = ([-1.0, -1.2, -1.1, -1.5], [0.1, 0.2, 0.1, 0.3])
    flat = ([-6.2383] * 4, [0.0] * 4)
    assert g.check(1, grad_norm=0.0, lr=1e-3, spreads=_spreads(g, *healthy)) is None
    assert g.check(2, grad_norm=0.0, lr=1e-3, spreads=_spreads(g, *healthy)) is None
    assert g.check(3, grad_norm=0.5, lr=1e-3, spreads=_spreads(g, *healthy)) is None  # streak broken
    assert g.check(4, grad_norm=0.0, lr=0.0, spreads=_spreads(g, *healthy)) is None  # lr 0 (warm-up): no alarm
    assert g.check(5, grad_norm=0.0, lr=1e-3, spreads=_spreads(g, *healthy)) is None
    assert g.check(6, grad_norm=0.3, lr=1e-3, spreads=_spreads(g, *flat)) is None
    with pytest.raises(TrainingCollapseError) as e:
        g.check(7, grad_norm=0.0, lr=1e-3, spreads=_spreads(g, *flat))
    assert str(e.value) == (
        "training collapsed: 3 optimizer step(s) in a row (steps 5-7) showed step 5: gradient norm exactly 0 at "
        "lr=0.001; step 6: every chosen and rejected average log-prob equal, every chosen and rejected mean logit "
        "equal; step 7: gradient norm exactly 0 at lr=0.001, every chosen and rejected average log-prob equal, "
        "every chosen and rejected mean logit equal. Nothing is being learned (a saturated loss, a learning rate "
        "that blew the weights to a constant output, frozen parameters). Stopped before step 7's update; resume "
        "states written before step 5 are intact. Set on_collapse=warn to train on regardless."
    )
    w = CollapseGuard(patience=1, action="warn")
    assert w.check(1, grad_norm=0.0, lr=1.0, spreads=[0.5, 0.5]).endswith("training goes on (on_collapse=warn)")


# ---------------------------------------------------------------------------------------------- config types
def test_component_argument_types_and_ranges_in_one_error(tmp_path):
    cfg = _cfg(tmp_path, "optimizer.lr=fast", "optimizer.betas=[0.9,1.5]", "optimizer.amsgrad=maybe",
               "loss.beta=-2", "model.lora_rank=0", "lr_scheduler.num_warmup_steps=ten")
    cfg.loss.beta = "two"
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, LORA.CONFIG_SPEC, bound_args=LORA.BOUND_ARGS)
    msg = str(e.value)
    assert msg.startswith("6 problem(s) in the config:")
    for needle in ["model.lora_rank: must be >= 1, got 0", "loss.beta: expected float, got str 'two'",
                   "optimizer.lr: expected float, got str 'fast'", "optimizer.betas: must be in [0, 1), got 1.5",
                   "optimizer.amsgrad: expected bool, got str 'maybe'",
                   "lr_scheduler.num_warmup_steps: expected int, got str 'ten'"]:
        assert needle in msg, msg
    # every shipped config of the two training recipes passes (the recipe a config is for: prefopt ls)
    from prefopt.cli import list_recipes

    table = list_recipes()
    for recipe, mod in (("simpo_lora_single_device", LORA), ("simpo_full_distributed", FULL)):
        assert len(table[recipe]) > 10
        for name in table[recipe]:
            validate_config(OmegaConf.load(REPO / "configs" / f"{name}.yaml"), mod.CONFIG_SPEC, bound_args=mod.BOUND_ARGS)


FULL = load_recipe("simpo_full_distributed")


# ---------------------------------------------------------------------------------------------- data
# A broken line of each kind the loader meets (prefopt.data.sources parses every line): cut short,
# invalid JSON between braces (looks like an object), two objects on one line (pyarrow would read
# two rows), a JSON value that is not an object.
_BROKEN = {
    "cut short": (lambda line: line[:40], "not valid JSON ("),
    "invalid between braces": (lambda line: line[:40] + ", }", "not valid JSON ("),
    "two objects": (lambda line: line + line, "not valid JSON (Extra data"),
    "null": (lambda line: "null", "a JSON NoneType, not an object"),
}


@pytest.mark.parametrize("kind", list(_BROKEN))
def test_empty_file_and_invalid_json_line_named_and_dropped(tmp_path, tiny_tokenizer, caplog, kind):
    from prefopt.data import BadExample, preference_dataset

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=f"^{empty}: the data file is empty \\(no rows\\)"):
        preference_dataset(tiny_tokenizer, source="json", data_files=str(empty), split="train")
    lines = (TINY / "train.jsonl").read_text().splitlines()[:6]
    breaks, problem = _BROKEN[kind]
    lines[3] = breaks(lines[3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadExample) as e:
        preference_dataset(tiny_tokenizer, source="json", data_files=str(bad), split="train", on_bad_example="error")
    assert str(e.value).startswith(f"{bad}: line 4 (row 3): {problem}"), str(e.value)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(bad), split="train")
    assert [ds[i]["row"] for i in range(len(ds))] == [0, 1, 2, 4, 5]  # the rows after it keep their numbers
    assert dict(ds.dropped) == {"invalid JSON": 1}
    assert "dropped 1 of 6 rows (invalid JSON: 1)" in caplog.text
    assert caplog.text.count(f"{bad}: line 4 (row 3): {problem}") == 1  # the line's own warning, once


def test_lines_found_by_both_scans_are_warned_once(tmp_path, tiny_tokenizer, caplog):
    """A `null` line (pyarrow would read it as a row of nulls) beside invalid JSON between braces
    (pyarrow rejects the file): both dropped, each named once."""
    from prefopt.data import preference_dataset

    lines = (TINY / "train.jsonl").read_text().splitlines()[:6]
    lines[1], lines[3] = "null", lines[3][:40] + ", }"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(bad), split="train")
    assert [ds[i]["row"] for i in range(len(ds))] == [0, 2, 4, 5]
    assert dict(ds.dropped) == {"invalid JSON": 2}
    assert caplog.text.count(f"{bad}: line 2 (row 1): a JSON NoneType, not an object") == 1
    assert caplog.text.count(f"{bad}: line 4 (row 3): not valid JSON (") == 1


# ---------------------------------------------------------------------------------------------- in the recipe
def _cfg(out, *overrides, data=None):
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    cfg = OmegaConf.load(REPO / "configs/tiny/simpo_lora.yaml")
    base = [f"output_dir={out}", "eval_dataset=null", "eval_every_n_steps=null", "batch_size=4",
            "max_steps_per_epoch=3", "save_every_n_steps=1", "save_adapter_weights_only=True"]
    if data is not None:
        base.append(f"dataset.data_files={data}")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(base + list(overrides)))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "train48.jsonl"
    d.write_text("\n".join((TINY / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    return d


def _run(cfg, train=True, before_train=None):
    r = LORA.SimPORecipeSingleDevice(cfg)
    try:
        r.setup(cfg)
        if before_train is not None:
            before_train(r)
        if train:
            r.train()
    except BaseException:
        r._lock.close()  # what the end of a failed run's process does
        raise
    if train:
        r.cleanup()
    return r


def _dead_adapter(r):
    """A and B of every LoRA layer zero (e.g. an adapter zeroed by a bad merge script): each
    one's gradient is a product with the other, so the gradient is exactly 0 at every step."""
    with torch.no_grad():
        for p in r._adapter_params.values():
            p.zero_()


def test_recipe_collapse_stops_at_the_third_zero_gradient_step(tmp_path, small_data):
    out = tmp_path / "collapse"
    cfg = _cfg(out, "lr_scheduler=null", "max_steps_per_epoch=5", data=small_data)
    with pytest.raises(TrainingCollapseError) as e:
        _run(cfg, before_train=_dead_adapter)
    assert str(e.value).startswith(
        "training collapsed: 3 optimizer step(s) in a row (steps 1-3) showed step 1: gradient norm exactly 0 "
        "at lr=0.003; step 2: gradient norm exactly 0 at lr=0.003; step 3: "
    )
    states = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert states == ["step_1", "step_2"]  # nothing written for the collapsed step 3
    # on_collapse=warn trains on
    r = _run(_cfg(tmp_path / "warn", "lr_scheduler=null", "on_collapse=warn", data=small_data),
             before_train=_dead_adapter)
    assert r.global_step == 3


def test_recipe_resume_lock_fresh_run_and_corrupt_state(tmp_path, small_data):
    out = tmp_path / "run"
    _run(_cfg(out, data=small_data))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.model.lora_rank == 8 and (out / "checkpoints" / "step_3" / "config.yaml").exists()

    # a lora_rank that differs from the saved run: named with both values, before any weight loads
    with pytest.raises(ValueError) as e:
        _run(_cfg(out, "resume_from_checkpoint=True", "model.lora_rank=16", data=small_data), train=False)
    assert "model.lora_rank=16 in the config but 8 in the saved run" in str(e.value)
    assert f"({out}/checkpoints/step_3/config.yaml)" in str(e.value)
    assert OmegaConf.load(out / "config.yaml").model.lora_rank == 8  # the saved run's config is kept

    # a fresh run into the folder: refused, nothing removed
    with pytest.raises(ExistingRunError, match="overwrite_output_dir=True to delete its states"):
        LORA.SimPORecipeSingleDevice(_cfg(out, data=small_data))
    assert (out / "checkpoints" / "step_3").exists()

    # the newest state is corrupt: resume from step_2, saying so
    f = out / "checkpoints" / "step_3" / "recipe_state.pt"
    f.write_bytes(f.read_bytes()[:100])
    r = _run(_cfg(out, "resume_from_checkpoint=True", data=small_data), train=False)
    assert r.global_step == 2

    # a second run while the first holds the folder
    with pytest.raises(OutputDirLockedError, match=f"output_dir='{out}' is in use by another run \\(pid {os.getpid()}"):
        LORA.SimPORecipeSingleDevice(_cfg(out, "resume_from_checkpoint=True", data=small_data))
    r.train()  # finishes step 3 again: a new, intact step_3
    r.cleanup()
    assert torch.load(f, weights_only=False)["global_step"] == 3

    # overwrite_output_dir: a clean start
    r = LORA.SimPORecipeSingleDevice(_cfg(out, "overwrite_output_dir=True", data=small_data))
    assert not (out / "checkpoints").exists() and (out / "config.yaml").exists()
    r._lock.close()


def test_full_recipe_one_process_resumes_past_a_corrupt_shard(tmp_path, small_data):
    """In-process, a one-process group: the newest state's *.distcp is cut short; the resume
    takes the older one (every rank decides together, through the collective load)."""
    import torch.distributed as dist

    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "configs/tiny/simpo_full.yaml"),
        OmegaConf.from_dotlist([f"output_dir={tmp_path}/full", f"dataset.data_files={small_data}", "eval_dataset=null",
                                "eval_every_n_steps=null", "batch_size=8", "max_steps_per_epoch=2",
                                "save_every_n_steps=1"]),
    )
    try:
        r = FULL.SimPORecipeDistributed(cfg)
        r.setup(cfg)
        r.train()
        r.cleanup()
        shard = tmp_path / "full" / "checkpoints" / "step_2" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
        cfg.resume_from_checkpoint = True
        r = FULL.SimPORecipeDistributed(cfg)
        r.setup(cfg)
        assert r.global_step == 1
        r.cleanup()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- end of a run
def _arrow_maps(folder) -> list:
    """Files under ``folder`` that this process has memory-mapped (the tokenized data's Arrow files)."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if str(folder) in line})


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory maps (Linux)")
@pytest.mark.parametrize("recipe", ["lora", "full"])
def test_cleanup_releases_the_data_while_the_recipe_is_still_held(tmp_path, small_data, recipe):
    """After cleanup() nothing of the run's Arrow data is mapped, though the caller (a test, a
    notebook, a traceback) still holds the recipe object: the tables are unmapped while pyarrow
    is fully alive, not in the interpreter's teardown. The lock is released as well."""
    import torch.distributed as dist

    cache = tmp_path / "cache"
    out = tmp_path / recipe
    if recipe == "lora":
        cfg = _cfg(out, "max_steps_per_epoch=1", "save_every_n_steps=null", data=small_data)
        make = LORA.SimPORecipeSingleDevice
    else:
        cfg = OmegaConf.merge(
            OmegaConf.load(REPO / "configs/tiny/simpo_full.yaml"),
            OmegaConf.from_dotlist([f"output_dir={out}", f"dataset.data_files={small_data}", "batch_size=8",
                                    "max_steps_per_epoch=1", "eval_every_n_steps=null", "save_every_n_steps=null",
                                    f"eval_dataset.data_files={small_data}"]),
        )
        make = FULL.SimPORecipeDistributed
    for key in ("dataset", "eval_dataset"):
        if cfg.get(key) is not None:
            cfg[key].cache_dir = str(cache)  # the test's own cache: its files are the ones to look for
    try:
        r = make(cfg)
        r.setup(cfg)
        loaders = [r._dataloader] + ([r._eval_dataloader] if r._eval_dataloader is not None else [])
        held = [loader.dataset for loader in loaders]
        assert _arrow_maps(cache), "the tokenized data is expected to be memory-mapped during the run"
        r.train()
        r.cleanup()
        assert _arrow_maps(cache) == []
        assert r._dataloader is None and r._eval_dataloader is None and r._sampler is None
        assert all(ds._tokens is None for ds in held)  # even a data set someone else still holds
        lock_output_dir(out).close()  # the output_dir lock is free
        assert (out / "epoch_0").is_dir()  # the run finished: its final save is there
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_release_data_reaches_through_loaders_and_concatenated_sets(tmp_path, small_data, tiny_tokenizer):
    from torch.utils.data import DataLoader
    from torchtune.datasets import ConcatDataset

    from prefopt.data import preference_dataset
    from prefopt.teardown import release_data

    cache = tmp_path / "cache"
    parts = [preference_dataset(tiny_tokenizer, source="json", data_files=str(small_data), split="train", cache_dir=str(cache))
             for _ in range(2)]
    loader = DataLoader(ConcatDataset(parts), batch_size=4, collate_fn=list)
    single = preference_dataset(tiny_tokenizer, source="json", data_files=str(small_data), split="train",
                                max_seq_len=64, cache_dir=str(cache))
    assert len(next(iter(loader))) == 4
    assert _arrow_maps(cache)
    assert release_data(loader, None, single) == 3
    assert all(p._tokens is None for p in (*parts, single))
    assert _arrow_maps(cache) == []
    assert release_data(loader) == 0  # a second cleanup finds nothing left


# A program that runs a recipe as __main__ and goes on: a global ThreadPoolExecutor with an idle
# worker (the kind that hung a run whose ending joined threads before the atexit handlers), an
# atexit handler, and after the run a non-daemon thread and output still in stdout's buffer.
_DRIVER = """
import atexit, runpy, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
log = open(sys.argv[1], "a", buffering=1)
recipe, args = sys.argv[2], sys.argv[3:]
pool = ThreadPoolExecutor(max_workers=1)
pool.submit(time.sleep, 0.01).result()
atexit.register(lambda: log.write("atexit\\n"))
sys.argv = [recipe, *args]
try:
    runpy.run_path(recipe, run_name="__main__")
except SystemExit as e:
    log.write(f"recipe exit {e.code}\\n")
except Exception as e:
    log.write(f"recipe raised {type(e).__name__}\\n")
log.write("after the recipe\\n")  # the caller goes on
def late():
    time.sleep(0.3)
    log.write("thread\\n")
threading.Thread(target=late).start()  # not a daemon: the interpreter joins it before atexit
print("done", end="")  # no newline: still in stdout's buffer when the program ends
"""


@pytest.mark.slow
def test_recipe_run_as_main_returns_to_its_caller_which_exits_normally(tmp_path, small_data):
    """runpy.run_path(recipe, run_name="__main__") of a finished run raises SystemExit(None), as a
    torchtune recipe does, and the caller's next statement runs; the program then ends as any
    Python program: its thread, then its atexit handler, its buffered output, status 0, no hang.
    A run that fails (an unknown config key) raises to the caller; as a script it exits 1 with
    the traceback."""
    import subprocess
    import sys

    from conftest import tune_env

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    common = ["--config", "configs/tiny/simpo_lora.yaml", f"dataset.data_files={small_data}", "eval_dataset=null",
              "eval_every_n_steps=null", "batch_size=4", "max_steps_per_epoch=2", "save_every_n_steps=null"]
    runs = {
        "ok": [sys.executable, str(driver), str(tmp_path / "ok.txt"), "recipes/simpo_lora_single_device.py",
               *common, f"output_dir={tmp_path / 'ok'}"],
        "bad": [sys.executable, str(driver), str(tmp_path / "bad.txt"), "recipes/simpo_lora_single_device.py",
                *common, f"output_dir={tmp_path / 'bad'}", "no_such_key=1"],
        "script_bad": [sys.executable, "recipes/simpo_lora_single_device.py", *common,
                       f"output_dir={tmp_path / 'script_bad'}", "no_such_key=1"],
    }
    env = tune_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))  # this checkout's prefopt
    procs = {k: subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for k, cmd in runs.items()}
    res = {}
    for k, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"{k}: the program did not end within 300 s (a finished run must not hang)")
        res[k] = (p.returncode, stdout, stderr)
    code, stdout, stderr = res["ok"]
    assert code == 0, stderr[-3000:]
    assert stdout.endswith("done")
    assert (tmp_path / "ok.txt").read_text() == "recipe exit None\nafter the recipe\nthread\natexit\n"
    assert (tmp_path / "ok" / "epoch_0").is_dir()  # the run finished, with its final save
    code, stdout, stderr = res["bad"]
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "bad.txt").read_text() == "recipe raised ConfigError\nafter the recipe\nthread\natexit\n"
    code, stdout, stderr = res["script_bad"]
    assert code == 1
    assert "ConfigError" in stderr and "no_such_key" in stderr
