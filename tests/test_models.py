"""The configured model must be the checkpoint's (issue 24): the start-up check of
prefopt.models.match, Mistral 7B v0.2's RoPE θ, Gemma 2's soft-caps and feed-forward norms, and
the soft-cap in the fused log-prob path. The ``peer`` tests compare logits with transformers on
tiny seeded stand-ins saved with ``save_pretrained`` and loaded through torchtune's checkpointer."""

import json
import shutil

import pytest
import torch
from conftest import REPO, TINY, load_recipe
from omegaconf import OmegaConf

from prefopt.models.match import CheckpointMismatchError, check_model_matches_checkpoint

# The fields of each shipped real config's checkpoint config.json (copied from the hub files),
# so that every builder is checked against the model the config's header downloads.
_LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False, max_position_embeddings=131072,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))
_LLAMA32 = dict(model_type="llama", vocab_size=128256, intermediate_size=8192, num_key_value_heads=8, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False, max_position_embeddings=131072,
                rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
_QWEN25 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False,
               sliding_window=32768, max_position_embeddings=32768)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, rope_scaling=None, attention_bias=False, use_sliding_window=False,
              sliding_window=None, max_position_embeddings=40960)


def _gemma3_mm(**text) -> dict:
    return dict(model_type="gemma3", text_config=dict(model_type="gemma3_text", rope_scaling=dict(
        factor=8.0, rope_type="linear"), sliding_window=1024, **text), vision_config=dict(model_type="siglip_vision_model"))


HUB_CONFIGS = {
    "llama3_1/8B": _LLAMA31_8B,
    "llama3_2/1B": dict(_LLAMA32, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64),
    "llama3_2/3B": dict(_LLAMA32, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128),
    "qwen2_5/0.5B": dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_5/1.5B": dict(_QWEN25, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_5/3B": dict(_QWEN25, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2_5/7B": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    # mistralai/Mistral-7B-Instruct-v0.2
    "mistral/7B": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
                       max_position_embeddings=32768),
    # mistralai/Mistral-7B-v0.1 (the ORPO config's base model): RoPE θ 1e4, a 4096-token sliding window
    "mistral/7B-v0.1": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                            rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                            max_position_embeddings=32768),
    # google/gemma-2-9b-it (no tie_word_embeddings key: Gemma2Config's default, True)
    "gemma2/9B": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      rms_norm_eps=1e-6, rope_theta=10000.0, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, query_pre_attn_scalar=256, sliding_window=4096,
                      max_position_embeddings=8192),
    # Qwen/Qwen3-{0.6B,...,32B}: config.json (transformers 4.51 format)
    **{f"qwen3/{size}": dict(_QWEN3, **dims) for size, dims in {
        "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                     tie_word_embeddings=True),
        "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     tie_word_embeddings=True),
        "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                   tie_word_embeddings=True),
        "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                   tie_word_embeddings=False),
        "14B": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                    tie_word_embeddings=False),
        "32B": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                    tie_word_embeddings=False),
    }.items()},
    # google/gemma-3-1b-it (text-only, gemma3_text)
    "gemma3/1B": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                      sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
                      final_logit_softcapping=None, attn_logit_softcapping=None, max_position_embeddings=32768),
    # google/gemma-3-{4b,12b,27b}-it (gemma3: the language model's fields in text_config, most left
    # to Gemma3TextConfig's defaults)
    "gemma3/4B": _gemma3_mm(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34),
    "gemma3/12B": _gemma3_mm(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                             num_key_value_heads=8),
    "gemma3/27B": _gemma3_mm(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
                             num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168),
}
REAL_CONFIGS = sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "tiny")
# configs whose checkpoint is not their family's model of that size in HUB_CONFIGS: its own entry
CONFIG_CHECKPOINTS = {"mistral/7B_orpo_lora_single_device": "mistral/7B-v0.1"}


def hub_key(family: str, stem: str) -> str:
    """The HUB_CONFIGS key of configs/<family>/<stem>.yaml's checkpoint (its header's download)."""
    return CONFIG_CHECKPOINTS.get(f"{family}/{stem}", f"{family}/{stem.split('_')[0]}")


def _hub_config(path) -> dict:
    key = hub_key(path.parent.name, path.stem)
    assert key in HUB_CONFIGS, f"add the checkpoint config.json fields of {path} to HUB_CONFIGS"
    return HUB_CONFIGS[key]


