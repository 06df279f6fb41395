"""Tiny stand-ins of each shipped model family, and the shipped real configs pointed at them
(issue 24): shared by tests/test_family_matrix.py (one export check per family and recipe kind)
and tests/test_family_configs.py (every other shipped config: start-up and one step).

A stand-in is made at test time from the config's own hub checkpoint config.json fields
(tests/test_models.py HUB_CONFIGS: its tying, RoPE, caps, norms) with only the dimensions made
tiny, saved in the config's checkpoint file layout (its shard names, .bin for Mistral v0.2;
Gemma 3 4B/12B/27B: a Gemma3ForConditionalGeneration with a tiny vision tower, its keys in the
hub files' layout ``language_model.model.*`` / ``vision_tower.*`` / ``multi_modal_projector.*``);
a tokenizer file of the family's kind made on the fly (tiktoken for Llama 3, byte-level BPE for
Qwen, sentencepiece for Gemma / Mistral, Gemma's with its turn markers as single tokens) where
the config reads it; 32 rows in the config's hub data set's schema. The seeded transformers
model and the sentencepiece model are built once per family and dimensions (in-memory caches):
a config's size changes only what is overridden anyway, and its file layout is written per case.

The config is run in-process with only paths, dimensions and what a CPU check needs overridden:
the model's named builder becomes its family's generic builder with the tiny dimensions, the hub
config's constants and the named builder's max_seq_len (the named builders' constants are
checked against the hub config.json on the meta device by test_models.py), device cpu, dtype fp32
(a 1e-4 comparison), N steps of batch 2 at lr 1e-3 (100x the LoRA configs') with no warm-up, no
eval.
"""

import base64
import copy
import functools
import gc
import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, load_recipe
from omegaconf import OmegaConf

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
SP_VOCAB = 384  # sentencepiece families: the vocabulary is the tokenizer's (a dimension)
# the multimodal Gemma 3 stand-in's vision tower (SigLIP): tiny, 4 image tokens
TINY_VISION = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, image_size=28, patch_size=14)
# Gemma's turn markers: single tokens of Gemma's sentencepiece model (the configs' prompt
# template and the generate config's extra_stop_tokens use them)
GEMMA_SYMBOLS = ["<start_of_turn>", "<end_of_turn>"]


def transformers():
    import transformers as t

    return t


def hub_config(key: str) -> dict:
    from test_models import HUB_CONFIGS

    return json.loads(json.dumps(HUB_CONFIGS[key]))


def hub_key(name: str) -> str:
    """The HUB_CONFIGS key of a config ``<family>/<stem>``: its own checkpoint's."""
    from test_models import hub_key as key

    family, stem = name.split("/")
    return key(family, stem)


def text_config(hub: dict) -> dict:
    """The language model's config.json fields, in the names the FAMILIES constants read: Gemma
    3 4B+ keep them in ``text_config``, the rest left to transformers' Gemma3TextConfig defaults."""
    if hub.get("model_type") != "gemma3":
        return hub
    t = transformers().Gemma3TextConfig(**{k: v for k, v in hub["text_config"].items() if k != "model_type"}).to_dict()
    rope = t.pop("rope_parameters")
    full, local = rope["full_attention"], rope["sliding_attention"]
    t.update(rope_theta=full["rope_theta"], rope_local_base_freq=local["rope_theta"],
             rope_scaling=None if full["rope_type"] == "default" else {"rope_type": full["rope_type"],
                                                                        "factor": full["factor"]},
             sliding_window_pattern=t.pop("layer_types").index("full_attention") + 1)
    return t


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
                              rope_scaling_factor=(h.get("rope_scaling") or {}).get("factor"),
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
# a multimodal checkpoint's language-model keys in the hub files (transformers < 4.52's layout,
# what google/gemma-3-{4b,12b,27b}-it hold) from transformers 5's
HUB_LAYOUT = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
              ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."))


def dims(family, kind) -> dict:
    return {**DIMS, **FAMILY_DIMS.get(family, {}), **(QLORA_DIMS if kind == "qlora" else {})}


# ------------------------------------------------------------------------------------------ tokenizers
def sentences():
    """The first 200 pairs of the embedded tiny data (chosen/rejected message lists)."""
    return [json.loads(line) for line in (TINY / "train.jsonl").read_text().splitlines()[:200]]


def write_tiktoken(path, ranks: int = 256):
    """A tiktoken-format file (``base64(token) rank`` per line): the 256 byte tokens, and with
    ``ranks`` > 256 distinct multi-byte tokens up to that many (Llama 3's 128,000: every id a model
    of the hub's vocabulary samples decodes). Llama 3's tokenizer reads it as its BPE ranks (its
    special tokens keep their fixed ids >= 128000)."""
    tokens = [bytes([b]) for b in range(256)]
    n = 2
    while len(tokens) < ranks:
        for i in range(256 ** n):
            tokens.append(i.to_bytes(n, "big"))
            if len(tokens) == ranks:
                break
        n += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def write_bpe(folder):
    from test_qk_norm_models import _tiny_bpe

    _tiny_bpe(folder)


