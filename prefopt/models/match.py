"""Start-up check that the configured model is the checkpoint's model: what the config's model
builder builds (read off a meta-device instance: no memory, no weights) against the
checkpoint's Hugging Face ``config.json``, every mismatched field in one error.

Why: a builder that loads a checkpoint of another variant trains a different model with no
error at all whenever the parameter shapes agree: torchtune's ``lora_mistral_7b`` (RoPE θ 1e4)
on Mistral-7B-Instruct-v0.2 (θ 1e6), a Gemma 2 with its soft-caps swapped. Shapes are what the
state-dict load checks; everything else (θ, RoPE scaling, norm ε, caps, windows, biases) only
the numbers show.

Not compared: ``max_position_embeddings`` (a builder's ``max_seq_len`` only sizes the RoPE cache
and bounds the input; a smaller one fails loudly on a longer input), activations (no torchtune
builder makes them configurable).
"""

import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

__all__ = [
    "CheckpointMismatchError",
    "read_hf_config",
    "model_fields",
    "hf_config_fields",
    "mismatches",
    "check_model_matches_checkpoint",
]

log = logging.getLogger(__name__)

# transformers' defaults for the fields a config.json may leave out, per model_type
# (PretrainedConfig's tie_word_embeddings default is True; these families' configs set False).
_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma": True, "gemma2": True, "qwen3": False,
                 "gemma3_text": True, "gemma3": True}
_QK_NORM = ("qwen3", "gemma3_text", "gemma3")
# transformers' Gemma3TextConfig defaults: the hub's 4B/12B/27B text_config leaves most fields out
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                             rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                             sliding_window=4096, sliding_window_pattern=6, tie_word_embeddings=True)


class CheckpointMismatchError(ValueError):
    """The configured model and the checkpoint's ``config.json`` disagree (the message names
    every field with both values)."""


