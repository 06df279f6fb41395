"""Proven per family (issue 24): each shipped family's real config, run by its own recipe on a tiny
seeded transformers stand-in of the family, trains the model transformers builds and exports the
model it trained.

For each case: a stand-in made at test time from the config's own hub checkpoint config.json
fields (tests/test_models.py HUB_CONFIGS: its tying, RoPE, caps, norms) with only the dimensions
made tiny, saved in the config's checkpoint file layout (its shard names, .bin for Mistral); a tokenizer file of the family's kind made on the fly (tiktoken for
Llama 3, byte-level BPE for Qwen, sentencepiece for Gemma / Mistral) where the config reads it;
32 rows in the config's hub data set's schema. The config is run in-process with only paths,
dimensions and what a 2-step CPU check needs overridden: the model's named builder becomes its
family's generic builder with the tiny dimensions and the hub config's constants (the named
builders' constants are checked against the hub config.json on the meta device by
test_models.py), device cpu, dtype fp32 (a 1e-4 comparison), 2 steps of batch 2 at lr 1e-3 (100x
the LoRA configs') with no warm-up, no eval. One case per family and recipe kind (LoRA, QLoRA, full);
Gemma 3's full configs (12B / 27B: multimodal checkpoints) are not among them. Checked: our logits equal transformers' to 1e-5 before training; after
training, the exported folder loaded with AutoModelForCausalLM (and, for LoRA, the adapter merged
by hand into the stand-in's weights as PEFT merges it) gives the trained model's log-probs to 1e-4.
"""

import base64
import io
import json
import os

import pytest
import torch
from conftest import REPO, TINY, apply_peft_adapter, load_recipe, next_token_logps
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
SP_VOCAB = 384  # sentencepiece families: the vocabulary is the tokenizer's (a dimension)


def _hub(key: str) -> dict:
    from test_models import HUB_CONFIGS

    return json.loads(json.dumps(HUB_CONFIGS[key]))


# family -> (tokenizer kind, vocab size of the stand-in (None: the hub's), generic LoRA builder, full builder,
#            the builder's constants from the hub config.json of the config's size)
def _llama3(hub):
    s = hub["rope_scaling"]
    return dict(rope_base=hub["rope_theta"], scale_factor=s["factor"], norm_eps=hub["rms_norm_eps"])


FAMILIES = {
    "llama3_2": ("tiktoken", None, "torchtune.models.llama3_2.lora_llama3_2",
                 "torchtune.models.llama3_2.llama3_2",
                 lambda h: dict(_llama3(h), tie_word_embeddings=h["tie_word_embeddings"])),
    "llama3_1": ("tiktoken", None, "torchtune.models.llama3_1.lora_llama3_1",
                 "torchtune.models.llama3_1.llama3_1", _llama3),
    "qwen2_5": ("bpe", None, "torchtune.models.qwen2.lora_qwen2", "torchtune.models.qwen2.qwen2",
                lambda h: dict(rope_base=h["rope_theta"], norm_eps=h["rms_norm_eps"],
                               tie_word_embeddings=h["tie_word_embeddings"])),
    "mistral": ("sentencepiece", SP_VOCAB, "torchtune.models.mistral.lora_mistral",
                "torchtune.models.mistral.mistral", lambda h: dict(rope_base=h["rope_theta"], norm_eps=h["rms_norm_eps"])),
    "gemma2": ("sentencepiece", SP_VOCAB, "prefopt.models.gemma2.lora_gemma2", "prefopt.models.gemma2.gemma2",
               lambda h: dict(rope_base=h["rope_theta"], norm_eps=h["rms_norm_eps"], head_dim=DIMS["head_dim"],
                              attn_logit_softcapping=h["attn_logit_softcapping"],
                              final_logit_softcapping=h["final_logit_softcapping"],
                              sliding_window_size=h["sliding_window"], query_pre_attn_scalar=h["query_pre_attn_scalar"])),
    "gemma3": ("sentencepiece", SP_VOCAB, "prefopt.models.gemma3.lora_gemma3", "prefopt.models.gemma3.gemma3",
               lambda h: dict(rope_base=h["rope_theta"], rope_local_base=h["rope_local_base_freq"],
                              norm_eps=h["rms_norm_eps"], head_dim=DIMS["head_dim"],
                              sliding_window_size=h["sliding_window"], sliding_window_pattern=h["sliding_window_pattern"],
                              query_pre_attn_scalar=h["query_pre_attn_scalar"])),
    "qwen3": ("bpe", None, "prefopt.models.qwen3.lora_qwen3", "prefopt.models.qwen3.qwen3",
              lambda h: dict(rope_base=h["rope_theta"], norm_eps=h["rms_norm_eps"], head_dim=DIMS["head_dim"],
                             tie_word_embeddings=h["tie_word_embeddings"])),
}

