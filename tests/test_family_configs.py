"""Every shipped real config runs (issue 24): the configs that are not their family and recipe
kind's export case in tests/test_family_matrix.py each run their start-up and one step with
their own recipe (named in their header's ``tune run`` line) and settings (loss and its
hyper-parameters, LoRA modules, rank, alpha, ...) on the tiny stand-in of their family
(tests/family_standins.py: the stand-in of the config's own checkpoint config.json, in its file
layout; Gemma 3 4B/27B a multimodal Gemma3ForConditionalGeneration), with only paths, dimensions,
device, dtype and steps overridden as in the matrix. The generation configs
(recipes/generate_preference_pairs.py) run two prompts of their own samples, seeds and sampling,
a few new tokens each, scored by a tiny one-output LlamaForSequenceClassification stand-in of the
reward model their ``reward`` block names. A config in neither list fails
``test_every_shipped_config_is_run``.
"""

import json
import math

import pytest
import torch
from conftest import REPO, read_log
from family_standins import frozen_heap  # noqa: F401  (a fixture)

# (config, recipe kind): start-up and one step (the export check of each family and recipe kind:
# test_family_matrix.CASES)
ONE_STEP = [
    ("llama3_1/8B_cpo_simpo_lora_single_device", "lora"),
    ("llama3_2/3B_simpo_full", "full"),
    ("llama3_2/3B_simpo_lora_single_device", "lora"),
    ("mistral/7B_orpo_lora_single_device", "lora"),
    ("qwen2_5/1.5B_simpo_lora_single_device", "lora"),
    ("qwen2_5/3B_simpo_lora_single_device", "lora"),
    ("qwen2_5/7B_simpo_lora_single_device", "lora"),
    ("qwen3/1.7B_simpo_lora_single_device", "lora"),
    ("qwen3/4B_simpo_lora_single_device", "lora"),
    ("qwen3/8B_simpo_lora_single_device", "lora"),
    ("qwen3/14B_simpo_full", "full"),
    ("qwen3/32B_simpo_full", "full"),
    ("gemma3/4B_simpo_lora_single_device", "lora"),
    ("gemma3/27B_simpo_full", "full"),
]
# recipes/generate_preference_pairs.py configs: two prompts, a few new tokens
GENERATE = ["llama3_1/8B_generate_pairs", "gemma2/9B_generate_pairs"]
pytestmark = pytest.mark.usefixtures("frozen_heap")
KIND_RECIPE = {"lora": "simpo_lora_single_device", "qlora": "simpo_lora_single_device", "full": "simpo_full_distributed"}


def _shipped():
    return sorted(f"{p.parent.name}/{p.stem}" for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "tiny")


def test_every_shipped_config_is_run():
    """Every configs/<family>/*.yaml (not tiny) is an export case, a one-step case or a generation
    case, with the recipe its header names; a config added later cannot be forgotten."""
    from family_standins import config_recipe
    from test_family_matrix import CASES

    listed = [*CASES, *ONE_STEP, *((g, "generate") for g in GENERATE)]
    names = [n for n, _ in listed]
    missing = [n for n in _shipped() if n not in names]
    assert not missing, f"shipped configs in neither tests/test_family_matrix.py CASES nor ONE_STEP / GENERATE here: {missing}"
    assert sorted(names) == _shipped(), "a listed config that is not shipped, or one listed twice"
    wrong = [(n, k, config_recipe(n)) for n, k in listed
             if config_recipe(n) != KIND_RECIPE.get(k, "generate_preference_pairs") or (k == "qlora") != ("qlora" in n)]
    assert not wrong, f"(config, kind listed, recipe its header runs): {wrong}"