def read_hf_config(checkpoint_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    """The checkpoint's ``config.json`` as a dict, or None when there is none (torchtune or Meta
    format checkpoints, a folder without it).

    Raises:
        CheckpointMismatchError: if the file is there but is not a JSON object.
    """
    if not checkpoint_dir:
        return None
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: cannot be read as JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointMismatchError(f"{path}: not a JSON object")
    return cfg


def _out_features(m: nn.Module) -> Optional[int]:
    # nn.Linear (FrozenNF4Linear included) or torchtune's LoRALinear / DoRALinear
    return getattr(m, "out_features", None) or getattr(m, "out_dim", None)


def _has_bias(m: nn.Module) -> bool:
    if hasattr(m, "use_bias"):  # LoRALinear / DoRALinear
        return bool(m.use_bias)
    return getattr(m, "bias", None) is not None


def _window(w: Optional[int], max_seq_len: Optional[int]) -> Optional[int]:
    # a window at least the model's longest input never masks anything: the same as none
    if w is None or (max_seq_len is not None and w >= max_seq_len):
        return None
    return int(w)


def model_fields(model: nn.Module) -> Dict[str, Any]:
    """The comparable fields of a torchtune ``TransformerDecoder`` (meta-device or not), named as
    in ``config.json``; a field the model does not have (e.g. a soft-cap) is None.

    Raises:
        TypeError: if ``model`` is not a torchtune decoder (no ``tok_embeddings`` / ``layers``).
    """
    if not hasattr(model, "tok_embeddings") or not hasattr(model, "layers"):
        raise TypeError(f"{type(model).__name__} is not a torchtune TransformerDecoder")
    from torchtune.modules import TiedLinear

    # the global layers' RoPE (Gemma 3's local layers have one of their own: rope_local_base_freq)
    layer = next((lyr for lyr in model.layers if getattr(lyr.attn, "sliding_window_size", None) is None),
                 model.layers[0])
    attn = layer.attn
    rope = getattr(attn, "pos_embeddings", None)
    local = next((lyr.attn.pos_embeddings for lyr in model.layers
                  if getattr(lyr.attn, "sliding_window_size", None) is not None), None)
    norm = model.norm
    eps = getattr(norm, "eps", None)
    if eps is None and hasattr(norm, "rms_norm"):  # Gemma 2's final norm wraps its RMSNorm
        eps = norm.rms_norm.eps
    scaling = None
    if rope is not None and hasattr(rope, "scale_factor"):  # torchtune's Llama3ScaledRoPE
        scaling = {"rope_type": "llama3", "factor": float(rope.scale_factor),
                   "low_freq_factor": float(rope.low_freq_factor), "high_freq_factor": float(rope.high_freq_factor),
                   "original_max_position_embeddings": int(rope.old_context_len)}
    if rope is not None and hasattr(rope, "linear_factor"):  # prefopt.models.gemma3.LinearScaledRoPE
        scaling = {"rope_type": "linear", "factor": float(rope.linear_factor)}
    max_seq_len = getattr(model, "max_seq_len", None)
    final_cap = getattr(model.output, "logit_soft_cap", None)
    fields = {
        "vocab_size": model.tok_embeddings.num_embeddings,
        "hidden_size": model.tok_embeddings.embedding_dim,
        "num_hidden_layers": len(model.layers),
        "num_attention_heads": attn.num_heads,
        "num_key_value_heads": attn.num_kv_heads,
        "head_dim": attn.head_dim,
        "intermediate_size": _out_features(layer.mlp.w1),
        "rope_theta": float(rope.base) if rope is not None else None,
        "rope_scaling": scaling,
        "rms_norm_eps": float(eps) if eps is not None else None,
        "tie_word_embeddings": isinstance(model.output, TiedLinear),
        "qkv_bias": _has_bias(attn.q_proj),
        "qk_norm": getattr(attn, "q_norm", None) is not None,
        "attn_logit_softcapping": getattr(attn, "softcapping", None),
        "final_logit_softcapping": final_cap,
        "sliding_window": [_window(getattr(lyr.attn, "sliding_window_size", None), max_seq_len) for lyr in model.layers],
    }
    if local is not None and local is not rope:
        fields["rope_local_base_freq"] = float(local.base)
    if hasattr(attn, "q_scale"):  # prefopt.models.qk_norm.QKNormAttention: q pre-scaled for SDPA
        fields["query_pre_attn_scalar"] = round(attn.head_dim / attn.q_scale ** 2, 3)
    if hasattr(attn, "scaling"):  # Gemma 2's attention: scores scaled by query_pre_attn_scalar ** -0.5
        fields["query_pre_attn_scalar"] = round(attn.scaling ** -2, 3)
    if getattr(norm, "capping_value", None) is not None:
        # torchtune's Gemma2FinalNorm caps the normalised hidden state: not a cap of the logits
        fields["final_logit_softcapping"] = f"None (caps the normed hidden state at {norm.capping_value} instead)"
    return fields


def hf_config_fields(cfg: Dict[str, Any], max_seq_len: Optional[int] = None) -> Dict[str, Any]:
    """The same fields from a Hugging Face ``config.json`` dict, with transformers' defaults for
    what it leaves out; ``max_seq_len`` (the model's) decides which windows can matter."""
    if cfg.get("model_type") == "gemma3":  # Gemma 3 4B+: the language model's config is text_config
        cfg = {**_GEMMA3_TEXT_DEFAULTS, **(cfg.get("text_config") or {}), "model_type": "gemma3_text"}
    elif cfg.get("model_type") == "gemma3_text":
        cfg = {**_GEMMA3_TEXT_DEFAULTS, **cfg}
    model_type = cfg.get("model_type", "")
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    n_layers = cfg.get("num_hidden_layers") or 0
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    # transformers < 5 writes rope_theta and rope_scaling; 5 writes one rope_parameters dict
    # holding both (a dict per layer type for models with two RoPE bases: not read here)
    rope = cfg.get("rope_parameters") or {}
    local_rope = rope.get("sliding_attention") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one dict per layer type
    if not isinstance(rope.get("rope_theta", 0.0), (int, float)):
        rope = {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            scaling = {"rope_type": "llama3", "factor": float(scaling.get("factor")),
                       "low_freq_factor": float(scaling.get("low_freq_factor")),
                       "high_freq_factor": float(scaling.get("high_freq_factor")),
                       "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings"))}
        elif kind == "linear":
            scaling = {"rope_type": "linear", "factor": float(scaling.get("factor"))}
        elif kind == "default":
            scaling = None
    else:
        scaling = None
    # the sliding window per layer, as transformers applies it
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if model_type in ("llama", "gemma"):
        window = None
    layer_types = cfg.get("layer_types")
    if layer_types:
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    elif model_type == "gemma2":
        windows = [window if i % 2 == 0 else None for i in range(n_layers)]
    elif model_type == "gemma3_text":  # transformers' default layer_types
        pattern = cfg.get("sliding_window_pattern", 6)
        windows = [window if (i + 1) % pattern else None for i in range(n_layers)]
    else:
        windows = [window] * n_layers
    fields = {
        "vocab_size": cfg.get("vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads") or heads,
        "head_dim": head_dim,
        "intermediate_size": cfg.get("intermediate_size"),
        "rope_theta": float(theta),
        "rope_scaling": scaling,
        "rms_norm_eps": cfg.get("rms_norm_eps"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", _TIED_DEFAULT.get(model_type, True))),
        # Qwen 2 always has q/k/v biases (no config field); the others say so in attention_bias
        "qkv_bias": True if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
        # a per-head RMSNorm of q and k (no config field: the architecture has it)
        "qk_norm": model_type in _QK_NORM,
        "attn_logit_softcapping": cfg.get("attn_logit_softcapping"),
        "final_logit_softcapping": cfg.get("final_logit_softcapping"),
        "sliding_window": [_window(w, max_seq_len) for w in windows],
    }
    if model_type in ("gemma2", "gemma3_text"):
        fields["query_pre_attn_scalar"] = cfg.get("query_pre_attn_scalar", 256)
    if model_type == "gemma3_text":
        fields["rope_local_base_freq"] = float(local_rope.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
    return fields


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(field: str, value: Any) -> str:
    if field == "sliding_window" and isinstance(value, list):
        if len(set(value)) <= 1:
            return str(value[0] if value else None)
        return "[" + ", ".join(map(str, value[:4])) + (", ...]" if len(value) > 4 else "]") + " per layer"
    return str(value)


def mismatches(model: Dict[str, Any], checkpoint: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(field, model value, checkpoint value)`` for every field both sides have (the
    checkpoint's value not None, for fields a config.json may lack) and that differs."""
    out = []
    for field, theirs in checkpoint.items():
        if field not in model:
            continue
        ours = model[field]
        if theirs is None and field in ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
                                        "rms_norm_eps", "head_dim"):
            continue  # missing in config.json: nothing to compare
        if not _same(ours, theirs):
            out.append((field, ours, theirs))
    return out


def check_model_matches_checkpoint(model: nn.Module, model_cfg: Any, checkpointer_cfg: Any) -> None:
    """Raise if the configured model is not the checkpoint's; log and return if the checkpoint
    has no ``config.json`` to compare with.

    Args:
        model (nn.Module): the config's model, built on the meta device (any device works).
        model_cfg: the config's ``model`` node (its ``_component_`` names the builder).
        checkpointer_cfg: the config's ``checkpointer`` node (its ``checkpoint_dir`` holds the
            checkpoint's ``config.json``).

    Raises:
        CheckpointMismatchError: one error, one line per mismatched field with both values, e.g.
            ``model: rope_theta 10000.0 (lora_mistral_7b) vs 1000000.0 (checkpoint config.json)``.
    """
    checkpoint_dir = (checkpointer_cfg or {}).get("checkpoint_dir")
    hf = read_hf_config(checkpoint_dir)
    if hf is None:
        log.info(f"model vs checkpoint: no config.json in {checkpoint_dir}: the model's settings are not checked")
        return
    builder = str((model_cfg or {}).get("_component_", type(model).__name__)).rsplit(".", 1)[-1]
    try:
        ours = model_fields(model)
    except TypeError as e:
        log.info(f"model vs checkpoint: not checked ({e})")
        return
    found = mismatches(ours, hf_config_fields(hf, getattr(model, "max_seq_len", None)))
    if not found:
        log.info(f"model vs checkpoint: {builder} matches {Path(checkpoint_dir) / 'config.json'}")
        return
    lines = [f"model: {f} {_show(f, a)} ({builder}) vs {_show(f, b)} (checkpoint config.json)" for f, a, b in found]
    raise CheckpointMismatchError(
        f"the configured model is not the checkpoint's model ({Path(checkpoint_dir) / 'config.json'}); "
        "it would train a different model on these weights:\n  " + "\n  ".join(lines)
        + "\nUse the model builder made for this checkpoint (model._component_, or its arguments): e.g. "
        "prefopt.models.mistral.lora_mistral_7b_v02 for Mistral 7B v0.2 (_v01 for v0.1), prefopt.models.gemma2.* for Gemma 2, prefopt.models.qwen3.* / gemma3.* for Qwen3 / Gemma 3."
    )