# NF4 quantizes in blocks of 64 values with a scale per 256 blocks: every quantized weight a
# multiple of 16,384 values
QLORA_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=32)
# Gemma 3: 6 layers, so that the 5 local : 1 global pattern has its global layer
FAMILY_DIMS = {"gemma3": dict(num_hidden_layers=6)}

# (config, recipe kind): one export check per family and recipe kind (Gemma 3's full configs are
# 12B / 27B, multimodal checkpoints: not here)
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
    ("qwen3/0.6B_simpo_lora_single_device", "lora"),
    ("qwen3/8B_simpo_qlora_single_device", "qlora"),
    ("qwen3/8B_simpo_full", "full"),
]


# ------------------------------------------------------------------------------------------ stand-ins
def _sentences():
    """The first 200 pairs of the embedded tiny data (chosen/rejected message lists)."""
    return [json.loads(line) for line in (TINY / "train.jsonl").read_text().splitlines()[:200]]


def _tiktoken(path):
    """A tiktoken-format file (``base64(token) rank`` per line) of the 256 byte tokens: Llama 3's
    tokenizer reads it as its BPE ranks (its special tokens keep their fixed ids >= 128000)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


def _bpe(folder):
    from test_qk_norm_models import _tiny_bpe

    _tiny_bpe(folder)


def _sentencepiece(path, family):
    import sentencepiece as spm

    text = [m["content"] for r in _sentences() for k in ("chosen", "rejected") for m in r[k]]
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if family == "gemma2" else dict(unk_id=0, bos_id=1, eos_id=2,
                                                                                       pad_id=-1)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=SP_VOCAB,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2, **ids)
    path.write_bytes(buf.getvalue())


def _dims(family, kind) -> dict:
    return {**DIMS, **FAMILY_DIMS.get(family, {}), **(QLORA_DIMS if kind == "qlora" else {})}


def _standin(folder, family, key, files, dims):
    """The seeded transformers model of the family's hub config with tiny dimensions, its weights
    split over the config's ``checkpoint_files`` (torchtune's checkpointer reads the files
    listed); the norms randomised (transformers initialises each to one value: a misplaced norm
    would not show)."""
    from safetensors.torch import save_file

    vocab = FAMILIES[family][1]
    hub = _hub(key)
    hub.update(dims, vocab_size=vocab or hub["vocab_size"])
    if family == "gemma3":  # transformers 5: a RoPE per layer type
        hub["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": hub.pop("rope_theta")},
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": hub.pop("rope_local_base_freq")}}
    elif "rope_theta" in hub:  # transformers 5's rope_parameters
        hub["rope_parameters"] = {"rope_type": "default", "rope_theta": hub.pop("rope_theta")}
        scaling = hub.pop("rope_scaling", None)
        if scaling:
            hub["rope_parameters"].update(scaling, rope_theta=hub["rope_parameters"]["rope_theta"])
    cfg = transformers.AutoConfig.for_model(**hub)
    if family in ("gemma2", "gemma3"):
        cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    keys = sorted(state)
    for i, name in enumerate(files):
        shard = {k: state[k] for k in keys[i::len(files)]}
        if name.endswith(".bin"):  # Mistral v0.2's pytorch_model-*.bin
            torch.save(shard, folder / name)
        else:
            save_file(shard, str(folder / name), metadata={"format": "pt"})
    return hf


def _rows(path, fmt):
    """32 rows in the hub data set's schema: HuggingFaceH4/ultrafeedback_binarized (format
    messages) or princeton-nlp/llama3-ultrafeedback-armorm (format princeton)."""
    out = []
    for i, r in enumerate(_sentences()[:32]):
        prompt = r["chosen"][0]["content"]
        chosen, rejected = r["chosen"], r["rejected"]
        if fmt == "princeton":
            out.append(dict(prompt_id=f"{i:064x}", prompt=prompt, chosen=chosen, rejected=rejected,
                            all_generated_responses=[chosen[1]["content"], rejected[1]["content"]],
                            all_rm_scores=[0.2, 0.1]))
        else:
            out.append(dict(prompt=prompt, prompt_id=f"{i:064x}", chosen=chosen, rejected=rejected,
                            messages=chosen, score_chosen=8.0, score_rejected=4.0))
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def _case_config(tmp_path, name, kind):
    """The shipped config with its download folder replaced by the stand-in's, and the overrides
    of the module docstring."""
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    family = name.split("/")[0]
    key = f"{family}/{name.split('/')[1].split('_')[0]}"  # the config's own size: its tying, its layout
    tok_kind, vocab, lora_builder, full_builder, consts = FAMILIES[family]
    raw = (REPO / "configs" / f"{name}.yaml").read_text()
    cfg = OmegaConf.create(raw)
    download = str(cfg.checkpointer.checkpoint_dir).rstrip("/")
    ckpt = tmp_path / "ckpt"
    cfg = OmegaConf.create(raw.replace(download, str(ckpt)))
    files = cfg.checkpointer.checkpoint_files
    if "filename_format" in files:  # torchtune's {filename_format, max_filename} form
        n = files.max_filename
        files = [files.filename_format.format(str(i).zfill(len(n)), n) for i in range(1, int(n) + 1)]
    dims = _dims(family, kind)
    hf = _standin(ckpt, family, key, list(files), dims)
    tok = cfg.tokenizer
    if tok_kind == "tiktoken":
        _tiktoken(ckpt / os.path.relpath(tok.path, ckpt))
    elif tok_kind == "bpe":
        _bpe(ckpt)
    else:
        _sentencepiece(ckpt / os.path.relpath(tok.path, ckpt), family)
    data = tmp_path / "train.jsonl"
    _rows(data, cfg.dataset.get("format", "messages"))

    hub = _hub(key)
    model = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "_component_"}
    # whole numbers as ints: the builders annotate rope_base / scale_factor as int (prefopt.config checks)
    consts = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in consts(hub).items()}
    if "head_dim" in consts:
        consts["head_dim"] = dims["head_dim"]
    model.update(_component_=lora_builder if kind != "full" else full_builder, **consts,
                 vocab_size=vocab or hub["vocab_size"], num_layers=dims["num_hidden_layers"],
                 num_heads=dims["num_attention_heads"], num_kv_heads=dims["num_key_value_heads"],
                 embed_dim=dims["hidden_size"], intermediate_dim=dims["intermediate_size"],
                 max_seq_len=hub["max_position_embeddings"])
    if kind == "qlora":  # the config's qlora_ named builder: the generic builder with quantize_base
        model["quantize_base"] = True
    cfg.model = model
    cfg.dataset.source, cfg.dataset.split = "json", "train"
    cfg.dataset.data_files = str(data)
    over = OmegaConf.from_dotlist([
        f"output_dir={tmp_path / 'out'}", "device=cpu", "dtype=fp32", "eval_dataset=null",
        "eval_every_n_steps=null", "save_every_n_steps=null", "batch_size=2", "gradient_accumulation_steps=1",
        "max_steps_per_epoch=2", "epochs=1", "lr_scheduler=null", "optimizer.lr=1e-3", "compile=False",
        "log_peak_memory_stats=False",
    ])
    return OmegaConf.merge(cfg, over), hf


def _recipe(kind):
    if kind == "full":
        return load_recipe("simpo_full_distributed").SimPORecipeDistributed
    return load_recipe("simpo_lora_single_device").SimPORecipeSingleDevice


@pytest.mark.parametrize("name,kind", CASES, ids=[c[0] for c in CASES])
def test_family_config_trains_the_transformers_model_and_exports_it(tmp_path, name, kind):
    import torch.distributed as dist

    cfg, hf = _case_config(tmp_path, name, kind)
    vocab = hf.config.vocab_size
    tokens = torch.randint(0, min(vocab, 256), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    recipe = None
    try:
        recipe = _recipe(kind)(cfg)
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
        diffs = {"logits before training": before,
                 "export": (next_token_logps(exported(tokens).logits, tokens) - trained).abs().max().item()}
        moved = (next_token_logps(ref, tokens) - trained).abs().max().item()
        if kind == "lora":  # QLoRA's base is the NF4-rounded stand-in: the merged folder is its check
            hf.load_state_dict(apply_peft_adapter(hf.state_dict(), epoch / "adapter"))
            diffs["adapter by hand"] = (next_token_logps(hf(tokens).logits, tokens) - trained).abs().max().item()
    print(f"{name}: trained moved log-probs by {moved:.2e}; " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert moved > 1e-3, moved  # training changed the model: the export check means something
    # QLoRA computes with NF4-rounded weights: its family's LoRA case checks the logits
    assert kind == "qlora" or diffs["logits before training"] < 1e-5, diffs
    assert all(v < 1e-4 for k, v in diffs.items() if k != "logits before training"), diffs