@functools.lru_cache(maxsize=None)
def _sentencepiece_model(family) -> bytes:
    import sentencepiece as spm

    text = [m["content"] for r in sentences() for k in ("chosen", "rejected") for m in r[k]]
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if family == "gemma2" else dict(unk_id=0, bos_id=1, eos_id=2,
                                                                                       pad_id=-1)
    # the hub models' normalisation: text as it is (no whitespace folding); Gemma's without the
    # dummy-prefix space (and its turn markers as single tokens), Mistral's (Llama 2's) with it
    extra = dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                 add_dummy_prefix=not family.startswith("gemma"))
    if family.startswith("gemma"):
        extra["user_defined_symbols"] = GEMMA_SYMBOLS
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=SP_VOCAB,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1,
                                   minloglevel=2, **ids, **extra)
    return buf.getvalue()


def write_tokenizer(tok_path, family, ckpt, ranks: int = 256):
    """The family's tokenizer file(s) where the config's tokenizer ``path`` reads them (byte-level
    BPE: vocab.json / merges.txt in the checkpoint folder)."""
    kind = FAMILIES[family][0]
    if kind == "tiktoken":
        write_tiktoken(Path(tok_path), ranks)
    elif kind == "bpe":
        write_bpe(Path(ckpt))
    else:
        Path(tok_path).parent.mkdir(parents=True, exist_ok=True)
        Path(tok_path).write_bytes(_sentencepiece_model(family))


# ------------------------------------------------------------------------------------------ checkpoints
def _randomise(hf, family):
    """The norms randomised (transformers initialises each to one value: a misplaced norm would
    not show), biases too."""
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0.0 if family.startswith("gemma") else 1.0, 0.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)


@functools.lru_cache(maxsize=None)
def _hf_model(family: str, hub_json: str):
    """The seeded transformers model of a (tiny) hub config; built once per family and config."""
    t = transformers()
    hub = json.loads(hub_json)
    torch.manual_seed(0)
    if hub.get("model_type") == "gemma3":  # Gemma 3 4B+: the language model beside a vision tower
        text = t.Gemma3TextConfig(**{k: v for k, v in hub["text_config"].items() if k != "model_type"})
        cfg = t.Gemma3Config(text_config=text.to_dict(), vision_config=TINY_VISION, mm_tokens_per_image=4)
        cfg._attn_implementation = "eager"
        cfg.text_config._attn_implementation = "eager"
        hf = t.Gemma3ForConditionalGeneration(cfg).eval()
    else:
        cfg = t.AutoConfig.for_model(**hub)
        if family in ("gemma2", "gemma3"):
            cfg._attn_implementation = "eager"
        hf = (t.LlamaForSequenceClassification(cfg) if hub.get("num_labels") == 1 else
              t.AutoModelForCausalLM.from_config(cfg)).eval()
    _randomise(hf, family)
    hf.config.architectures = [type(hf).__name__]
    return hf


def tiny_hub(family, key, dims_, vocab=None, **extra) -> dict:
    """The hub config of ``key`` with tiny dimensions, in transformers 5's RoPE layout."""
    hub = hub_config(key)
    if hub.get("model_type") == "gemma3":  # the language model's dimensions; the rest its hub fields
        hub["text_config"].update(dims_, vocab_size=vocab)
        return hub
    hub.update(dims_, vocab_size=vocab or hub["vocab_size"], **extra)
    if family == "gemma3":  # transformers 5: a RoPE per layer type
        hub["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": hub.pop("rope_theta")},
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": hub.pop("rope_local_base_freq")}}
    elif "rope_theta" in hub:  # transformers 5's rope_parameters
        hub["rope_parameters"] = {"rope_type": "default", "rope_theta": hub.pop("rope_theta")}
        scaling = hub.pop("rope_scaling", None)
        if scaling:
            hub["rope_parameters"].update(scaling, rope_theta=hub["rope_parameters"]["rope_theta"])
    return hub


def write_standin(folder, family, hub: dict, files):
    """The stand-in of ``hub`` (a copy of the cached model, for the caller to change), its
    config.json and its weights split over ``files`` (torchtune's checkpointer reads the files
    listed), in the hub files' key layout."""
    from safetensors.torch import save_file

    hf = copy.deepcopy(_hf_model(family, json.dumps(hub, sort_keys=True)))
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    tied = hf.config.get_text_config().tie_word_embeddings
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not (k == "lm_head.weight" and tied)}
    if hub.get("model_type") == "gemma3":
        state = {_rename(k, HUB_LAYOUT): v for k, v in state.items()}
    keys = sorted(state)
    for i, name in enumerate(files):
        shard = {k: state[k] for k in keys[i::len(files)]}
        if name.endswith(".bin"):  # Mistral v0.2's pytorch_model-*.bin
            torch.save(shard, folder / name)
        else:
            save_file(shard, str(folder / name), metadata={"format": "pt"})
    return hf


