"""Tier 1: prefopt.resume, the resume-state protocol of both recipes: the folder layout and its
steps, atomic writes and their error, the newest intact state with fallback past corrupt ones, and
the config comparison with its one error text (also checked in both real recipes, in-process)."""

import logging

import pytest
import torch
from conftest import REPO, TINY, load_recipe
from omegaconf import OmegaConf

from prefopt.resume import (
    COMPLETE,
    CONFIG_FILE,
    CorruptCheckpointError,
    ExistingRunError,
    ResumeMismatchError,
    begin_state,
    check_fresh_output_dir,
    checkpoint_write_error,
    complete_states,
    describe_write_error,
    latest_complete,
    load_checkpoint_file,
    load_newest_intact,
    mark_complete,
    publish_state,
    read_newest_state,
    resume_mismatches,
    start_fresh_run,
    state_dirs,
    state_root,
    write_state,
)


# ---------------------------------------------------------------------------------------------- the parts
def test_resume_state_writer_and_reader_agree(tmp_path):
    """The writer's steps (tmp folder, COMPLETE marker last, rename) and the reader share one layout."""
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


def test_fresh_run_into_a_folder_with_resume_states_refuses_unless_overwrite(tmp_path):
    (tmp_path / "checkpoints" / "step_20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_40.tmp").mkdir()
    (tmp_path / "epoch_0").mkdir()
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ExistingRunError) as e:
        check_fresh_output_dir(tmp_path, overwrite=False)
    assert str(e.value) == (
        f"output_dir='{tmp_path}' holds resume states of an earlier run ({tmp_path}/checkpoints: step_20, step_40.tmp), "
        "and this is a fresh run (resume_from_checkpoint=False). Set resume_from_checkpoint=True to continue that run, "
        "overwrite_output_dir=True to delete its states and start clean, or choose another output_dir."
    )
    assert (tmp_path / "checkpoints" / "step_20").exists()  # nothing lost
    removed = check_fresh_output_dir(tmp_path, overwrite=True)
    assert removed == [tmp_path / "checkpoints", tmp_path / "config.yaml", tmp_path / "epoch_0"]
    assert not any(p.exists() for p in removed)
    assert check_fresh_output_dir(tmp_path, overwrite=False) == []


def test_resume_mismatches_name_the_dotted_key():
    saved = OmegaConf.create({"model": {"lora_rank": 8, "lora_alpha": 16}, "batch_size": 16, "seed": 1,
                              "dataset": {"max_seq_len": 128}, "optimizer": {"lr": 1e-3}})
    cur = OmegaConf.create({"model": {"lora_rank": 16, "lora_alpha": 16.0}, "batch_size": 16, "seed": 1,
                            "dataset": {"max_seq_len": 128, "packed": True}, "optimizer": {"lr": 5e-4}})
    assert resume_mismatches(saved, cur) == [
        "model.lora_rank=16 in the config but 8 in the saved run",
        "dataset.packed=True in the config but '<unset>' in the saved run",
    ]  # lora_alpha 16 == 16.0; the optimizer is not a resume key