def _local(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


@pytest.mark.slow
@pytest.mark.parametrize("name,kind", ONE_STEP, ids=[c[0] for c in ONE_STEP])
def test_config_starts_and_takes_one_step(tmp_path, name, kind):
    """Start-up (config checks, the model-vs-checkpoint check, weights, data) and one step of the
    config's recipe: the loss is the config's and finite, the step changed the trained weights
    (every LoRA B, or every weight of a full run), and the exported checkpoint holds every weight
    of the stand-in under its own name in the config's files, those not trained (Gemma 3's vision
    tower) unchanged."""
    import torch.distributed as dist
    from family_standins import case_config, checkpoint_tensors, config_recipe, recipe_class
    from omegaconf import OmegaConf

    cfg, hf = case_config(tmp_path, name, kind, steps=1)
    recipe = None
    try:
        recipe = recipe_class(config_recipe(name))(cfg)
        recipe.setup(cfg)
        trained = {n: _local(p).clone() for n, p in recipe._model.named_parameters() if p.requires_grad}
        recipe.train()
        after = {n: _local(p) for n, p in recipe._model.named_parameters() if n in trained}
        loss_fn = recipe._loss_fn
    finally:
        if recipe is not None:
            recipe.cleanup()
        if dist.is_initialized():
            dist.destroy_process_group()
    own = OmegaConf.load(REPO / "configs" / f"{name}.yaml").loss
    assert type(loss_fn).__name__ == own._component_.rsplit(".", 1)[-1], (type(loss_fn), own._component_)
    for k, v in own.items():
        if k != "_component_" and hasattr(loss_fn, k):
            assert getattr(loss_fn, k) == v, (k, getattr(loss_fn, k), v)
    log = read_log(tmp_path / "out")
    assert sorted(log) == [1], log
    assert math.isfinite(log[1]["loss"]), log
    changed = {n for n, b in trained.items() if not torch.equal(b, after[n])}
    expect = {n for n in trained if "lora_b" in n} if kind != "full" else set(trained)
    assert expect and expect <= changed, sorted(expect - changed)
    assert kind == "full" or all("lora_" in n or "magnitude" in n for n in trained), sorted(trained)
    # the export: the checkpoint's weights under their own names, in its files
    ckpt, epoch = cfg.checkpointer.checkpoint_dir, tmp_path / "out" / "epoch_0"
    original, saved = checkpoint_tensors(ckpt), checkpoint_tensors(epoch)
    assert set(saved) == set(original), set(saved) ^ set(original)
    untrained = [k for k in original if "vision_tower." in k or "multi_modal_projector." in k]
    assert bool(untrained) == name.startswith("gemma3/") and not name.startswith("gemma3/1B"), untrained
    for k in untrained:
        torch.testing.assert_close(saved[k], original[k], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATE)
def test_generate_config_writes_princeton_pairs(tmp_path, name):
    """The generation config with its own samples (5, its seeds), sampling (temperature, top_p),
    stop tokens and reward block, on two prompts and 4 new tokens: pairs.jsonl has a row per
    kept prompt in princeton format (the training recipe's ``dataset.format=princeton`` reads
    it), chosen the best of the 5 scores and rejected the worst."""
    from family_standins import config_recipe, generate_config, recipe_class
    from omegaconf import OmegaConf

    from prefopt.data.encoding import PairEncoder

    cfg = generate_config(tmp_path, name)
    recipe = recipe_class(config_recipe(name))(cfg)
    try:
        recipe.setup(cfg)
        summary = recipe.run()
    finally:
        recipe.cleanup()
    own = OmegaConf.load(REPO / "configs" / f"{name}.yaml")
    assert summary["prompts"] == 2 and summary["samples_per_prompt"] == own.num_samples, summary
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert rows and len(rows) == summary["pairs_kept"], summary
    enc = PairEncoder(tokenizer=None, format="princeton", column_map={c: c for c in ("prompt", "chosen", "rejected")},
                      new_system_prompt=None, max_seq_len=None, max_prompt_len=None, prompt_truncation="keep_end",
                      source_name="pairs.jsonl")
    for i, r in enumerate(rows):
        chosen, rejected = enc.conversations(i, r)  # raises BadExample on a row not in princeton format
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == "assistant"
        assert len(r["all_generated_responses"]) == len(r["all_rm_scores"]) == own.num_samples
        assert all(math.isfinite(s) for s in r["all_rm_scores"])
        assert r["score_chosen"] == max(r["all_rm_scores"]) > r["score_rejected"] == min(r["all_rm_scores"])
        assert r["generated_by"]["top_p"] == own.top_p and r["generated_by"]["temperature"] == own.temperature