def _rename(key, table):
    return next((new + key[len(old):] for old, new in table if key.startswith(old)), key)


def checkpoint_tensors(folder) -> dict:
    """Every tensor of the checkpoint files in ``folder`` (safetensors and .bin), by key."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).iterdir()):
        if f.suffix == ".safetensors":
            out.update(load_file(f))
        elif f.suffix == ".bin":
            out.update(torch.load(f, weights_only=True))
    return out


def checkpoint_files(node) -> list:
    files = node.checkpoint_files
    if "filename_format" in files:  # torchtune's {filename_format, max_filename} form
        from torchtune.training import FormattedCheckpointFiles

        return FormattedCheckpointFiles.from_dict(dict(files)).build_checkpoint_filenames()
    return list(files)


# ------------------------------------------------------------------------------------------ data
def write_rows(path, fmt, n=32):
    """``n`` rows in the hub data set's schema: HuggingFaceH4/ultrafeedback_binarized (format
    messages) or princeton-nlp/llama3-ultrafeedback-armorm (format princeton)."""
    out = []
    for i, r in enumerate(sentences()[:n]):
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


# ------------------------------------------------------------------------------------------ configs
def _ints(d: dict) -> dict:
    # whole numbers as ints: the builders annotate rope_base / scale_factor as int (prefopt.config checks)
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in d.items()}


def tiny_model(node, family, key, kind, dims_) -> dict:
    """The config's ``model`` node (its LoRA settings kept) with its named builder replaced by the
    family's generic one: tiny dimensions, the hub config's constants, the named builder's
    max_seq_len (what the start-up check compares sliding windows against)."""
    from torchtune import config

    _, vocab, lora_builder, full_builder, consts = FAMILIES[family]
    with torch.device("meta"):
        max_seq_len = config.instantiate(node).max_seq_len
    hub = text_config(hub_config(key))
    model = {k: v for k, v in OmegaConf.to_container(node).items() if k != "_component_"}
    consts = _ints(consts(hub))
    if "head_dim" in consts:
        consts["head_dim"] = dims_["head_dim"]
    model.update(_component_=lora_builder if kind != "full" else full_builder, **consts,
                 vocab_size=vocab or hub["vocab_size"], num_layers=dims_["num_hidden_layers"],
                 num_heads=dims_["num_attention_heads"], num_kv_heads=dims_["num_key_value_heads"],
                 embed_dim=dims_["hidden_size"], intermediate_dim=dims_["intermediate_size"], max_seq_len=max_seq_len)
    if kind == "qlora":  # the config's qlora_ named builder: the generic builder with quantize_base
        model["quantize_base"] = True
    return model


def _replace_downloads(raw: str, paths, tmp_path) -> str:
    """The config's text with each download folder (``/tmp/<name>`` of ``paths``) under ``tmp_path``."""
    for p in paths:
        parts = Path(str(p)).parts
        root = str(Path(*parts[:3]))  # /tmp/<download folder>
        raw = re.sub(re.escape(root) + r"(?=[/\s]|$)", str(tmp_path / parts[2]), raw)
    return raw


def config_recipe(name: str) -> str:
    """The recipe the config's header runs it with (``tune run ... recipes/<r>.py --config <it>``)."""
    raw = (REPO / "configs" / f"{name}.yaml").read_text()
    found = re.search(r"tune run .*?recipes/(\w+)\.py --config configs/" + re.escape(name) + r"\.yaml", raw)
    assert found, f"configs/{name}.yaml: no `tune run recipes/<recipe>.py --config configs/{name}.yaml` line"
    return found.group(1)


def recipe_class(recipe: str):
    cls = {"simpo_full_distributed": "SimPORecipeDistributed", "simpo_lora_single_device": "SimPORecipeSingleDevice",
           "generate_preference_pairs": "GeneratePairsRecipe"}[recipe]
    return getattr(load_recipe(recipe), cls)


OVERRIDES = ["device=cpu", "dtype=fp32", "eval_dataset=null", "eval_every_n_steps=null", "save_every_n_steps=null",
             "batch_size=2", "gradient_accumulation_steps=1", "epochs=1", "lr_scheduler=null", "optimizer.lr=1e-3",
             "compile=False", "log_peak_memory_stats=False"]


