"""Reliability, third round, start-up (issue 25), in both recipes: files in output_dir are never
written through a planted link; what the config and the files can tell is in the one start-up
error, before any model is built; a learning rate that stays 0 is a warning; a config file that is
not a mapping is one line. The recipe classes are built in-process (the full recipe as one process
on an in-memory store), except one `tune run`."""

import logging
import os
import sys

import pytest
from conftest import REPO, TINY, load_recipe, tune_run
from omegaconf import OmegaConf

from prefopt.checkpointing import check_output_dir
from prefopt.config import ConfigError
from prefopt.guards import lock_output_dir

LORA = load_recipe("simpo_lora_single_device")
FULL = load_recipe("simpo_full_distributed")
RECIPES = {"lora": (LORA, "SimPORecipeSingleDevice", "simpo_lora"), "full": (FULL, "SimPORecipeDistributed", "simpo_full")}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "train48.jsonl"
    d.write_text("\n".join((TINY / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    return d


def _cfg(which: str, out, *overrides: str):
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    base = OmegaConf.load(REPO / "configs" / "tiny" / f"{RECIPES[which][2]}.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist([f"output_dir={out}", *overrides]))


def _build(which: str, cfg, setup: bool = False):
    """The recipe's __init__ (and setup), then cleanup; the full recipe's process group destroyed."""
    import torch.distributed as dist

    mod, cls, _ = RECIPES[which]
    try:
        r = getattr(mod, cls)(cfg)
        try:
            if setup:
                r.setup(cfg)
        finally:
            if getattr(r, "_lock", None) is not None:
                r._lock.close()
            if getattr(r, "_metric_logger", None) is not None:
                r._metric_logger.close()
        return r
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- planted links
def test_write_probe_and_lock_never_write_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".write_probe").symlink_to(victim)
    check_output_dir(out)  # a fresh random name: the link is not used
    assert victim.read_text() == "precious\n" and (out / ".write_probe").is_symlink()
    assert [p.name for p in out.iterdir()] == [".write_probe"]  # no probe left behind

    plants = [
        (lambda lock: lock.symlink_to(victim), f"is a symbolic link (to {victim}), not a file a run made; it is not "
         "followed. Remove the link (or choose another output_dir)."),
        (lambda lock: lock.symlink_to(tmp_path / "missing"), "is a symbolic link"),  # dangling: nothing created
        (lambda lock: os.link(victim, lock), "is a name of a file with 2 hard links, not a file a run made; it is "
         "left as it is. Remove it (or choose another output_dir)."),
    ]
    for plant, refusal in plants:
        plant(out / ".lock")
        with pytest.raises(OSError) as e:
            lock_output_dir(out)
        assert str(e.value).startswith(f"output_dir='{out}': the lock file {out}/.lock {refusal}"), str(e.value)
        assert victim.read_text() == "precious\n" and not (tmp_path / "missing").exists()
        (out / ".lock").unlink()
    lock_output_dir(out).close()  # a lock file of our own is taken as before


@pytest.mark.parametrize("which", ["lora", "full"])
def test_recipes_refuse_a_planted_lock_link_and_ignore_a_probe_link(tmp_path, which):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".write_probe").symlink_to(victim)
    (out / ".lock").symlink_to(victim)
    with pytest.raises(OSError, match=rf"the lock file {out}/.lock is a symbolic link \(to {victim}\)"):
        _build(which, _cfg(which, out))
    assert victim.read_text() == "precious\n"
    (out / ".lock").unlink()
    _build(which, _cfg(which, out))  # the probe link is left alone, the run starts
    assert victim.read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------- one start-up error
@pytest.mark.parametrize("which", ["lora", "full"])
def test_loss_data_and_max_seq_len_problems_in_the_one_startup_error(tmp_path, which):
    import torch.distributed as dist

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    out = tmp_path / "out"
    cfg = _cfg(which, out, "loss.beta=0", "loss.gamma=-1", "dataset.max_seq_len=512", f"dataset.data_files={tmp_path}/typo.jsonl",
               "eval_dataset.split=test", "batch_size=0", "clip_grad_nrom=1.0")
    with pytest.raises(ConfigError) as e:
        _build(which, cfg)
    msg = str(e.value)
    for line in [
        "7 problem(s) in the config:",
        "  - clip_grad_nrom: unknown config key (did you mean 'clip_grad_norm'?)",
        "  - batch_size: must be >= 1, got 0",
        "  - loss.beta: SimPOLoss: beta must be > 0, got beta=0.0",
        "  - loss.gamma: SimPOLoss: gamma must be >= 0, got gamma=-1.0",
        f"  - dataset.data_files: {tmp_path}/typo.jsonl does not exist (its folder holds ['empty_folder'])",
        "  - dataset.max_seq_len: 512 is larger than model.max_seq_len=256: a pair longer than 256 tokens would crash "
        "the run at the step that reaches it; set dataset.max_seq_len to at most 256",
        "  - eval_dataset.split: 'test', but the local data_files have only the split(s) ['train'] (data_files as a "
        "{split: files} mapping names others)",
    ]:
        assert line in msg.splitlines(), msg
    assert not out.exists() and not dist.is_initialized()  # nothing written, nothing built

    # a folder without data files; the eval set checked against the model as well
    cfg = _cfg(which, out, f"eval_dataset.data_files={empty}", "eval_dataset.max_seq_len=300")
    with pytest.raises(ConfigError) as e:
        _build(which, cfg)
    msg = str(e.value)
    assert f"  - eval_dataset.data_files: {empty} is a folder with no .json/.jsonl/.ndjson file for source 'json'" in msg
    assert "  - eval_dataset.max_seq_len: 300 is larger than model.max_seq_len=256" in msg

    # null: never truncate, so a long pair would end the run mid-way
    cfg = _cfg(which, out, "dataset.max_seq_len=null")
    with pytest.raises(ConfigError) as e:
        _build(which, cfg)
    assert ("  - dataset.max_seq_len: null (pairs are never truncated), but the model has model.max_seq_len=256: a pair "
            "longer than 256 tokens would crash the run at the step that reaches it; set dataset.max_seq_len to at most 256"
            ) in str(e.value).splitlines(), str(e.value)
    assert not out.exists()
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- lr 0
def test_zero_lr_warning_sees_the_whole_schedule():
    from prefopt.startup import zero_lr_warning

    adamw = OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 0.0})
    cosine = OmegaConf.create({"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                               "num_warmup_steps": 5})
    assert zero_lr_warning(adamw, None, 40) == (
        "optimizer.lr=0.0: the learning rate is 0 for the whole run (no lr_scheduler), so training will change no "
        "weight. Set optimizer.lr > 0 (e.g. optimizer.lr=1e-6)."
    )
    assert zero_lr_warning(adamw, cosine, 40) == (
        "the learning rate is 0 at all 40 optimizer steps of the run (optimizer.lr=0.0, lr_scheduler "
        "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup), so training will change no weight. "
        "Set optimizer.lr > 0 (e.g. optimizer.lr=1e-6)."
    )
    adamw.lr = 1e-3
    assert zero_lr_warning(adamw, None, 40) is None
    cosine.num_warmup_steps = 1000  # a warmup longer than the run starts at 0 but moves from step 2 on
    assert zero_lr_warning(adamw, cosine, 40) is None


@pytest.mark.parametrize("which", ["lora", "full"])
def test_recipes_warn_at_startup_when_the_lr_stays_zero(tmp_path, small_data, caplog, which):
    data = [f"dataset.data_files={small_data}", "eval_dataset=null", "eval_every_n_steps=null", "max_steps_per_epoch=2"]
    with caplog.at_level(logging.WARNING):
        _build(which, _cfg(which, tmp_path / "zero", "optimizer.lr=0", *data), setup=True)
    assert "the learning rate is 0 at all 2 optimizer steps of the run (optimizer.lr=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _build(which, _cfg(which, tmp_path / "warmup", "lr_scheduler.num_warmup_steps=100", *data), setup=True)
    assert "learning rate is 0" not in caplog.text


# ---------------------------------------------------------------------------------------------- config file
@pytest.mark.parametrize("which", ["lora", "full"])
def test_config_file_that_is_not_a_mapping_is_one_line(tmp_path, monkeypatch, capsys, which):
    mod = RECIPES[which][0]
    listed = tmp_path / "list.yaml"
    listed.write_text("- output_dir: /tmp/x\n- batch_size: 4\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: /tmp/x\nbatch_size: [4\n")
    recipe = f"simpo_{'lora_single_device' if which == 'lora' else 'full_distributed'}.py"
    for path, line in [
        (listed, f"{recipe}: {listed}: the config is a YAML list, not a mapping of keys"),
        (bad, f"{recipe}: {bad}: not valid YAML (line 3, column 1): "),
        (tmp_path / "nope.yaml", f"{recipe}: {tmp_path}/nope.yaml: no such config file"),
    ]:
        monkeypatch.setattr(sys, "argv", [str(REPO / "recipes" / recipe), "--config", str(path), "batch_size=2"])
        with pytest.raises(SystemExit) as e:
            mod.recipe_main()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, err


@pytest.mark.slow
def test_tune_run_with_a_yaml_list_config_is_one_line(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- output_dir: /tmp/x\n- batch_size: 4\n")
    proc = tune_run("recipes/simpo_lora_single_device.py", str(listed), check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"simpo_lora_single_device.py: {listed}: the config is a YAML list, not a mapping of keys" in proc.stderr


def test_the_run_config_is_never_written_through_a_link(tmp_path):
    """config.yaml (and the temporary name it is written under) in a shared output_dir: links
    planted at either name are replaced or ignored, their targets never written."""
    from omegaconf import OmegaConf

    from prefopt.resume import load_run_config, save_run_config

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml.tmp").symlink_to(victim)  # the fixed temporary name used before
    (out / "config.yaml").symlink_to(victim)
    save_run_config(OmegaConf.create({"seed": 3}), out / "config.yaml")
    assert victim.read_text() == "precious\n"
    assert not (out / "config.yaml").is_symlink() and load_run_config(out / "config.yaml").seed == 3
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "config.yaml.tmp"]  # nothing else left
