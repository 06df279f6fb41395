"""Tier 2: recipes/simpo_lora_single_device.py end to end through `tune run`, from the repo root."""

import shutil

import pytest
import torch
from conftest import REPO, TINY, read_log, tune_run
from torch.testing import assert_close

RECIPE = "recipes/simpo_lora_single_device.py"
CONFIG = "configs/tiny/simpo_lora.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    proc = tune_run(RECIPE, CONFIG, f"output_dir={out}")
    return out, proc


def test_default_run_learns_the_preference(default_run):
    out, proc = default_run
    log = read_log(out)
    evals = {s: m for s, m in log.items() if "eval/rewards/accuracies" in m}
    first, last = evals[min(evals)], evals[max(evals)]
    assert min(evals) == 0
    # step 0: the model cannot tell chosen from rejected; the end: it does, on held-out pairs
    assert 0.3 <= first["eval/rewards/accuracies"] <= 0.7
    assert last["eval/rewards/accuracies"] >= 0.9
    assert last["eval/loss"] < first["eval/loss"] - 0.2
    assert last["eval/rewards/margins"] > first["eval/rewards/margins"]
    train = [log[s]["loss"] for s in sorted(log) if "loss" in log[s]]
    k = max(3, len(train) // 5)
    assert sum(train[-k:]) / k < sum(train[:k]) / k  # training loss goes down
    assert "held-out rewards/accuracies" in proc.stdout + proc.stderr


def test_default_run_writes_hf_checkpoint_and_resume_states(default_run):
    out, _ = default_run
    epoch = out / "epoch_0"
    assert (epoch / "model-00001-of-00001.safetensors").exists()
    assert (epoch / "adapter" / "adapter_model.safetensors").exists() and (epoch / "adapter" / "adapter_config.json").exists()
    assert not (epoch / "adapter_config.json").exists()  # a plain HF model folder
    assert (epoch / "config.json").exists()
    states = sorted((out / "checkpoints").iterdir())
    assert states and all((p / "COMPLETE").exists() for p in states)


def test_merged_checkpoint_loads_in_transformers_with_our_logits(default_run):
    transformers = pytest.importorskip("transformers")
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.training import FullModelHFCheckpointer

    out, _ = default_run
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "epoch_0", torch_dtype=torch.float32).eval()
    # our model: base weights + the trained adapter from the last resume state
    cfg = OmegaConf.load(REPO / CONFIG)
    model = tt_config.instantiate(cfg.model).eval()
    base = FullModelHFCheckpointer(
        checkpoint_dir=str(TINY / "model"), checkpoint_files=["model.safetensors"], model_type="LLAMA2", output_dir=str(out / "x")
    ).load_checkpoint()["model"]
    model.load_state_dict(base, strict=False)
    last = max((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    adapter = torch.load(last / "adapter.pt", weights_only=True)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_b" in k)  # it trained
    model.load_state_dict(adapter, strict=False)
    ids = torch.randint(3, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


COMMON12 = ["max_steps_per_epoch=12", "save_every_n_steps=5", "eval_every_n_steps=null", "eval_dataset=null"]


@pytest.fixture(scope="module")
def run12(tmp_path_factory):
    """12 steps, packed (the default layout), resume states at 5 and 10."""
    out = tmp_path_factory.mktemp("run12")
    tune_run(RECIPE, CONFIG, f"output_dir={out}", *COMMON12)
    return out


def test_packed_and_padded_layouts_log_the_same_losses(run12, tmp_path):
    padded = tmp_path / "padded"
    proc = tune_run(RECIPE, CONFIG, f"output_dir={padded}", *COMMON12, "packed=False")
    a, b = read_log(run12), read_log(padded)
    steps = [s for s in a if "loss" in a[s]]
    assert steps == list(range(1, 13)) and [s for s in b if "loss" in b[s]] == steps
    for key in ("loss", "rewards/margins", "logps/chosen", "logits/rejected"):
        diff = max(abs(a[s][key] - b[s][key]) for s in steps)
        assert diff <= 1e-5, (key, diff)
    assert "packed=True: falling back" not in proc.stdout + proc.stderr


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(run12, tmp_path):
    full = run12
    common = COMMON12
    # the "killed" run: everything after the step-5 checkpoint is gone
    cut = tmp_path / "cut"
    shutil.copytree(full / "checkpoints" / "step_5", cut / "checkpoints" / "step_5")
    tune_run(RECIPE, CONFIG, f"output_dir={cut}", *common, "resume_from_checkpoint=True")
    a, b = read_log(full), read_log(cut)
    assert sorted(b) == list(range(6, 13))
    for s in range(6, 13):
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5, (s, a[s]["loss"], b[s]["loss"])
    wa = torch.load(full / "checkpoints" / "step_12" / "adapter.pt", weights_only=True)
    wb = torch.load(cut / "checkpoints" / "step_12" / "adapter.pt", weights_only=True)
    for k in wa:
        assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-5)


def test_qlora_learns_and_its_export_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "qlora"
    tune_run(RECIPE, CONFIG, f"output_dir={out}", "model.quantize_base=True", "max_steps_per_epoch=12",
             "eval_every_n_steps=null", "save_every_n_steps=null")
    log = read_log(out)
    assert [s for s in log if "loss" in log[s]] == list(range(1, 13))
    evals = {s: m["eval/rewards/accuracies"] for s, m in log.items() if "eval/rewards/accuracies" in m}
    assert sorted(evals) == [0, 12] and evals[12] >= evals[0] + 0.1, evals  # it learns
    # the export (NF4 base dequantized, adapter merged) loads as a plain HF model, and gives the
    # logits of the trained QLoRA model (NF4 weights dequantize to exactly these values)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "epoch_0", torch_dtype=torch.float32).eval()
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.training import FullModelHFCheckpointer

    cfg = OmegaConf.load(REPO / CONFIG)
    cfg.model.quantize_base = True
    model = tt_config.instantiate(cfg.model).eval()
    base = FullModelHFCheckpointer(
        checkpoint_dir=str(TINY / "model"), checkpoint_files=["model.safetensors"], model_type="LLAMA2", output_dir=str(out / "x")
    ).load_checkpoint()["model"]
    model.load_state_dict(base, strict=False)
    model.load_state_dict(torch.load(out / "checkpoints" / "step_12" / "adapter.pt", weights_only=True), strict=False)
    ids = torch.randint(3, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(hf(ids).logits, model(ids), atol=1e-3, rtol=1e-3)


def test_activation_checkpointing_and_compile_give_the_eager_losses(run12, tmp_path):
    """AC + torch.compile vs the eager run12 (packed) on the same first step: the loss checks the
    compiled forward, the gradient norm (logged on every step) the compiled backward. One step,
    the padded layout: every new shape recompiles on CPU (~1 min each)."""
    out = tmp_path / "ac_compile"
    tune_run(RECIPE, CONFIG, f"output_dir={out}", "enable_activation_checkpointing=True", "compile=True",
             "packed=False", "max_steps_per_epoch=1", "eval_dataset=null", "eval_every_n_steps=null",
             "save_every_n_steps=null", "save_adapter_weights_only=True")
    a, b = read_log(run12), read_log(out)
    assert [s for s in b if "loss" in b[s]] == [1]
    # compiled kernels round differently; the same within 1e-5
    for key, tol in (("loss", 1e-5), ("grad_norm", 1e-5), ("rewards/margins", 1e-4), ("logps/chosen", 1e-5)):
        assert abs(a[1][key] - b[1][key]) <= tol * max(1.0, abs(a[1][key])), (key, a[1][key], b[1][key])


def test_cli_overrides_take_effect(tmp_path):
    out = tmp_path / "override"
    tune_run(RECIPE, CONFIG, f"output_dir={out}", "loss.beta=5.0", "batch_size=4", "max_steps_per_epoch=2",
             "eval_dataset=null", "eval_every_n_steps=null", "save_every_n_steps=null")
    m = read_log(out)[1]
    assert m["rewards/chosen"] == pytest.approx(5.0 * m["logps/chosen"], rel=1e-6)
    assert m["rewards/rejected"] == pytest.approx(5.0 * m["logps/rejected"], rel=1e-6)



@pytest.mark.parametrize("name, metrics", [
    ("cpo_simpo", ["nll_loss"]), ("alphapo", []), ("cpo", ["nll_loss"]), ("ipo", ["nll_loss"]),
    ("orpo", ["nll_loss", "log_odds_ratio", "log_odds_chosen"]),
])
def test_each_loss_of_the_family_learns_through_tune_run(name, metrics, tmp_path):
    """A short run of each shipped tiny config (12 of the default's 40 steps): the held-out reward
    accuracy rises, and the loss's own metrics are logged under TRL's names."""
    out = tmp_path / name
    tune_run(RECIPE, f"configs/tiny/{name}_lora.yaml", f"output_dir={out}", "max_steps_per_epoch=12",
             "save_every_n_steps=null", "eval_every_n_steps=null")
    log = read_log(out)
    evals = {s: m["eval/rewards/accuracies"] for s, m in log.items() if "eval/rewards/accuracies" in m}
    assert sorted(evals) == [0, 12]
    assert evals[12] >= evals[0] + 0.1, evals
    for key in metrics:
        assert all(key in log[s] for s in range(1, 13)), key
