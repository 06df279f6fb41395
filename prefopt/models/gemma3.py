"""Gemma 3 text models: 1B, and the language model inside the 4B/12B/27B checkpoints.

torchtune has no Gemma 3 (none released). Gemma 3 is Gemma 2's layer (four RMSNorms with the
``1 + weight`` scale, embeddings scaled by ``sqrt(embed_dim)``, tanh-GELU MLP, tied output) with
a per-head RMSNorm of q and k before RoPE, scores scaled by ``query_pre_attn_scalar ** -0.5``, no
soft-capping, and five local (sliding-window, RoPE θ 1e4) layers to one global layer (RoPE θ 1e6,
with a linear RoPE scaling of 8 in 4B/12B/27B). Built on :mod:`prefopt.models.qk_norm` with
:class:`prefopt.models.gemma2.Gemma2Layer`; checkpoints load with
:class:`prefopt.models.checkpointer.HFCheckpointer` (``model_type: GEMMA3``), which keeps the
vision tower of the 4B+ checkpoints aside and writes it back; logits equal transformers'
``Gemma3ForCausalLM`` (eager attention; tests/test_qk_norm_models.py).

The packed layout is not combined with the sliding window on CUDA (its FlexAttention block mask):
:func:`prefopt.packing.packing_unsupported_reason` sends these models to the padded layout.
"""

from functools import partial
from typing import List, Optional

import torch
from torch import nn
from torchtune.models.gemma.gemma_norm_embedding import GemmaNormEmbeddings
from torchtune.models.gemma.rms_norm import GemmaRMSNorm
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES

from prefopt.models.gemma2 import Gemma2Layer, named_builders
from prefopt.models.qk_norm import qk_norm_decoder

__all__ = [
    "LinearScaledRoPE",
    "gemma3",
    "lora_gemma3",
    "gemma3_1b",
    "gemma3_4b",
    "gemma3_12b",
    "gemma3_27b",
    "lora_gemma3_1b",
    "lora_gemma3_4b",
    "lora_gemma3_12b",
    "lora_gemma3_27b",
]


class LinearScaledRoPE(Qwen2RotaryPositionalEmbeddings):
    """Rotate-half RoPE with transformers' ``linear`` scaling: every frequency divided by
    ``linear_factor`` (positions read as ``pos / factor``). Same call as its base class."""

    def __init__(self, dim: int, max_seq_len: int, base: float, linear_factor: float):
        self.linear_factor = float(linear_factor)
        super().__init__(dim=dim, max_seq_len=max_seq_len, base=base)

    def rope_init(self):
        theta = 1.0 / (self.base ** (torch.arange(0, self.dim, 2)[: self.dim // 2].float() / self.dim))
        self.register_buffer("theta", theta / self.linear_factor, persistent=False)
        self.build_rope_cache(self.max_seq_len)


def _gemma3_parts(head_dim: int, embed_dim: int, max_seq_len: int, norm_eps: float, rope_base: float,
                  rope_local_base: float, rope_scaling_factor: Optional[float], sliding_window_size: int,
                  sliding_window_pattern: int) -> dict:
    if rope_scaling_factor is None:
        global_rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    else:
        global_rope = LinearScaledRoPE(head_dim, max_seq_len, rope_base, rope_scaling_factor)
    local_rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_local_base)
    norm = partial(GemmaRMSNorm, eps=norm_eps)

    def layer(**kw) -> Gemma2Layer:
        return Gemma2Layer(**kw, sa_scale=norm(embed_dim), mlp_scale=norm(embed_dim))

    def rope_and_window(i: int):
        # transformers' layer_types: layer i is global when (i + 1) % pattern == 0
        return (local_rope, sliding_window_size) if (i + 1) % sliding_window_pattern else (global_rope, None)

    return dict(norm=norm, activation=partial(nn.GELU, approximate="tanh"), layer=layer,
                embedding=GemmaNormEmbeddings, final_norm=norm, rope_and_window=rope_and_window,
                tie_word_embeddings=True)


def gemma3(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    rope_local_base: float = 10_000.0,
    rope_scaling_factor: Optional[float] = None,
    sliding_window_size: int = 512,
    sliding_window_pattern: int = 6,
    query_pre_attn_scalar: float = 256,
) -> TransformerDecoder:
    """A Gemma 3 text decoder (``config.json`` names: ``rope_theta``, ``rope_local_base_freq``,
    ``rope_scaling.factor`` (linear), ``sliding_window``, ``sliding_window_pattern``,
    ``query_pre_attn_scalar``).

    Returns:
        TransformerDecoder: ``model(tokens [b, s])`` -> ``[b, s, vocab_size]`` logits.
    """
    return qk_norm_decoder(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
        attn_dropout=attn_dropout, query_pre_attn_scalar=query_pre_attn_scalar,
        **_gemma3_parts(head_dim, embed_dim, max_seq_len, norm_eps, rope_base, rope_local_base,
                        rope_scaling_factor, sliding_window_size, sliding_window_pattern),
    )


def lora_gemma3(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    rope_local_base: float = 10_000.0,
    rope_scaling_factor: Optional[float] = None,
    sliding_window_size: int = 512,
    sliding_window_pattern: int = 6,
    query_pre_attn_scalar: float = 256,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """:func:`gemma3` with LoRA (torchtune's ``lora_gemma2`` arguments; no LoRA on the output
    layer: it is tied to the embedding)."""
    return qk_norm_decoder(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
        attn_dropout=attn_dropout, query_pre_attn_scalar=query_pre_attn_scalar,
        **_gemma3_parts(head_dim, embed_dim, max_seq_len, norm_eps, rope_base, rope_local_base,
                        rope_scaling_factor, sliding_window_size, sliding_window_pattern),
        lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base,
    )


# google/gemma-3-1b-it's config.json, and the text_config of google/gemma-3-{4b,12b,27b}-it's (with
# Gemma3TextConfig's defaults for what it leaves out). max_seq_len sizes the RoPE caches only:
# 32768 (1B's max_position_embeddings; 4B+ allow 131072: pass max_seq_len to gemma3 for that).
_COMMON = dict(head_dim=256, max_seq_len=32_768, rope_base=1_000_000.0, rope_local_base=10_000.0,
               sliding_window_size=1024, query_pre_attn_scalar=256, rope_scaling_factor=8.0)
_SIZES = {
    "1b": dict(_COMMON, vocab_size=262_144, num_layers=26, num_heads=4, num_kv_heads=1, embed_dim=1152,
               intermediate_dim=6912, sliding_window_size=512, rope_scaling_factor=None),
    "4b": dict(_COMMON, vocab_size=262_208, num_layers=34, num_heads=8, num_kv_heads=4, embed_dim=2560,
               intermediate_dim=10240),
    "12b": dict(_COMMON, vocab_size=262_208, num_layers=48, num_heads=16, num_kv_heads=8, embed_dim=3840,
                intermediate_dim=15360),
    "27b": dict(_COMMON, vocab_size=262_208, num_layers=62, num_heads=32, num_kv_heads=16, embed_dim=5376,
                intermediate_dim=21504, head_dim=128, query_pre_attn_scalar=168),
}


def _named(size: str):
    return named_builders(f"gemma3_{size}", f"Gemma 3 {size.upper()}'s language model (google/gemma-3-{size}-it)",
                          gemma3, lora_gemma3, _SIZES[size])


gemma3_1b, lora_gemma3_1b = _named("1b")
gemma3_4b, lora_gemma3_4b = _named("4b")
gemma3_12b, lora_gemma3_12b = _named("12b")
gemma3_27b, lora_gemma3_27b = _named("27b")
