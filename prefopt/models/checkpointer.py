"""Loading and saving Qwen3 and Gemma 3 Hugging Face checkpoints (safetensors) for the models of
:mod:`prefopt.models.qwen3` and :mod:`prefopt.models.gemma3`.

Why a subclass of torchtune's ``FullModelHFCheckpointer``: torchtune 0.6.1 picks the key
conversion from a closed ``ModelType`` enum, and none fits. Its ``QWEN2`` map has no q/k norm keys
(and ``get_mapped_key`` fails on an unknown key); its ``GEMMA2`` conversion permutes the q/k rows
for torchtune's interleaved RoPE, while these models use the rotate-half RoPE of the Hugging Face
weights (no permutation: the q/k norm scales stay aligned with their channels); and Gemma 3's
4B/12B/27B checkpoints hold a vision tower beside the language model. Everything else torchtune's
checkpointer does (shards and their index, the adapter files, copying ``config.json`` and the
tokenizer files to each ``epoch_<N>/``) is kept: :class:`HFCheckpointer` runs its QWEN2 path with
the QWEN2 conversion functions swapped for ours for the duration of each call (they are imported
by that path at call time).

The adapter is saved for PEFT without torchtune's Llama q/k permutation of ``lora_B`` (wrong for
rotate-half RoPE). ``model_type: QWEN2`` (Qwen 2 / 2.5) is the same fix alone: torchtune's own
QWEN2 conversion of the base weights (correct: it permutes nothing), and the adapter saved
without the permutation that torchtune's checkpointer applies to every adapter it converts
(issue 24 item 3: a Qwen 2.5 ``epoch_<N>/adapter/`` loaded with PEFT gave log-probs 0.017-0.028
off the trained model's, while the merged model was right).
"""

import contextlib
import re
from typing import Any, Dict, Iterator, Optional

import torch
from torchtune.models.qwen2 import _convert_weights as _qwen2
from torchtune.training import FullModelHFCheckpointer

__all__ = ["KEY_MAPS", "MODEL_TYPES", "HFCheckpointer", "hf_to_tune", "tune_to_hf", "tune_to_peft_adapter"]

# Hugging Face key (language model, "model." prefix) -> torchtune key; None: not loaded.
# Qwen3: torchtune's QWEN2 map (no bias keys occur) plus the q/k norms.
_QK_NORMS = {
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
}
_QWEN3 = {**_qwen2._FROM_HF, **_QK_NORMS}
# Gemma 3: four norms per layer in the places prefopt.models.gemma2.Gemma2Layer applies them
# (sa_scale after attention, mlp_scale before the MLP, mlp_norm after it), the final norm plain
_GEMMA3 = {
    **{k: v for k, v in _QWEN3.items() if "bias" not in k and "lm_head" not in k},
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.sa_scale.scale",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.mlp_scale.scale",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.mlp_norm.scale",
}
KEY_MAPS = {"QWEN3": _QWEN3, "GEMMA3": _GEMMA3}
# the model types HFCheckpointer takes: KEY_MAPS' (our conversion of everything), and QWEN2
# (torchtune's conversion of the base weights, ours of the adapter only)
ADAPTER_KEY_MAPS = {**KEY_MAPS, "QWEN2": _qwen2._FROM_HF}
MODEL_TYPES = tuple(ADAPTER_KEY_MAPS)
_TIED_DEFAULT = {"QWEN3": False, "GEMMA3": True}  # transformers' config defaults
# where a checkpoint keeps its language model: text-only, then Gemma 3's multimodal layouts
# (transformers < 4.52's "language_model.model." on the hub, >= 4.52's "model.language_model.")
_PREFIXES = ("model.", "language_model.model.", "model.language_model.")
_LAYER = re.compile(r"\.(\d+)\.")


def _abstract(key: str):
    m = _LAYER.search(key)
    return (key[: m.start()] + ".{}." + key[m.end():], m.group(1)) if m else (key, None)


def _map(key: str, table: Dict[str, Optional[str]]) -> Optional[str]:
    abstract, layer = _abstract(key)
    if abstract not in table:
        raise KeyError(f"unexpected checkpoint key {key!r}: not a Qwen 2 / Qwen3 / Gemma 3 language-model weight")
    new = table[abstract]
    return None if new is None else new.format(layer)


def language_model_prefix(keys) -> str:
    """The prefix the checkpoint's language-model keys carry (``model.`` for text-only ones).

    Raises:
        KeyError: no ``<prefix>embed_tokens.weight`` among ``keys``.
    """
    keys = set(keys)
    for p in _PREFIXES:
        if p + "embed_tokens.weight" in keys:
            return p
    raise KeyError("no embed_tokens.weight under " + ", ".join(_PREFIXES) + ": not a Qwen3 / Gemma 3 checkpoint")


def hf_to_tune(state_dict: Dict[str, torch.Tensor], model_type: str, tie_word_embeddings: bool):
    """(torchtune state dict of the language model, the other weights by their own keys, the
    language model's key prefix). The others (Gemma 3's vision tower and projector) are kept to be
    written back unchanged; a tied ``lm_head.weight`` and RoPE buffers are dropped."""
    table, prefix = KEY_MAPS[model_type], language_model_prefix(state_dict)
    head = "language_model." if prefix == "language_model.model." else ""  # its lm_head's prefix
    model, other = {}, {}
    for key, value in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key in (head + "lm_head.weight", "lm_head.weight"):
            if not tie_word_embeddings:
                model["output.weight"] = value
            continue
        if key.startswith(prefix):
            new = _map("model." + key[len(prefix):], table)
            if new is not None:
                model[new] = value
        else:
            other[key] = value
    return model, other, prefix


