"""Start-up errors of both recipes, in-process: each must stop before any model is built, with a
message that names the cause (the recipe classes are constructed directly, no `tune run`)."""


import pytest
import torch
from conftest import REPO, load_recipe
from omegaconf import OmegaConf

from prefopt.config import ConfigError

LORA = load_recipe("simpo_lora_single_device")


def _cfg(*overrides):
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    base = OmegaConf.load(REPO / "configs/tiny/simpo_lora.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist(["eval_dataset=null", "eval_every_n_steps=null", *overrides]))


def test_unknown_and_bad_keys_in_one_error_before_building(tmp_path):
    with pytest.raises(ConfigError) as e:
        LORA.SimPORecipeSingleDevice(_cfg(f"output_dir={tmp_path}/o", "clip_grad_nrom=1.0", "batch_size=0", "loss.betta=3"))
    msg = str(e.value)
    assert msg.startswith("3 problem(s) in the config")
    assert "clip_grad_nrom: unknown config key (did you mean 'clip_grad_norm'?)" in msg
    assert "batch_size: must be >= 1, got 0" in msg
    assert "loss.betta: not an argument of prefopt.loss.SimPOLoss (did you mean 'beta'?)" in msg
    assert not (tmp_path / "o").exists()  # nothing written, nothing built


def test_unwritable_output_dir_reported_before_building(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"output_dir='{blocker}/run' is not writable"):
        LORA.SimPORecipeSingleDevice(_cfg(f"output_dir={blocker}/run"))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = _cfg(f"output_dir={tmp_path}/none", "resume_from_checkpoint=True")
    recipe = LORA.SimPORecipeSingleDevice(cfg)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        recipe.setup(cfg)
    recipe.cleanup()


def test_qlora_periodic_save_does_not_dequantize_the_base(tmp_path, monkeypatch):
    """A mid-epoch resume state of a QLoRA run is built from the adapter parameters: the model's
    state_dict() (which dequantizes every NF4 weight: ~15 GB copied for 8B) is never called."""
    cfg = _cfg(f"output_dir={tmp_path}/q", "model.quantize_base=True", "max_steps_per_epoch=2",
               "save_every_n_steps=1", "save_adapter_weights_only=True", "batch_size=4")
    recipe = LORA.SimPORecipeSingleDevice(cfg)
    recipe.setup(cfg)

    def no_state_dict(*a, **k):
        raise AssertionError("state_dict() of the NF4 model was called")

    monkeypatch.setattr(recipe._model, "state_dict", no_state_dict)
    recipe.train()
    recipe.cleanup()
    state = torch.load(tmp_path / "q" / "checkpoints" / "step_1" / "adapter.pt", weights_only=True)
    assert state and all("lora" in k for k in state) and all(v.dtype == torch.float32 for v in state.values())


def test_bad_rows_in_training_data_error_mode_names_file_row_field(tmp_path):
    import json

    from prefopt.data import BadExample

    rows = [json.loads(line) for line in (REPO / "prefopt/assets/tiny/train.jsonl").read_text().splitlines()[:40]]
    rows[17]["rejected"][1]["content"] = ""
    data = tmp_path / "broken.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(f"output_dir={tmp_path}/o", f"dataset.data_files={data}", "dataset.on_bad_example=error")
    recipe = LORA.SimPORecipeSingleDevice(cfg)
    with pytest.raises(BadExample, match=f"{data}: row 17, field 'rejected': has no non-empty assistant message"):
        recipe.setup(cfg)
    recipe.cleanup()
    # default: the row is dropped and counted, the run sets up
    cfg = _cfg(f"output_dir={tmp_path}/d", f"dataset.data_files={data}", "batch_size=4")
    recipe = LORA.SimPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    assert dict(recipe._dataloader.dataset.dropped) == {"empty response": 1} and len(recipe._dataloader.dataset) == 39
    recipe.cleanup()
