"""Qwen3 and Gemma 3 (issue 24): our builders (prefopt.models.qwen3 / gemma3) against transformers'
Qwen3ForCausalLM / Gemma3ForCausalLM on tiny seeded stand-ins (fp32, eager attention for Gemma 3),
checkpoints loaded and saved through prefopt.models.checkpointer.HFCheckpointer, and Qwen3's
tokenizer against the rendering of Qwen3's chat template. The ``peer`` tests need transformers."""

import json

import pytest
import torch

from prefopt.models.checkpointer import HFCheckpointer
from prefopt.models.match import check_model_matches_checkpoint

TINY_QWEN3 = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24, embed_dim=64,
                  intermediate_dim=96, max_seq_len=64)


def _randomise_norms(model, mean: float):
    # transformers initialises every norm weight to one value: a misplaced or unloaded norm
    # would not show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(mean, 0.5)


def _load(model, ckpt_dir, model_type: str, out_dir):
    ckpt = HFCheckpointer(str(ckpt_dir), ["model.safetensors"], model_type, str(out_dir))
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    return model.eval(), ckpt


def _qwen3_standin(path, tied: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   max_position_embeddings=64, tie_word_embeddings=tied,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    _randomise_norms(hf, 1.0)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.mark.peer
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_qwen3_logits_equal_transformers_and_round_trip(tmp_path, tied):
    """Our Qwen3 equals Qwen3ForCausalLM; torchtune's MultiHeadAttention order (q/k norm after
    RoPE) does not; the checkpoint saved back loads in transformers with the same logits; the
    LoRA builder with zero adapters is the same model; the start-up check passes."""
    from torchtune.modules import MultiHeadAttention
    from transformers import AutoModelForCausalLM

    from prefopt.models.qwen3 import lora_qwen3, qwen3

    hf = _qwen3_standin(tmp_path / "ckpt", tied)
    model, ckpt = _load(qwen3(**TINY_QWEN3, tie_word_embeddings=tied), tmp_path / "ckpt", "QWEN3", tmp_path / "out")
    tokens = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        diff = (model(tokens) - ref).abs().max().item()
        ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "epoch_0").eval()
        diff_back = (back(tokens).logits - ref).abs().max().item()
        for layer in model.layers:  # torchtune 0.6.1's order: q/k norm after RoPE
            layer.attn.__class__ = MultiHeadAttention
        diff_tt = (model(tokens) - ref).abs().max().item()
    print(f"qwen3 tied={tied}: max |logit diff| {diff:.2e} (torchtune's attention order {diff_tt:.2e}), "
          f"round trip {diff_back:.2e}")
    assert diff < 1e-5, diff
    assert diff_back < 1e-5, diff_back
    assert diff_tt > 1e-3, diff_tt

    lora = lora_qwen3(["q_proj", "v_proj", "output_proj"], True, not tied, **TINY_QWEN3, tie_word_embeddings=tied,
                      lora_rank=4, lora_alpha=8)
    lora.load_state_dict(_load(qwen3(**TINY_QWEN3, tie_word_embeddings=tied), tmp_path / "ckpt", "QWEN3",
                               tmp_path / "out2")[0].state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(lora.eval()(tokens), ref, atol=1e-5, rtol=1e-5)
    check_model_matches_checkpoint(lora, {"_component_": "lora_qwen3"}, {"checkpoint_dir": str(tmp_path / "ckpt")})


@pytest.mark.peer
def test_qwen3_adapter_exports_for_peft_without_permutation(tmp_path):
    """The adapter file has PEFT's key names and torchtune's values unchanged (no Llama q/k
    permutation of lora_B: these models use the checkpoint's rotate-half RoPE)."""
    from safetensors.torch import load_file

    from prefopt.models.qwen3 import lora_qwen3

    _qwen3_standin(tmp_path / "ckpt", tied=False)
    model = lora_qwen3(["q_proj", "k_proj"], False, True, **TINY_QWEN3, lora_rank=4, lora_alpha=8)
    ckpt = HFCheckpointer(str(tmp_path / "ckpt"), ["model.safetensors"], "QWEN3", str(tmp_path / "out"))
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_()
    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    ckpt.save_checkpoint({"adapter": dict(adapter)}, epoch=0, adapter_only=True)
    saved = load_file(tmp_path / "out" / "epoch_0" / "adapter_model.safetensors")
    assert set(saved) == {
        *(f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight"
          for i in range(2) for p in "qk" for ab in "AB"),
        "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight",
    }
    torch.testing.assert_close(saved["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"],
                               adapter["layers.1.attn.k_proj.lora_b.weight"], atol=0, rtol=0)


def _tiny_bpe(path):
    """A byte-level BPE vocab.json / merges.txt of the Qwen kind: the 256 byte symbols and a few merges."""
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(sorted(bytes_to_unicode().values()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("a", "s"), ("Ċ", "Ċ"), ("i", "s"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab, merges


# What Qwen3's chat template (Qwen/Qwen3-8B's tokenizer_config.json) renders for each conversation,
# and its generation prompt (enable_thinking=False, or True for a response with its own think
# block); checked against transformers' apply_chat_template with that template.
_CONVERSATIONS = [
    ([("user", "Is the sky blue?"), ("assistant", "Yes, it is as the\n\nthe sky.")],
     "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
     "Yes, it is as the\n\nthe sky.<|im_end|>\n"),
    ([("system", "Be brief."), ("user", "the a"), ("assistant", "\nIt is.")],
     "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nthe a<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n\n</think>\n\n",
     "It is.<|im_end|>\n"),
    ([("user", "hi"), ("assistant", "hello"), ("user", "is it?"), ("assistant", "it is")],
     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nis it?<|im_end|>\n"
     "<|im_start|>assistant\n<think>\n\n</think>\n\n",
     "it is<|im_end|>\n"),
    ([("user", "think"), ("assistant", "<think>\nhmm the\n</think>\n\nthe answer")],
     "<|im_start|>user\nthink<|im_end|>\n<|im_start|>assistant\n",
     "<think>\nhmm the\n</think>\n\nthe answer<|im_end|>\n"),
]


@pytest.mark.peer
@pytest.mark.parametrize("conversation,prompt,response", _CONVERSATIONS, ids=["one-turn", "system", "multi-turn",
                                                                                "own-think-block"])
def test_qwen3_tokenizer_renders_qwen3s_template(tmp_path, conversation, prompt, response):
    """The prompt (masked) is the template's generation prompt with thinking off, the response
    the rest; the ids are transformers' byte-level BPE of that text (the final "\\n" after
    <|im_end|> aside: the end token ends the sequence)."""
    transformers = pytest.importorskip("transformers")
    from torchtune.data import Message

    from prefopt.models.qwen3 import QWEN3_SPECIAL_TOKENS, qwen3_tokenizer

    vocab, merges = _tiny_bpe(tmp_path)
    hf = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges)
    hf.add_tokens([transformers.AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL_TOKENS],
                  special_tokens=True)

    def hf_ids(text):  # the added tokens take Qwen3's ids
        return [QWEN3_SPECIAL_TOKENS.get(hf.convert_ids_to_tokens(i), i) for i in hf.encode(text)]

    tok = qwen3_tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    messages = [Message(role=r, content=c, masked=i < len(conversation) - 1) for i, (r, c) in enumerate(conversation)]
    ids, mask = tok.tokenize_messages(messages)
    start = mask.index(False)
    assert ids[:start] == hf_ids(prompt)
    assert ids[start:] == hf_ids(response.removesuffix("\n"))
    assert not any(mask[start:])


# ------------------------------------------------------------------------------------- Gemma 3
TINY_GEMMA3 = dict(vocab_size=128, num_layers=7, num_heads=4, num_kv_heads=2, head_dim=16, embed_dim=64,
                   intermediate_dim=96, max_seq_len=64, sliding_window_size=5, query_pre_attn_scalar=20)


def _gemma3_text_config(transformers, scaling):
    full = {"rope_type": "default", "rope_theta": 1e6} if scaling is None else \
        {"rope_type": "linear", "factor": scaling, "rope_theta": 1e6}
    return transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=20,
        rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        attn_implementation="eager")


@pytest.mark.peer
@pytest.mark.parametrize("scaling", [None, 8.0], ids=["1B-like", "linear-rope-8"])
def test_gemma3_logits_equal_transformers(tmp_path, scaling):
    """Layers 0-4 and 6 local (window 5, θ 1e4), layer 5 global (θ 1e6, linear scaling as in
    4B+); 20 tokens, so every window cuts; scores scaled by query_pre_attn_scalar 20, not head_dim."""
    transformers = pytest.importorskip("transformers")
    from prefopt.models.gemma3 import gemma3, lora_gemma3
    from prefopt.packing import packing_unsupported_reason

    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(_gemma3_text_config(transformers, scaling)).eval()
    _randomise_norms(hf, 0.0)
    hf.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    model, _ = _load(gemma3(**TINY_GEMMA3, rope_scaling_factor=scaling), tmp_path / "ckpt", "GEMMA3", tmp_path / "out")
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref = hf(tokens).logits
        diff = (model(tokens) - ref).abs().max().item()
        # the dense-mask path (what the packed layout would pass) gives the same logits
        causal = torch.ones(20, 20, dtype=torch.bool).tril()[None].expand(2, 20, 20)
        dense = model(tokens, mask=causal, input_pos=torch.arange(20)[None].expand(2, 20))
    print(f"gemma3 scaling={scaling}: max |logit diff| {diff:.2e}")
    assert diff < 1e-5, diff
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
    check_model_matches_checkpoint(model, {"_component_": "gemma3"}, {"checkpoint_dir": str(tmp_path / "ckpt")})
    assert "6 of its attention layers have a sliding window" in packing_unsupported_reason(model)

    lora = lora_gemma3(["q_proj", "v_proj", "output_proj"], True, **TINY_GEMMA3, rope_scaling_factor=scaling,
                       lora_rank=4, lora_alpha=8)
    lora.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(lora.eval()(tokens), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.peer
def test_gemma3_multimodal_checkpoint_language_model_and_export(tmp_path):
    """A 4B-style checkpoint (Gemma3ForConditionalGeneration: text_config, a vision tower): the
    language model loads, its logits equal the text model's, and the export holds every weight
    (vision included) under its own name, loadable by transformers."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from prefopt.models.gemma3 import gemma3

    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=_gemma3_text_config(transformers, 8.0).to_dict(),
                                    vision_config=vision.to_dict(), mm_tokens_per_image=4)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    _randomise_norms(hf, 0.0)
    hf.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    model, ckpt = _load(gemma3(**TINY_GEMMA3, rope_scaling_factor=8.0), tmp_path / "ckpt", "GEMMA3", tmp_path / "out")
    tokens = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        diff = (model(tokens) - ref).abs().max().item()
        ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    assert diff < 1e-5, diff
    saved = load_file(tmp_path / "out" / "epoch_0" / "model-00001-of-00001.safetensors")
    original = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert set(saved) == set(original)
    for k in original:
        torch.testing.assert_close(saved[k], original[k], atol=0, rtol=0)
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "out" / "epoch_0").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=tokens).logits, ref, atol=1e-5, rtol=1e-5)
    check_model_matches_checkpoint(model, {"_component_": "gemma3"}, {"checkpoint_dir": str(tmp_path / "ckpt")})


@pytest.mark.peer
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_qk_norm_models_greedy_through_the_kv_cache_equals_transformers(tmp_path, family):
    """Greedy decoding through torchtune's KV cache (prefopt.generation, a left-padded batch of
    prompts of 3-14 tokens, Gemma 3's local layers' window of 5 shorter than most) picks, token
    for token, what transformers' generate picks for each prompt alone."""
    transformers = pytest.importorskip("transformers")
    from prefopt.generation import generate_batch
    from prefopt.models.gemma3 import gemma3
    from prefopt.models.qwen3 import qwen3

    if family == "qwen3":
        hf = _qwen3_standin(tmp_path / "ckpt", tied=False)
    else:
        torch.manual_seed(0)
        hf = transformers.Gemma3ForCausalLM(_gemma3_text_config(transformers, None)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)  # far from a fresh init's near-uniform outputs: greedy choices are clear
    hf.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    ours = qwen3(**TINY_QWEN3, tie_word_embeddings=False) if family == "qwen3" else gemma3(**TINY_GEMMA3)
    model, _ = _load(ours, tmp_path / "ckpt", family.upper(), tmp_path / "out")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 14, 8)]
    rows = prompts + prompts[:1]  # a repeated prompt: the shared prefill
    got = generate_batch(model, rows, seeds=[0] * 4, max_new_tokens=12, temperature=0.0)
    for p, mine in zip(rows, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=12,
                              min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert mine.tokens == ref, (family, len(p))
    assert len({tuple(x.tokens) for x in got}) > 1  # the prompts lead to different answers