def test_newest_intact_state_skips_a_truncated_file(tmp_path):
    states = []
    for step in (1, 2, 3):
        d = tmp_path / f"step_{step}"
        d.mkdir()
        torch.save({"w": torch.full((256,), float(step))}, d / "adapter.pt")
        states.append(d)
    data = (states[2] / "adapter.pt").read_bytes()
    (states[2] / "adapter.pt").write_bytes(data[: len(data) // 2])  # a torn write / bad disk
    load = lambda d: load_checkpoint_file(d / "adapter.pt")  # noqa: E731
    chosen, sd, skipped = load_newest_intact(states, load)
    assert chosen == states[1] and sd["w"][0].item() == 2.0
    assert len(skipped) == 1 and skipped[0].startswith(f"{states[2]}/adapter.pt: cannot be read (RuntimeError: ")
    for d in states[:2]:
        (d / "adapter.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="every complete resume state is corrupt") as e:
        load_newest_intact(states, load)
    assert str(e.value).count("cannot be read") == 3


# ---------------------------------------------------------------------------------------------- the interface
CFG = OmegaConf.create({"model": {"lora_rank": 8}, "seed": 1, "batch_size": 4, "optimizer": {"lr": 1e-3}})


def _save(out, step, cfg=CFG, **kw):
    """A resume state of ``step``: one tensor (full of ``step``) and the recipe's counters."""

    def write(d):
        torch.save({"w": torch.full((64,), float(step))}, d / "weights.pt")
        torch.save({"global_step": step, "seed": 1}, d / "recipe_state.pt")

    return write_state(out, step, cfg, write, **kw)


def _read(d):
    return (load_checkpoint_file(d / "weights.pt"),
            load_checkpoint_file(d / "recipe_state.pt"))


def test_write_then_read_round_trip(tmp_path):
    assert start_fresh_run(tmp_path, CFG, overwrite=False) == []
    assert OmegaConf.load(tmp_path / CONFIG_FILE) == CFG
    final = _save(tmp_path, 3)
    assert final == state_root(tmp_path) / "step_3"
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE, CONFIG_FILE, "recipe_state.pt", "weights.pt"]
    assert (final / COMPLETE).read_text() == "step 3\n"
    assert OmegaConf.load(final / CONFIG_FILE) == CFG  # what a resume is compared with
    _save(tmp_path, 5, note="step 5, 2 processes")
    assert (state_root(tmp_path) / "step_5" / COMPLETE).read_text() == "step 5, 2 processes\n"
    assert sorted(p.name for p in state_root(tmp_path).iterdir()) == ["step_3", "step_5"]  # no .tmp left
    restored = []
    d, (weights, state) = read_newest_state(tmp_path, CFG, _read, values={"seed": 1}, saved_values=lambda r: r[1],
                                            restore=lambda d, r: restored.append((d, r[1]["global_step"])))
    assert d == state_root(tmp_path) / "step_5" and restored == [(d, 5)]
    assert torch.equal(weights["w"], torch.full((64,), 5.0)) and state["global_step"] == 5
    # keep_last: only the newest complete states stay
    _save(tmp_path, 7, keep_last=2)
    assert [p.name for p in complete_states(state_root(tmp_path))] == ["step_5", "step_7"]
    with pytest.raises(ExistingRunError):  # and a fresh run now refuses the folder
        start_fresh_run(tmp_path, CFG, overwrite=False)


def test_no_complete_state_is_a_clear_error(tmp_path):
    (state_root(tmp_path) / "step_4.tmp").mkdir(parents=True)  # a save killed before its rename
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        read_newest_state(tmp_path, CFG, _read)


def test_a_write_error_names_the_folder_and_keeps_the_last_state(tmp_path):
    _save(tmp_path, 2)

    def full_disk(d):
        (d / "half.pt").write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    with pytest.raises(OSError) as e:
        write_state(tmp_path, 4, CFG, full_disk)
    tmp = state_root(tmp_path) / "step_4.tmp"
    assert str(e.value).startswith(
        f"could not write the resume state {tmp}: RuntimeError: [enforce fail at inline_container.cc:672] . unexpected "
        "pos 576 vs 534 (torch.save could not write the file: is the disk full?). The last complete resume state, "
        f"{state_root(tmp_path)}/step_2, is intact"
    )
    assert isinstance(e.value.__cause__, RuntimeError)
    assert not tmp.exists() and complete_states(state_root(tmp_path)) == [state_root(tmp_path) / "step_2"]

    def bug(d):
        raise KeyError("a bug, not a write error")

    with pytest.raises(KeyError):  # propagates as it is, not reported as a full disk
        write_state(tmp_path, 6, CFG, bug)


def test_read_falls_back_past_corrupt_newer_states(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    root = state_root(tmp_path)
    f = root / "step_4" / "weights.pt"
    f.write_bytes(f.read_bytes()[:100])  # a torn write / bad disk
    (root / "step_3" / CONFIG_FILE).write_text("model: {lora_rank: [")  # garbled YAML: damage as well

    def restore(d, result):  # what restore finds damaged (here: DCP's shards) is skipped too
        from torch.distributed.checkpoint.api import CheckpointException

        if d.name == "step_2":
            raise CheckpointException("failed", {0: (OSError(5, "Input/output error"), None)})

    with caplog.at_level(logging.WARNING, logger="prefopt.resume"):
        d, (weights, state) = read_newest_state(tmp_path, CFG, _read, restore=restore)
    assert d == root / "step_1" and state["global_step"] == 1 and weights["w"][0].item() == 1.0
    assert f"resume state {root}/step_4 is corrupt ({f}: cannot be read (" in caplog.text
    assert f"resume state {root}/step_3 is corrupt ({root}/step_3: " in caplog.text
    assert (f"resume state {root}/step_2 is corrupt ({root}/step_2: the sharded state (*.distcp) cannot be read "
            "(rank 0: OSError: [Errno 5] Input/output error))") in caplog.text
    assert f"resuming from {d}, the newest intact resume state; skipped: {f}: cannot be read" in caplog.text
    # nothing readable at all: every state named
    for step in (1, 2, 3):
        (root / f"step_{step}" / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="every complete resume state is corrupt") as e:
        read_newest_state(tmp_path, CFG, _read)
    assert str(e.value).count("cannot be read") == 4


def test_a_mismatched_resume_names_each_key_once(tmp_path, caplog):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    d = state_root(tmp_path) / "step_2"
    changed = OmegaConf.merge(CFG, {"model": {"lora_rank": 16}, "seed": 5, "optimizer": {"lr": 1.0}})
    with pytest.raises(ResumeMismatchError) as e:  # the newest state decides: an older one would not fix it
        read_newest_state(tmp_path, changed, _read, values={"seed": 5}, saved_values=lambda r: r[1])
    assert isinstance(e.value, ValueError)
    assert str(e.value) == (
        f"resume: the config differs from the saved run's ({d / CONFIG_FILE}) in what a resume must keep: "
        "model.lora_rank=16 in the config but 8 in the saved run; seed=5 in the config but 1 in the saved run. "
        "Use the saved values, or start a fresh run in another output_dir."
    )  # seed named once (config and value); the optimizer is not a resume key
    # a value the config does not fix (a seed drawn at random); a state without config.yaml names its folder
    (d / CONFIG_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="prefopt.resume"):
        with pytest.raises(ResumeMismatchError) as e:
            read_newest_state(tmp_path, CFG, _read, values={"seed": 9}, saved_values=lambda r: r[1])
    assert str(e.value) == (
        f"resume: the config differs from the saved run's ({d}) in what a resume must keep: seed=9 in the config "
        "but 1 in the saved run. Use the saved values, or start a fresh run in another output_dir."
    )
    assert f"{d} has no config.yaml (an older run): the config is not compared with it, only the saved seed" in caplog.text


def test_distributed_write_and_read_in_a_one_process_group(tmp_path):
    """distributed=True runs the collective path (gathered errors, rank 0's list, barriers)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _save(tmp_path, 1, distributed=True)
        d, (_, state) = read_newest_state(tmp_path, CFG, _read, distributed=True)
        assert d == state_root(tmp_path) / "step_1" and state["global_step"] == 1

        def full_disk(d):
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match=r"step_2.tmp: rank 0: OSError: \[Errno 28\] No space left on device\. "
                                          "The last complete resume state, .*/step_1, is intact"):
            write_state(tmp_path, 2, CFG, full_disk, distributed=True)
        assert not (state_root(tmp_path) / "step_2.tmp").exists()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- in the recipes
LORA = load_recipe("simpo_lora_single_device")
FULL = load_recipe("simpo_full_distributed")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "train48.jsonl"
    d.write_text("\n".join((TINY / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    return d


def _recipe_cfg(name, out, data, *overrides):
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    base = [f"output_dir={out}", f"dataset.data_files={data}", "eval_dataset=null", "eval_every_n_steps=null",
            "max_steps_per_epoch=1"]
    return OmegaConf.merge(OmegaConf.load(REPO / f"configs/tiny/{name}.yaml"), OmegaConf.from_dotlist(base + list(overrides)))


def test_both_recipes_word_a_mismatched_resume_the_same(tmp_path, small_data):
    """One step and its resume state, then a resume with another seed: the same text from both."""
    import torch.distributed as dist

    def mismatch_text(mod, cls, name, out, *args):
        """Train one step into `out`, then resume with another seed: the error's text."""
        cfg = _recipe_cfg(name, out, small_data, *args)
        r = getattr(mod, cls)(cfg)
        r.setup(cfg)
        r.train()
        r.cleanup()
        cfg = _recipe_cfg(name, out, small_data, *args, "resume_from_checkpoint=True", "seed=7")
        r = getattr(mod, cls)(cfg)
        with pytest.raises(ResumeMismatchError) as e:
            r.setup(cfg)
        r._lock.close()
        return str(e.value).replace(str(out), "<output_dir>")

    texts = {"lora": mismatch_text(LORA, "SimPORecipeSingleDevice", "simpo_lora", tmp_path / "lora", "batch_size=4",
                                   "save_adapter_weights_only=True")}
    try:
        texts["full"] = mismatch_text(FULL, "SimPORecipeDistributed", "simpo_full", tmp_path / "full", "batch_size=8")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert texts["lora"] == texts["full"] == (
        "resume: the config differs from the saved run's (<output_dir>/checkpoints/step_1/config.yaml) in what a "
        "resume must keep: seed=7 in the config but 1234 in the saved run. Use the saved values, or start a fresh "
        "run in another output_dir."
    )


def test_input_states_and_changes(tmp_path):
    from prefopt.resume_check import checkpoint_files_state, code_state, input_changes

    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"x" * 10)
    block = {"checkpoint_dir": str(tmp_path),
             "checkpoint_files": {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00002"}}
    state = checkpoint_files_state(block)
    assert sorted(state) == [str(tmp_path / "model-00001-of-00002.safetensors"), str(tmp_path / "model-00002-of-00002.safetensors")]
    assert all(v[0] == 10 for v in state.values())
    assert checkpoint_files_state({"checkpoint_dir": str(tmp_path), "checkpoint_files": ["gone.bin"]}) == {
        str(tmp_path / "gone.bin"): None}
    assert checkpoint_files_state({}) == {}
    assert code_state("prefopt.reward.example_rule_reward") == code_state("prefopt.reward.topic_rule_reward") != None  # noqa: E711
    assert code_state("no_such_module_here.f") is None

    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"y" * 11)
    now = {"checkpointer": checkpoint_files_state(block), "reward": "abc"}
    assert input_changes({"checkpointer": state, "reward": "abc"}, now) == [
        f"checkpointer: {tmp_path / 'model-00002-of-00002.safetensors'} changed (size or modification time) since the "
        "progress was written"]
    assert input_changes({"reward": "abd"}, now) == ["reward: its code changed since the progress was written"]
    assert input_changes({}, now) == [] and input_changes({"checkpointer": state}, {}) == []
