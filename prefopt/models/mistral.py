"""Mistral 7B v0.2 / v0.3 builders: torchtune's ``mistral_7b`` family hard-codes v0.1's RoPE base
θ = 1e4, while v0.2 and v0.3 (what the Instruct checkpoints people download are) use θ = 1e6;
with θ = 1e4 the logits differ from transformers' by up to 1.25 on a tiny stand-in.

Neither v0.2 nor v0.3 has a sliding window (``sliding_window: null``), and torchtune's Mistral
has none either, so only θ differs from torchtune's 7B builders.

v0.1 (mistralai/Mistral-7B-v0.1, the base model of the ORPO config) has θ = 1e4, as torchtune's
builders, but a 4096-token sliding window, which torchtune's Mistral does not apply: torchtune's
``lora_mistral_7b`` (max_seq_len 32,768) differs from transformers' on longer inputs, and the
start-up check refuses it (``sliding_window None vs 4096``). The ``_v01`` builders take inputs of
up to 4096 tokens, where the window masks nothing: on every input they accept they are the
checkpoint's model.
"""

from functools import partial
from typing import List

from torchtune.models.mistral import lora_mistral, mistral
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES

__all__ = ["mistral_7b_v02", "lora_mistral_7b_v02", "qlora_mistral_7b_v02", "mistral_7b_v01", "lora_mistral_7b_v01"]

# mistralai/Mistral-7B-Instruct-v0.2's config.json (v0.3 is the same but for vocab_size 32768:
# pass the dimensions to torchtune's lora_mistral with rope_base=1e6 for it)
_V02 = dict(
    vocab_size=32_000,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    intermediate_dim=14336,
    max_seq_len=32768,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=1_000_000,
)


def mistral_7b_v02() -> TransformerDecoder:
    """Mistral 7B v0.2 (torchtune's ``mistral_7b`` with RoPE θ = 1e6)."""
    return mistral(**_V02)


def _lora_mistral_7b(
    dims: dict,
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """torchtune's ``lora_mistral`` with the arguments of its ``lora_mistral_7b`` and ``dims`` (a
    checkpoint's dimensions and RoPE base). The named builders below bind ``dims``."""
    return lora_mistral(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **dims,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )


lora_mistral_7b_v02 = partial(_lora_mistral_7b, _V02)
lora_mistral_7b_v02.__doc__ = "Mistral 7B v0.2 with LoRA: the arguments of torchtune's ``lora_mistral_7b``, RoPE θ = 1e6."

qlora_mistral_7b_v02 = partial(lora_mistral_7b_v02, quantize_base=True)
qlora_mistral_7b_v02.__doc__ = "Mistral 7B v0.2 with QLoRA (NF4 base weights under the LoRA layers)."

# mistralai/Mistral-7B-v0.1's config.json: θ 1e4 and sliding_window 4096; max_seq_len the window
# (see the module docstring)
_V01 = dict(_V02, rope_base=10_000, max_seq_len=4096)


def mistral_7b_v01() -> TransformerDecoder:
    """Mistral 7B v0.1 (RoPE θ = 1e4) for inputs of up to its 4096-token sliding window."""
    return mistral(**_V01)


lora_mistral_7b_v01 = partial(_lora_mistral_7b, _V01)
lora_mistral_7b_v01.__doc__ = """Mistral 7B v0.1 with LoRA: torchtune's ``lora_mistral_7b`` for inputs of up to its
4096-token sliding window (max_seq_len 4096, where the window masks nothing)."""
