"""What an epoch export holds is the model that was trained (issue 24 items 3 and 4): the adapter
merged by hand into the Hugging Face base weights as PEFT merges it, and the merged model loaded
with transformers, give the trained model's log-probs. The ``peer`` tests need transformers."""

import json

import pytest
import torch
from conftest import REPO, TINY, apply_peft_adapter, load_recipe, next_token_logps, peft_merged
from omegaconf import OmegaConf

TINY_QWEN2 = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=96,
                  max_seq_len=64, norm_eps=1e-6, rope_base=1e6)


def _qwen2_standin(path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers zeroes the q/k/v biases: a lost bias would not show
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def _train_lora(model, tokens, steps=2, lr=0.05):
    """A few AdamW steps on the LoRA weights at a large lr: every A and B moves well away from its init."""
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    params = get_adapter_params(model)
    set_trainable_params(model, params)
    opt = torch.optim.AdamW(params.values(), lr=lr)
    for _ in range(steps):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: p.detach().clone() for k, p in params.items()}


@pytest.mark.peer
def test_qwen2_adapter_export_applied_by_hand_gives_the_trained_logps(tmp_path):
    """Item 3: the Qwen 2.5 configs' checkpointer saves the adapter unpermuted, so the adapter
    applied to the base checkpoint (W + B A alpha/r) is the trained model; torchtune's
    FullModelHFCheckpointer (what the configs used) permutes q/k lora_B as for Llama and is not."""
    from safetensors.torch import load_file
    from torchtune import training
    from torchtune.models.qwen2 import lora_qwen2
    from torchtune.modules.peft import get_lora_module_names, get_merged_lora_ckpt
    from transformers import AutoModelForCausalLM

    from prefopt.models.checkpointer import HFCheckpointer

    for path in sorted((REPO / "configs/qwen2_5").glob("*.yaml")):
        assert OmegaConf.load(path).checkpointer._component_ == "prefopt.models.checkpointer.HFCheckpointer", path

    _qwen2_standin(tmp_path / "ckpt")
    base = load_file(tmp_path / "ckpt" / "model.safetensors")
    model = lora_qwen2(["q_proj", "k_proj", "v_proj", "output_proj"], True, True, **TINY_QWEN2,
                       lora_rank=4, lora_alpha=8)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))

    def checkpointer(cls, out):  # loaded: a checkpointer saves in the layout it loaded
        ckpt = cls(str(tmp_path / "ckpt"), ["model.safetensors"], "QWEN2", str(out))
        return ckpt, ckpt.load_checkpoint()[training.MODEL_KEY]

    ours, state = checkpointer(HFCheckpointer, tmp_path / "ours")
    model.load_state_dict(state, strict=False)
    adapter = _train_lora(model, tokens)
    with torch.no_grad():
        trained = next_token_logps(model.eval()(tokens), tokens)
    merged = get_merged_lora_ckpt({k: v.clone() for k, v in model.state_dict().items()}, rank=4, alpha=8)
    # the model's LoRA layers, in torchtune's names (the checkpointer maps them to PEFT's)
    targets = get_lora_module_names(["q_proj", "k_proj", "v_proj", "output_proj"], True, True)
    diffs = {}
    for name, ckpt in (("ours", ours), ("torchtune", checkpointer(training.FullModelHFCheckpointer, tmp_path / "tt")[0])):
        ckpt.save_checkpoint({training.MODEL_KEY: dict(merged), training.ADAPTER_KEY: dict(adapter),
                              training.ADAPTER_CONFIG: {"r": 4, "lora_alpha": 8, "target_modules": targets,
                                                        "peft_type": "LORA"}}, epoch=0)
        epoch = ckpt._output_dir / "epoch_0"
        with_peft = peft_merged(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32), epoch).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
        hf.load_state_dict(apply_peft_adapter(base, epoch))
        with torch.no_grad():
            diffs[name] = (next_token_logps(hf(tokens).logits, tokens) - trained).abs().max().item()
            diffs[name + " PEFT"] = (next_token_logps(with_peft(tokens).logits, tokens) - trained).abs().max().item()
            hf.load_state_dict(load_file(epoch / "model-00001-of-00001.safetensors"))  # merged: right either way
            diffs[name + " merged"] = (next_token_logps(hf(tokens).logits, tokens) - trained).abs().max().item()
    print("qwen2 adapter applied by hand and by PEFT, max |log-prob diff| vs the trained model:",
          json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    assert diffs["ours"] < 1e-4 and diffs["ours PEFT"] < 1e-4, diffs
    assert diffs["torchtune PEFT"] > 1e-3, diffs  # PEFT itself loads torchtune's adapter wrong
    assert diffs["ours merged"] < 1e-4 and diffs["torchtune merged"] < 1e-4, diffs
    assert diffs["torchtune"] > 1e-3, diffs  # the defect the configs' checkpointer had


def _run_recipe(cfg):
    """The LoRA recipe in-process (as `tune run` runs it): setup, train, cleanup."""
    recipe = load_recipe("simpo_lora_single_device").SimPORecipeSingleDevice(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


@pytest.mark.peer
@pytest.mark.parametrize("quantize_base", [True, False], ids=["qlora", "lora"])
def test_fp32_export_gives_the_trained_logps(tmp_path, quantize_base):
    """Item 4: an fp32 QLoRA run (torchtune's Llama 3 builder, whose NF4 state-dict hook
    dequantizes to bf16) exports the model it trained: the merged folder loaded with
    transformers gives the trained model's log-probs to 1e-4 (the bf16-rounded base: 1.2e-3 off).
    LoRA on CPU: the merge must not reach the trained model's own weights (.cpu() of a CPU tensor
    is the tensor itself; the in-place merge made the model add its delta twice: 0.064 off here)."""
    from transformers import AutoModelForCausalLM

    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    data = tmp_path / "train48.jsonl"
    data.write_text("\n".join((TINY / "train.jsonl").read_text().splitlines()[:48]) + "\n")
    # the tiny asset's dimensions are NF4's block sizes' multiples (each weight a multiple of 64 x 256 values)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/tiny/simpo_lora.yaml"), OmegaConf.from_dotlist([
        f"output_dir={tmp_path / 'out'}", f"dataset.data_files={data}", "eval_dataset=null",
        "eval_every_n_steps=null", "save_every_n_steps=null", "save_adapter_weights_only=False", "dtype=fp32",
        "model._component_=torchtune.models.llama3.lora_llama3", f"model.quantize_base={quantize_base}",
        "model.rope_base=10000", "batch_size=4", "gradient_accumulation_steps=1", "max_steps_per_epoch=2",
        "lr_scheduler=null", "optimizer.lr=0.01",
    ]))
    recipe = _run_recipe(cfg)
    tokens = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = next_token_logps(recipe._model.eval()(tokens), tokens)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "epoch_0", dtype=torch.float32).eval()
        diff = (next_token_logps(hf(tokens).logits, tokens) - trained).abs().max().item()
    print(f"fp32 {'QLoRA' if quantize_base else 'LoRA'} export vs the trained model: max |log-prob diff| {diff:.2e}")
    assert diff < 1e-4, diff