def _check(model_cfg, hf_cfg: dict, tmp_path):
    """check_model_matches_checkpoint on a meta-device build of ``model_cfg`` against a folder
    holding ``hf_cfg`` as its config.json."""
    from torchtune import config

    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with torch.device("meta"):
        model = config.instantiate(model_cfg)
    check_model_matches_checkpoint(model, model_cfg, OmegaConf.create({"checkpoint_dir": str(tmp_path)}))


@pytest.mark.parametrize("path", REAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_real_config_builds_its_checkpoints_model(path, tmp_path):
    import prefopt  # noqa: F401  (registers ${prefopt_assets:...})

    _check(OmegaConf.load(path).model, _hub_config(path), tmp_path)


def test_check_names_each_field_of_the_old_mistral_config(tmp_path):
    """Item 1: torchtune's lora_mistral_7b (v0.1, θ 1e4) on Mistral-7B-Instruct-v0.2 stops at start-up."""
    old = OmegaConf.load(REPO / "configs/mistral/7B_simpo_lora_single_device.yaml").model
    old._component_ = "torchtune.models.mistral.lora_mistral_7b"
    with pytest.raises(CheckpointMismatchError) as e:
        _check(old, HUB_CONFIGS["mistral/7B"], tmp_path)
    msg = str(e.value)
    assert "model: rope_theta 10000.0 (lora_mistral_7b) vs 1000000.0 (checkpoint config.json)" in msg
    assert msg.count("\n  model: ") == 1, msg  # θ is the only difference
    # a v0.1 checkpoint (sliding window 4096) with the v0.2 builder: two fields, both named
    v01 = dict(HUB_CONFIGS["mistral/7B"], rope_theta=10000.0, sliding_window=4096)
    new = OmegaConf.load(REPO / "configs/mistral/7B_simpo_lora_single_device.yaml").model
    with pytest.raises(CheckpointMismatchError) as e:
        _check(new, v01, tmp_path)
    assert "model: rope_theta 1000000.0 (lora_mistral_7b_v02) vs 10000.0 (checkpoint config.json)" in str(e.value)
    assert "model: sliding_window None (lora_mistral_7b_v02) vs 4096 (checkpoint config.json)" in str(e.value)


def test_check_names_torchtunes_gemma2_caps(tmp_path):
    old = OmegaConf.create({"_component_": "torchtune.models.gemma2.lora_gemma2_9b", "lora_attn_modules": ["q_proj"]})
    with pytest.raises(CheckpointMismatchError) as e:
        _check(old, HUB_CONFIGS["gemma2/9B"], tmp_path)
    msg = str(e.value)
    assert "model: attn_logit_softcapping 30.0 (lora_gemma2_9b) vs 50.0 (checkpoint config.json)" in msg
    assert ("model: final_logit_softcapping None (caps the normed hidden state at 50.0 instead) (lora_gemma2_9b) "
            "vs 30.0 (checkpoint config.json)") in msg


def test_check_dimensions_heads_eps_bias_tying(tmp_path):
    """A user's own wrong builder: every differing field in one error, with both values."""
    hf = json.loads((TINY / "model" / "config.json").read_text())
    hf.update(num_key_value_heads=4, rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True, vocab_size=500)
    model_cfg = OmegaConf.load(REPO / "configs/tiny/simpo_lora.yaml").model
    with pytest.raises(CheckpointMismatchError) as e:
        _check(model_cfg, hf, tmp_path)
    lines = [ln.strip() for ln in str(e.value).splitlines() if ln.strip().startswith("model: ")]
    assert lines == [
        "model: vocab_size 512 (lora_llama2) vs 500 (checkpoint config.json)",
        "model: num_key_value_heads 2 (lora_llama2) vs 4 (checkpoint config.json)",
        "model: rms_norm_eps 1e-05 (lora_llama2) vs 1e-06 (checkpoint config.json)",
        "model: tie_word_embeddings False (lora_llama2) vs True (checkpoint config.json)",
        "model: qkv_bias False (lora_llama2) vs True (checkpoint config.json)",
    ]


def test_check_skips_without_config_json(tmp_path, caplog):
    import logging

    from torchtune.models.llama2 import llama2

    with torch.device("meta"):
        model = llama2(vocab_size=32, num_layers=1, num_heads=2, num_kv_heads=2, embed_dim=16, max_seq_len=8)
    with caplog.at_level(logging.INFO, logger="prefopt.models.match"):
        check_model_matches_checkpoint(model, {"_component_": "llama2"}, {"checkpoint_dir": str(tmp_path)})
    assert f"no config.json in {tmp_path}: the model's settings are not checked" in caplog.text


def _mismatched_tiny_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(TINY / "model", ckpt)
    hf = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**hf, "rope_theta": 1000000.0}))
    return ckpt