def tune_to_hf(state_dict: Dict[str, torch.Tensor], model_type: str, prefix: str = "model.",
               other: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_tune`: Hugging Face keys under ``prefix``, ``other`` added back."""
    inverse = {v: k for k, v in KEY_MAPS[model_type].items() if v is not None}
    out = {}
    for key, value in state_dict.items():
        if key == "output.weight":
            out["lm_head.weight"] = value
            continue
        hf = _map(key, inverse)
        out[prefix + hf[len("model."):]] = value
    out.update(other or {})
    return out


def tune_to_peft_adapter(state_dict: Dict[str, torch.Tensor], model_type: str,
                         prefix: str = "model.") -> Dict[str, torch.Tensor]:
    """torchtune adapter keys (``layers.0.attn.q_proj.lora_a.weight``) -> PEFT's
    (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``); values unchanged (no
    q/k permutation: the base weights are not permuted either). ``model_type``: one of
    :data:`MODEL_TYPES`."""
    inverse = {v: k for k, v in ADAPTER_KEY_MAPS[model_type].items() if v is not None}
    inverse["output.weight"] = "lm_head.weight"
    out = {}
    for key, value in state_dict.items():
        base, _, part = key.rpartition(".lora_")
        if part:  # lora_a.weight / lora_b.weight
            suffix = ".lora_" + part.replace("a.", "A.", 1).replace("b.", "B.", 1)
        else:  # DoRA's magnitude
            base, suffix = key.rsplit(".", 1)[0], ".lora_magnitude_vector"
        hf = _map(base + ".weight", inverse)[: -len(".weight")]
        hf = hf if hf == "lm_head" else prefix + hf[len("model."):]
        out["base_model.model." + hf + suffix] = value
    return out


class HFCheckpointer(FullModelHFCheckpointer):
    """torchtune's ``FullModelHFCheckpointer`` for Qwen 2 / 2.5, Qwen3 and Gemma 3 checkpoints.

    Args:
        checkpoint_dir, checkpoint_files, output_dir, **kwargs: as torchtune's.
        model_type (str): ``QWEN3`` or ``GEMMA3`` (not a torchtune ``ModelType``), or ``QWEN2``:
            torchtune's QWEN2 checkpointer but for the adapter, saved for PEFT unpermuted.

    ``load_checkpoint()["model"]`` is the language model's state dict in torchtune's names (a
    multimodal Gemma 3's other weights are held here and written back by ``save_checkpoint``, so
    an ``epoch_<N>/`` folder is the whole checkpoint, loadable as the original was).

    Raises:
        ValueError: an unknown ``model_type``.
    """

    def __init__(self, checkpoint_dir: str, checkpoint_files, model_type: str, output_dir: str, **kwargs: Any):
        if model_type not in MODEL_TYPES:
            raise ValueError(f"HFCheckpointer model_type {model_type!r}: one of {sorted(MODEL_TYPES)}")
        super().__init__(checkpoint_dir, checkpoint_files, "QWEN2", output_dir, **kwargs)
        self.family = model_type
        self._prefix = "model."
        self._other: Dict[str, torch.Tensor] = {}
        if model_type == "QWEN2":
            return
        # Gemma 3 4B+ keep the language model's settings in text_config; the QWEN2 path reads
        # these four fields before calling the (swapped) conversion, which ignores them
        text = dict(self._config.get("text_config") or self._config)
        for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
            text.setdefault(k, None)
        text.setdefault("tie_word_embeddings", self._config.get("tie_word_embeddings", _TIED_DEFAULT[model_type]))
        self._config = text

    @contextlib.contextmanager
    def _conversion(self) -> Iterator[None]:
        from torchtune.models import convert_weights

        def to_tune(state_dict, **_):
            model, self._other, self._prefix = hf_to_tune(state_dict, self.family, self._config["tie_word_embeddings"])
            return model

        swaps = [
            (convert_weights, "tune_to_peft_adapter_weights",
             lambda sd, **_: tune_to_peft_adapter(sd, self.family, self._prefix)),
        ]
        if self.family != "QWEN2":  # QWEN2: torchtune's own conversion of the base weights
            swaps += [
                (_qwen2, "qwen2_hf_to_tune", to_tune),
                (_qwen2, "qwen2_tune_to_hf", lambda sd, **_: tune_to_hf(sd, self.family, self._prefix, self._other)),
            ]
        saved = [(m, name, getattr(m, name)) for m, name, _ in swaps]
        try:
            for m, name, fn in swaps:
                setattr(m, name, fn)
            yield
        finally:
            for m, name, fn in saved:
                setattr(m, name, fn)

    def load_checkpoint(self) -> Dict[str, Any]:
        """torchtune's, with the conversion of :func:`hf_to_tune`."""
        with self._conversion():
            return super().load_checkpoint()

    def save_checkpoint(self, state_dict: Dict[str, Any], epoch: int, intermediate_checkpoint: bool = False,
                        adapter_only: bool = False) -> None:
        """torchtune's, with the conversion of :func:`tune_to_hf` and :func:`tune_to_peft_adapter`."""
        with self._conversion():
            super().save_checkpoint(state_dict, epoch, intermediate_checkpoint=intermediate_checkpoint,
                                    adapter_only=adapter_only)
