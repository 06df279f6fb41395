"""Tier 1: issue 25's resume classes, in both recipes (in-process, the tiny model): a resume state
whose unpickling would run code is refused; a resume on other data is refused, naming the file; an
export lost at an epoch end is written by the resume; ``seed: null`` resumes with the saved seed."""

import errno
import logging
import os
import pickle

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, TINY, load_recipe
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from prefopt.export import missing_export, write_export
from prefopt.resume import (
    ResumeMismatchError,
    complete_states,
    data_mismatches,
    load_checkpoint_file,
    state_root,
)

LORA = load_recipe("simpo_lora_single_device")
FULL = load_recipe("simpo_full_distributed")
RECIPES = {
    "lora": (LORA.SimPORecipeSingleDevice, "simpo_lora", ["batch_size=4", "save_adapter_weights_only=True"]),
    "full": (FULL.SimPORecipeDistributed, "simpo_full", ["batch_size=8"]),
}


class RunsCode:
    """Unpickled, it runs a shell command: what a crafted file planted in a run folder would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "train48.jsonl"
    d.write_text("\n".join((TINY / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    return d


def run(kind, out, data, *overrides, train=True, before_train=None):
    """The recipe in-process: build, set up (a resume reads its state and finishes a missing
    export there), optionally train; always cleaned up. Returns the recipe."""
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    cls, name, extra = RECIPES[kind]
    base = [f"output_dir={out}", f"dataset.data_files={data}", "eval_dataset=null", "eval_every_n_steps=null",
            "max_steps_per_epoch=1", *extra]
    cfg = OmegaConf.merge(OmegaConf.load(REPO / f"configs/tiny/{name}.yaml"), OmegaConf.from_dotlist(base + list(overrides)))
    r = cls(cfg)
    try:
        r.setup(cfg)
        if before_train is not None:
            before_train(r)
        if train:
            r.train()
    finally:
        try:
            r.cleanup()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return r


# ---------------------------------------------------------------------------------------------- code runs on resume
CRAFTED = [("lora", "recipe_state.pt"), ("lora", "adapter.pt"),
           ("full", "recipe_state.pt"), ("full", "rng_rank0.pt"), ("full", ".metadata")]


@pytest.mark.parametrize("kind,name", CRAFTED)
def test_a_state_file_that_would_run_code_is_refused(tmp_path, data, caplog, kind, name):
    """A crafted file in the newest state: refused unread (no command runs), named, and the resume
    falls back to the older state as for any damaged file."""
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    run(kind, out, data, "epochs=2")  # states step_1 and step_2 (each epoch's end)
    crafted = state_root(out) / "step_2" / name
    crafted.write_bytes(pickle.dumps({"global_step": 2, "x": RunsCode(marker)}) if name == ".metadata" else b"")
    if name != ".metadata":
        torch.save({"global_step": 2, "x": RunsCode(marker)}, crafted)
    with caplog.at_level(logging.WARNING, logger="prefopt.resume"):
        r = run(kind, out, data, "epochs=2", "resume_from_checkpoint=True", train=False)
    assert not marker.exists()
    assert r.global_step == 1  # step_2 refused, step_1 resumed from
    warning = next(m for m in caplog.messages if m.startswith(f"resume state {state_root(out)}/step_2 is corrupt"))
    assert f"{crafted}: refused: it names posix.system, which loading would call" in warning or (
        name == ".metadata" and f"{crafted}: refused: posix.system is not something torch.distributed.checkpoint saves"
        in warning
    ), warning


def test_load_checkpoint_file_refuses_code_and_names_garbage(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"step": 1, "x": RunsCode(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(RuntimeError) as e:
        load_checkpoint_file(tmp_path / "crafted.pt")
    assert str(e.value) == (
        f"{tmp_path}/crafted.pt: refused: it names posix.system, which loading would call; a resume state holds "
        "tensors and plain values only and is read with weights_only=True"
    )
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"garbage.pt: cannot be read \(UnpicklingError: Unsupported operand"):
        load_checkpoint_file(tmp_path / "garbage.pt")


# ---------------------------------------------------------------------------------------------- other data
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_resume_on_data_with_rows_appended_is_refused(tmp_path, data, kind):
    out = tmp_path / "run"
    run(kind, out, data)
    saved = load_checkpoint_file(state_root(out) / "step_1" / "recipe_state.pt")["data"]  # plain values
    source = saved["dataset"]["source"]
    assert str(data) in source and saved["dataset"]["rows"] == 48 and saved["eval_dataset"] is None
    with open(data, "a") as f:  # 4 more pairs: the shuffled order of every epoch changes
        f.write("\n".join((TINY / "train.jsonl").read_text().splitlines()[48:52]) + "\n")
    with pytest.raises(ResumeMismatchError) as e:
        run(kind, out, data, "resume_from_checkpoint=True", train=False)
    assert str(e.value) == (
        f"resume: the data differs from the saved run's ({state_root(out)}/step_1) in what a resume must keep: "
        f"dataset: {source} has 52 rows but had 48 when the run was saved. Use the data the saved run trained on, "
        "or start a fresh run in another output_dir."
    )


def test_data_mismatches_name_what_changed():
    a = {"source": "json:/d/a.jsonl", "key": "k1", "rows": 48}
    assert data_mismatches({"dataset": a, "eval_dataset": None}, {"dataset": a, "eval_dataset": dict(a)}) == []
    assert data_mismatches({"dataset": a}, {"dataset": {**a, "key": "k2"}}) == [
        "dataset: json:/d/a.jsonl has the same 48 rows but was changed or replaced since the run was saved "
        "(tokenized data k2, the saved run's k1)"
    ]
    assert data_mismatches({"dataset": [a, a]}, {"dataset": [a, {**a, "source": "json:/d/b.jsonl"}]}) == [
        "dataset reads json:/d/b.jsonl but the saved run read json:/d/a.jsonl"
    ]
    assert data_mismatches({"dataset": a}, {"dataset": {**a, "key": None}}) == []  # not cached now: rows only


# ---------------------------------------------------------------------------------------------- a lost export
def _fail_midway(r):
    """The checkpointer's save writes part of the export, then finds the disk full."""

    def save(state_dict, epoch, **kwargs):
        d = r._checkpointer._output_dir / f"epoch_{epoch}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    r._checkpointer.save_checkpoint = save


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_an_export_lost_to_a_full_disk_is_written_by_the_resume(tmp_path, data, kind):
    ref, out = tmp_path / "ref", tmp_path / "run"
    merged = ("save_adapter_weights_only=False",) if kind == "lora" else ()  # the merged model, adapter/ beside it
    run(kind, ref, data, *merged)
    with pytest.raises(OSError) as e:
        run(kind, out, data, *merged, before_train=_fail_midway)
    msg = str(e.value)
    assert msg.startswith(f"could not write the export of epoch 0 to {out}/epoch_0: OSError: [Errno 28] No space left "
                          "on device. It needs about "), msg
    assert msg.endswith(f"The resume state {state_root(out)}/step_1 is intact: make room and rerun with "
                        "resume_from_checkpoint=True, which writes the export before going on."), msg
    assert f" free in {out}). " in msg
    assert not (out / "epoch_0").exists() and not (out / "epoch_0.tmp").exists()  # no half export that looks done
    assert [p.name for p in complete_states(state_root(out))] == ["step_1"]
    r = run(kind, out, data, *merged, "resume_from_checkpoint=True")
    assert r.global_step == 1  # nothing trained again: only the export written
    files = sorted(str(p.relative_to(out)) for p in (out / "epoch_0").rglob("*.safetensors"))
    assert files == sorted(str(p.relative_to(ref)) for p in (ref / "epoch_0").rglob("*.safetensors"))
    assert "epoch_0/model-00001-of-00001.safetensors" in files and not (out / "epoch_0.tmp").exists()
    if kind == "lora":
        assert "epoch_0/adapter/adapter_model.safetensors" in files
    for f in (out / "epoch_0").rglob("*.safetensors"):
        want = load_file(ref / "epoch_0" / f.relative_to(out / "epoch_0"))
        got = load_file(f)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_write_export_names_a_safetensors_error_and_cleans_up(tmp_path):
    def write(root):
        (root / "epoch_3").mkdir()
        (root / "epoch_3" / "part").write_bytes(b"x" * 10)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    with pytest.raises(OSError, match=rf"^could not write the export of epoch 3 to {tmp_path}/epoch_3: safetensors "
                                      r"could not write a file: No space left on device\. It needs about 2,048 bytes "
                                      r"\(2\.0 KiB\) \(.* free in .*\)\. Make room and rerun\.$"):
        write_export(tmp_path, 3, write, nbytes=2048)
    assert list(tmp_path.iterdir()) == []
    assert missing_export(tmp_path, 4, 0) == 3 and missing_export(tmp_path, 4, 2) is None  # mid-epoch 4: not its job
    write_export(tmp_path, 3, lambda root: (root / "epoch_3").mkdir(), nbytes=0)
    assert missing_export(tmp_path, 4, 0) is None and [p.name for p in tmp_path.iterdir()] == ["epoch_3"]


# ---------------------------------------------------------------------------------------------- seed: null
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_seed_null_resumes_with_the_saved_seed(tmp_path, data, caplog, kind):
    out = tmp_path / "run"
    run(kind, out, data, "seed=null")
    saved = load_checkpoint_file(state_root(out) / "step_1" / "recipe_state.pt")["seed"]
    sampler_seed = []
    with caplog.at_level(logging.INFO):
        r = run(kind, out, data, "seed=null", "resume_from_checkpoint=True", train=False,
                before_train=lambda r: sampler_seed.append(r._sampler.seed))
    assert r.seed == saved and sampler_seed == [saved]  # the saved run's data order
    assert f"seed: null in the config: the saved run's seed {saved} is used ({state_root(out)}/step_1)" in caplog.text