def test_lora_recipe_stops_at_start_up_on_a_mismatch(tmp_path):
    import prefopt  # noqa: F401

    lora = load_recipe("simpo_lora_single_device")
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/tiny/simpo_lora.yaml"), OmegaConf.from_dotlist([
        f"output_dir={tmp_path}/o", f"checkpointer.checkpoint_dir={_mismatched_tiny_checkpoint(tmp_path)}"]))
    with pytest.raises(CheckpointMismatchError, match=r"rope_theta 10000.0 \(lora_llama2\) vs 1000000.0"):
        lora.SimPORecipeSingleDevice(cfg)


def test_full_recipe_stops_at_start_up_on_a_mismatch(tmp_path):
    import torch.distributed as dist

    import prefopt  # noqa: F401

    full = load_recipe("simpo_full_distributed")
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs/tiny/simpo_full.yaml"), OmegaConf.from_dotlist([
        f"output_dir={tmp_path}/o", f"checkpointer.checkpoint_dir={_mismatched_tiny_checkpoint(tmp_path)}"]))
    try:
        with pytest.raises(CheckpointMismatchError, match=r"rope_theta 10000.0 \(llama2\) vs 1000000.0"):
            full.SimPORecipeDistributed(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------- fused soft-cap
def test_fused_logps_apply_the_soft_cap_to_each_logit():
    """linear_token_logps with a cap = log_softmax(c * tanh(h W^T / c)), values and gradients,
    across chunks (5 chunks of 128-row minimum: one here, so also with MIN_CHUNK_ROWS lowered)."""
    from unittest import mock

    from prefopt import logprobs

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 16, generator=g) * 3).requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 3).requires_grad_()
    t = torch.randint(0, 50, (300,), generator=g)
    cap = 5.0
    ref = torch.log_softmax(torch.tanh(h @ w.t() / cap) * cap, dim=-1).gather(-1, t[:, None]).squeeze(-1)
    gr = torch.autograd.grad((ref * torch.linspace(-1, 1, 300)).sum(), (h, w))
    with mock.patch.object(logprobs, "MIN_CHUNK_ROWS", 16):
        out = logprobs.linear_token_logps(h, w, t, num_chunks=5, logit_soft_cap=cap)
        go = torch.autograd.grad((out * torch.linspace(-1, 1, 300)).sum(), (h, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    uncapped = logprobs.linear_token_logps(h, w, t, num_chunks=5)
    assert (uncapped - ref).abs().max() > 0.1  # the cap matters at these scales
    with pytest.raises(ValueError, match="logit_soft_cap must be > 0"):
        logprobs.linear_token_logps(h, w, t, logit_soft_cap=0.0)


TINY_GEMMA2 = dict(vocab_size=128, num_layers=4, num_heads=4, head_dim=16, num_kv_heads=2, embed_dim=64,
                   intermediate_dim=96, max_seq_len=64, sliding_window_size=5, query_pre_attn_scalar=16)


def test_gemma2_fused_logps_equal_the_models_own_logits():
    """The recipes' fused path (scored positions only, cap per chunk) gives the log-probs and
    gradients of the model's own capped logits, for the full and the LoRA builder."""
    from prefopt.logprobs import model_sequence_logps, sequence_logps
    from prefopt.models.gemma2 import gemma2, lora_gemma2

    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 12))
    labels = tokens.clone()
    labels[:, :5] = -100
    for build in (lambda: gemma2(**TINY_GEMMA2, final_logit_softcapping=2.0),
                  lambda: lora_gemma2(["q_proj", "v_proj"], True, **TINY_GEMMA2, final_logit_softcapping=2.0,
                                      lora_rank=4, lora_alpha=8)):
        model = build()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        ref = sequence_logps(model(tokens), labels).logps
        g_ref = torch.autograd.grad(ref.sum(), model.tok_embeddings.weight)[0]
        out = model_sequence_logps(model, tokens, labels).logps
        g_out = torch.autograd.grad(out.sum(), model.tok_embeddings.weight)[0]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- transformers parity
