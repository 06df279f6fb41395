"""Proven per family (issue 24): each shipped family's real config, run by its own recipe on a tiny
seeded transformers stand-in of the family, trains the model transformers builds and exports the
model it trained.

Stand-ins, data and overrides: tests/family_standins.py (the config's own hub config.json fields
with tiny dimensions, saved in its checkpoint file layout; a tokenizer of the family's kind; 32
rows of its hub data set's schema; only paths, dimensions, device cpu, dtype fp32 and 2 steps of
batch 2 at lr 1e-3 with no warm-up overridden). One case per family and recipe kind (LoRA, QLoRA,
full): Gemma 3's full case is 12B, a multimodal checkpoint (Gemma3ForConditionalGeneration: a tiny
vision tower beside the language model, in the hub files' key layout). Every other shipped config
runs its start-up and one step in tests/test_family_configs.py, which also fails on a config in
neither list. Checked: our logits equal transformers' to 1e-5 before training; after training,
the exported folder loaded with AutoModelForCausalLM (Gemma 3 12B: Gemma3ForConditionalGeneration)
and, for LoRA, the adapter merged by hand into the stand-in's weights as PEFT merges it, give the
trained model's log-probs to 1e-4; the export holds every weight of the checkpoint under its own
name, those the recipe does not train (Gemma 3's vision tower) unchanged.
"""

import copy

import pytest
import torch
from conftest import apply_peft_adapter, next_token_logps, peft_merged
from family_standins import case_config, checkpoint_tensors, config_recipe, frozen_heap, recipe_class  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("frozen_heap")]
transformers = pytest.importorskip("transformers")

# (config, recipe kind): one export check per family and recipe kind
CASES = [
    ("llama3_2/1B_simpo_lora_single_device", "lora"),
    ("llama3_2/1B_simpo_full", "full"),
    ("llama3_1/8B_simpo_lora_single_device", "lora"),
    ("llama3_1/8B_simpo_qlora_single_device", "qlora"),
    ("llama3_1/8B_simpo_full", "full"),
    ("qwen2_5/0.5B_simpo_lora_single_device", "lora"),
    ("qwen2_5/7B_simpo_full", "full"),
    ("mistral/7B_simpo_lora_single_device", "lora"),
    ("gemma2/9B_simpo_lora_single_device", "lora"),
    ("gemma2/9B_simpo_full", "full"),
    ("gemma3/1B_simpo_lora_single_device", "lora"),
    ("gemma3/12B_simpo_full", "full"),
    ("qwen3/0.6B_simpo_lora_single_device", "lora"),
    ("qwen3/8B_simpo_qlora_single_device", "qlora"),
    ("qwen3/8B_simpo_full", "full"),
]
# weights of a checkpoint that no recipe trains (Gemma 3 4B+'s vision tower and projector)
UNTRAINED = ("vision_tower.", "multi_modal_projector.")


@pytest.mark.parametrize("name,kind", CASES, ids=[c[0] for c in CASES])
def test_family_config_trains_the_transformers_model_and_exports_it(tmp_path, name, kind):
    import torch.distributed as dist

    cfg, hf = case_config(tmp_path, name, kind)
    vocab = hf.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, min(vocab, 256), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    recipe = None
    try:
        recipe = recipe_class(config_recipe(name))(cfg)
        recipe.setup(cfg)
        with torch.no_grad():
            before = (recipe._model.eval()(tokens) - ref).abs().max().item()
        recipe._model.train()
        recipe.train()
        with torch.no_grad():
            trained = next_token_logps(recipe._model.eval()(tokens), tokens)
    finally:
        if recipe is not None:
            recipe.cleanup()
        if dist.is_initialized():
            dist.destroy_process_group()
    epoch = tmp_path / "out" / "epoch_0"
    with torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(epoch, dtype=torch.float32).eval()
        assert type(exported) is type(hf), (type(exported), type(hf))
        diffs = {"logits before training": before,
                 "export": (next_token_logps(exported(tokens).logits, tokens) - trained).abs().max().item()}
        moved = (next_token_logps(ref, tokens) - trained).abs().max().item()
        if kind == "lora":  # QLoRA's base is the NF4-rounded stand-in: the merged folder is its check
            with_peft = peft_merged(copy.deepcopy(hf), epoch / "adapter").eval()
            diffs["adapter with PEFT"] = (next_token_logps(with_peft(tokens).logits, tokens) - trained).abs().max().item()
            hf.load_state_dict(apply_peft_adapter(hf.state_dict(), epoch / "adapter"))
            diffs["adapter by hand"] = (next_token_logps(hf(tokens).logits, tokens) - trained).abs().max().item()
    print(f"{name}: trained moved log-probs by {moved:.2e}; " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert moved > 1e-3, moved  # training changed the model: the export check means something
    # QLoRA computes with NF4-rounded weights: its family's LoRA case checks the logits
    assert kind == "qlora" or diffs["logits before training"] < 1e-5, diffs
    assert all(v < 1e-4 for k, v in diffs.items() if k != "logits before training"), diffs
    # the export is the whole checkpoint, each weight under its own name; the untrained ones as they were
    original, saved = checkpoint_tensors(cfg.checkpointer.checkpoint_dir), checkpoint_tensors(epoch)
    assert set(saved) == set(original), set(saved) ^ set(original)
    untrained = [k for k in original if any(p in k for p in UNTRAINED)]
    assert bool(untrained) == (type(hf).__name__ == "Gemma3ForConditionalGeneration"), untrained
    for k in untrained:
        torch.testing.assert_close(saved[k], original[k], atol=0, rtol=0)