def case_config(tmp_path, name, kind, steps=2):
    """The shipped config with its download folder replaced by the stand-in's, and the overrides
    of the module docstring; returns (config, the transformers stand-in)."""
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    family = name.split("/")[0]
    key = hub_key(name)  # the config's own checkpoint: its size's tying, its layout
    raw = (REPO / "configs" / f"{name}.yaml").read_text()
    cfg = OmegaConf.create(_replace_downloads(raw, [OmegaConf.create(raw).checkpointer.checkpoint_dir], tmp_path))
    ckpt = Path(cfg.checkpointer.checkpoint_dir)
    d = dims(family, kind)
    hf = write_standin(ckpt, family, tiny_hub(family, key, d, FAMILIES[family][1]), checkpoint_files(cfg.checkpointer))
    write_tokenizer(cfg.tokenizer.get("path"), family, ckpt)
    data = tmp_path / "train.jsonl"
    write_rows(data, cfg.dataset.get("format", "messages"))
    cfg.model = tiny_model(cfg.model, family, key, kind, d)
    cfg.dataset.source, cfg.dataset.split = "json", "train"
    cfg.dataset.data_files = str(data)
    over = OmegaConf.from_dotlist([f"output_dir={tmp_path / 'out'}", f"max_steps_per_epoch={steps}", *OVERRIDES])
    return OmegaConf.merge(cfg, over), hf


def generate_config(tmp_path, name, prompts=2, new_tokens=4):
    """A generation config (recipes/generate_preference_pairs.py) on stand-ins: the policy as in
    :func:`case_config`; the reward model (``reward.model``: ``prefopt.reward.classifier`` of a
    named base) a tiny seeded LlamaForSequenceClassification of the base's hub config with one
    output, in the reward checkpointer's file layout, its tokenizer where the config reads it;
    ``prompts`` prompts of the hub data set's schema, ``new_tokens`` new tokens each, the config's
    own samples, seeds, sampling and stop settings."""
    import prefopt  # noqa: F401

    family = name.split("/")[0]
    raw = (REPO / "configs" / f"{name}.yaml").read_text()
    orig = OmegaConf.create(raw)
    rw = orig.reward
    assert rw._component_ == "prefopt.reward.reward_model", f"{name}: reward {rw._component_}: add its stand-in"
    cfg = OmegaConf.create(_replace_downloads(raw, [orig.checkpointer.checkpoint_dir, orig.tokenizer.path,
                                                    rw.checkpointer.checkpoint_dir, rw.tokenizer.path], tmp_path))
    d = dims(family, "full")
    # the policy
    ckpt = Path(cfg.checkpointer.checkpoint_dir)
    write_standin(ckpt, family, tiny_hub(family, hub_key(name), d, FAMILIES[family][1]),
                  checkpoint_files(cfg.checkpointer))
    write_tokenizer(cfg.tokenizer.path, family, ckpt, ranks=128_000)
    cfg.model = tiny_model(cfg.model, family, hub_key(name), "full", d)
    # the reward model: <family>/<size> of its named base, e.g. torchtune.models.llama3_1.llama3_1_8b
    base = rw.model.base
    r_family, r_size = base.split(".")[-2], base.rsplit("_", 1)[-1].upper()
    r_key = f"{r_family}/{r_size}"
    hub = tiny_hub(r_family, r_key, d, FAMILIES[r_family][1], num_labels=1)
    r_ckpt = Path(cfg.reward.checkpointer.checkpoint_dir)
    write_standin(r_ckpt, r_family, hub, checkpoint_files(cfg.reward.checkpointer))
    write_tokenizer(cfg.reward.tokenizer.path, r_family, r_ckpt, ranks=128_000)
    node = OmegaConf.create({"_component_": base, **{k: v for k, v in rw.model.items() if k not in ("_component_", "base",
                                                                                                   "num_classes")}})
    tiny = tiny_model(node, r_family, r_key, "full", d)
    cfg.reward.model = {"_component_": rw.model._component_, "num_classes": rw.model.num_classes,
                        "base": tiny.pop("_component_"), **tiny}
    # the prompts
    data = tmp_path / "prompts.jsonl"
    write_rows(data, cfg.prompts.get("format", "messages"))
    cfg.prompts.source, cfg.prompts.split, cfg.prompts.data_files = "json", "train", str(data)
    cfg.prompts.max_prompts = prompts
    over = OmegaConf.from_dotlist([f"output_dir={tmp_path / 'out'}", "device=cpu", "dtype=fp32",
                                   f"max_new_tokens={new_tokens}", f"batch_size={prompts}"])
    return OmegaConf.merge(cfg, over)


@pytest.fixture
def frozen_heap():
    """torchtune's checkpointer runs ``gc.collect()`` after each checkpoint file it reads (17 for
    Qwen3 32B) and the recipes after set-up: a full collection of a test process's heap (torch,
    transformers, datasets imported) takes ~0.3 s. The objects made before the test are left out
    of those collections for its duration (``gc.freeze``), and given back after."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