def _hf_standin(tmp_path, family: str, scale: float = 1.0):
    """A seeded tiny transformers model saved with save_pretrained (config.json + safetensors);
    Gemma 2's norm weights are randomised (transformers initialises them all to 0, which hides
    a swap of two norms)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "mistral":
        cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
        hf = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=64, sliding_window=5, query_pre_attn_scalar=16,
                                        attn_implementation="eager")
        hf = transformers.Gemma2ForCausalLM(cfg)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.normal_(0, 0.5)
                elif "proj" in n:
                    p.mul_(scale)  # large attention scores: where the attention cap bites
    hf.eval().save_pretrained(tmp_path / family, safe_serialization=True)
    return hf


def _load(model, tmp_path, family: str):
    from torchtune.training import FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(tmp_path / family), checkpoint_files=["model.safetensors"],
                                   model_type=family.upper(), output_dir=str(tmp_path / "out"))
    model.load_state_dict(ckpt.load_checkpoint()["model"])
    return model.eval()


@pytest.mark.peer
def test_mistral_v02_logits_equal_transformers(tmp_path):
    """Item 2: θ = 1e6 as the v0.2 builder builds it equals MistralForCausalLM; θ = 1e4 (torchtune's
    lora_mistral_7b) does not, and the start-up check names it for this checkpoint."""
    from torchtune.models.mistral import mistral

    from prefopt.models.mistral import lora_mistral_7b_v02

    hf = _hf_standin(tmp_path, "mistral")
    tiny = dict(vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=96,
                max_seq_len=64, norm_eps=1e-6)
    tokens = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits
        new = _load(mistral(**tiny, rope_base=1e6), tmp_path, "mistral")
        old = _load(mistral(**tiny), tmp_path, "mistral")
        diff_new, diff_old = (new(tokens) - ref).abs().max().item(), (old(tokens) - ref).abs().max().item()
    assert diff_new < 1e-5, diff_new
    assert diff_old > 1e-3, diff_old
    with torch.device("meta"):
        assert lora_mistral_7b_v02(["q_proj"]).layers[0].attn.pos_embeddings.base == 1e6
    with pytest.raises(CheckpointMismatchError, match=r"rope_theta 10000.0 \(mistral\) vs 1000000.0"):
        check_model_matches_checkpoint(old, {"_component_": "mistral"}, {"checkpoint_dir": str(tmp_path / "mistral")})
    check_model_matches_checkpoint(new, {"_component_": "mistral"}, {"checkpoint_dir": str(tmp_path / "mistral")})


@pytest.mark.peer
@pytest.mark.parametrize("scale", [1.0, 20.0], ids=["plain", "large-scores"])
def test_gemma2_logits_and_fused_logps_equal_transformers(tmp_path, scale):
    """Item 3: our Gemma 2 (attention cap 50, final cap 30 on the logits, the feed-forward norms
    where transformers has them) equals Gemma2ForCausalLM (eager attention); torchtune's does not.
    The recipes' fused path gives HF's sequence log-probs."""
    from torchtune.models.gemma2 import gemma2 as tt_gemma2

    from prefopt.logprobs import model_sequence_logps
    from prefopt.models.gemma2 import gemma2, lora_gemma2

    hf = _hf_standin(tmp_path, "gemma2", scale)
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (2, 12))
    labels = tokens.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = _load(gemma2(**TINY_GEMMA2), tmp_path, "gemma2")
        theirs = _load(tt_gemma2(**TINY_GEMMA2, hidden_capping_value=30.0, final_capping_value=50.0), tmp_path, "gemma2")
        diff_ours, diff_theirs = (ours(tokens) - ref).abs().max().item(), (theirs(tokens) - ref).abs().max().item()
        hf_logps = torch.log_softmax(ref[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        hf_logps = (hf_logps * (labels[:, 1:] != -100)).sum(-1) / (labels[:, 1:] != -100).sum(-1)
        fused = model_sequence_logps(ours, tokens, labels).logps
    assert diff_ours < 1e-5, diff_ours
    assert diff_theirs > 1e-2, diff_theirs
    torch.testing.assert_close(fused, hf_logps, atol=1e-5, rtol=1e-5)
    # the LoRA builder with its adapters at zero is the same model
    lora = lora_gemma2(["q_proj", "v_proj"], True, **TINY_GEMMA2, lora_rank=4, lora_alpha=8)
    lora.load_state_dict(ours.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(lora.eval()(tokens), ours(tokens), atol=1e-6, rtol=1e-6)
    check_model_matches_checkpoint(ours, {"_component_": "gemma2"}, {"checkpoint_dir": str(tmp_path / "gemma2")})
