"""Gemma 2 builders that compute what transformers' ``Gemma2ForCausalLM`` computes.

torchtune 0.6.1's Gemma 2 builders differ in two ways (its last release; it is no longer
developed, so the fix lives here, built from its components):

* they pass the attention soft-cap 30 and the final one 50; Gemma 2's ``config.json`` has
  ``attn_logit_softcapping: 50.0`` and ``final_logit_softcapping: 30.0``;
* its ``Gemma2FinalNorm`` caps the normalised hidden state, not the logits;
* its GEMMA2 checkpoint conversion maps ``pre_feedforward_layernorm`` to ``mlp_scale`` (which
  torchtune's layer applies AFTER the MLP) and ``post_feedforward_layernorm`` to ``mlp_norm``
  (applied before): the two norms of every layer swap places. A stand-in made with
  transformers' own initialisation cannot show it (every Gemma norm weight starts at 0, so the
  two are equal); with random norm weights the logits differ by 0.60.

The caps alone: a max logit difference of 0.0097 on a tiny stand-in, 0.43 once attention scores
are large. Here the attention cap is 50 and the final cap applies to each logit,
``cap * tanh(logits / cap)``, in the output layer (:class:`SoftCappedTiedLinear`, whose
``logit_soft_cap`` :mod:`prefopt.logprobs`' fused path reads to cap each chunk of logits before
its log-softmax), and each layer is a :class:`Gemma2Layer`, which applies ``mlp_scale`` before
the MLP and ``mlp_norm`` after it: the norms the checkpointer loads under those names, in
transformers' order. Parameter names are torchtune's (the final norm stays ``norm.rms_norm``), so
``FullModelHFCheckpointer(model_type=GEMMA2)`` loads and saves these models unchanged.
"""

from functools import partial
from typing import List, Optional

import torch
from torch import nn
from torchtune.models.gemma.rms_norm import GemmaRMSNorm
from torchtune.models.gemma2 import _component_builders as _tt
from torchtune.modules import TiedLinear, TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.modules.peft import LORA_ATTN_MODULES

__all__ = [
    "SoftCappedTiedLinear",
    "Gemma2RMSNormFinal",
    "Gemma2Layer",
    "gemma2",
    "lora_gemma2",
    "gemma2_2b",
    "gemma2_9b",
    "gemma2_27b",
    "lora_gemma2_2b",
    "lora_gemma2_9b",
    "lora_gemma2_27b",
    "qlora_gemma2_2b",
    "qlora_gemma2_9b",
    "qlora_gemma2_27b",
]


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``, elementwise (Gemma 2's soft-capping); same shape and dtype."""
    return torch.tanh(x / cap) * cap


class SoftCappedTiedLinear(TiedLinear):
    """The tied output projection, then the final logit soft-cap ``cap * tanh(logits / cap)``.

    A ``TiedLinear`` (the recipes' checks of a tied output layer apply unchanged). Its
    ``linear`` submodule is the projection alone: the fused log-prob path runs that and caps each
    chunk itself (:func:`prefopt.logprobs.linear_token_logps`'s ``logit_soft_cap``).

    Args:
        tied_module (nn.Module): the token embedding whose weight is the output weight.
        logit_soft_cap (float): the cap (``final_logit_softcapping`` in ``config.json``), > 0.
    """

    def __init__(self, tied_module: nn.Module, logit_soft_cap: float):
        super().__init__(tied_module)
        self.logit_soft_cap = float(logit_soft_cap)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return soft_cap(super().__call__(x), self.logit_soft_cap)


class Gemma2RMSNormFinal(nn.Module):
    """The final norm alone (torchtune's ``Gemma2FinalNorm`` without its cap of the hidden
    state); the ``rms_norm`` submodule keeps the state-dict key ``norm.rms_norm.scale`` that
    torchtune's GEMMA2 conversion maps ``model.norm.weight`` to."""

    def __init__(self, embed_dim: int, eps: float):
        super().__init__()
        self.rms_norm = GemmaRMSNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x)


class Gemma2Layer(TransformerSelfAttentionLayer):
    """torchtune's self-attention layer with the feed-forward norms in the places torchtune's
    GEMMA2 checkpoint conversion loads them into: ``mlp_scale`` holds transformers'
    ``pre_feedforward_layernorm`` and ``mlp_norm`` its ``post_feedforward_layernorm``.

    ``x [b, s, d]`` -> ``[b, s, d]``: ``h = x + sa_scale(attn(sa_norm(x)))``, then
    ``h + mlp_norm(mlp(mlp_scale(h)))`` (transformers' ``Gemma2DecoderLayer``).
    """

    def forward(self, x: torch.Tensor, *, mask=None, input_pos: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        h = self.sa_norm(x)
        h = self.sa_scale(self.attn(h, h, mask=mask, input_pos=input_pos)) + x
        return h + self.mlp_norm(self.mlp(self.mlp_scale(h)))


def _as_gemma2_layer(layer: TransformerSelfAttentionLayer) -> Gemma2Layer:
    return Gemma2Layer(
        attn=layer.attn, mlp=layer.mlp, sa_norm=layer.sa_norm, mlp_norm=layer.mlp_norm,
        sa_scale=layer.sa_scale, mlp_scale=layer.mlp_scale,
    )


def _fixed(model: TransformerDecoder, embed_dim: int, norm_eps: float, final_cap: Optional[float]) -> TransformerDecoder:
    # torchtune's builder made a Gemma2FinalNorm (cap on the hidden state), a plain TiedLinear and
    # layers with the feed-forward norms swapped: replace those (same parameters and names, on
    # whatever device they were built on). model.layers is a ModuleList: replaced in place.
    for i, layer in enumerate(model.layers):
        model.layers[i] = _as_gemma2_layer(layer)
    model.norm = Gemma2RMSNormFinal(embed_dim, eps=norm_eps)
    if final_cap is not None:
        model.output = SoftCappedTiedLinear(model.tok_embeddings, final_cap)
    return model


def gemma2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: int = 10_000,
    attn_logit_softcapping: Optional[float] = 50.0,
    final_logit_softcapping: Optional[float] = 30.0,
    sliding_window_size: int = 4096,
    query_pre_attn_scalar: Optional[int] = None,
) -> TransformerDecoder:
    """A Gemma 2 decoder: torchtune's ``gemma2`` arguments, with the soft-caps named as in
    ``config.json`` and the final one applied to the logits. A sliding window on the even layers
    (0, 2, ...), as transformers does.

    Returns:
        TransformerDecoder: ``model(tokens [b, s])`` -> ``[b, s, vocab_size]`` float32 logits.
    """
    model = _tt.gemma2(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
        num_kv_heads=num_kv_heads, embed_dim=embed_dim, intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len, attn_dropout=attn_dropout, norm_eps=norm_eps, rope_base=rope_base,
        hidden_capping_value=attn_logit_softcapping, final_capping_value=1.0,  # the norm is replaced
        sliding_window_size=sliding_window_size, query_pre_attn_scalar=query_pre_attn_scalar,
    )
    return _fixed(model, embed_dim, norm_eps, final_logit_softcapping)


def lora_gemma2(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    head_dim: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: int = 10_000,
    attn_logit_softcapping: Optional[float] = 50.0,
    final_logit_softcapping: Optional[float] = 30.0,
    sliding_window_size: int = 4096,
    query_pre_attn_scalar: Optional[int] = None,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """:func:`gemma2` with LoRA (torchtune's ``lora_gemma2`` arguments; no LoRA on the output
    layer: it is tied to the embedding)."""
    model = _tt.lora_gemma2(
        lora_attn_modules, apply_lora_to_mlp,
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
        num_kv_heads=num_kv_heads, embed_dim=embed_dim, intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len, attn_dropout=attn_dropout, norm_eps=norm_eps, rope_base=rope_base,
        hidden_capping_value=attn_logit_softcapping, final_capping_value=1.0,  # the norm is replaced
        sliding_window_size=sliding_window_size, query_pre_attn_scalar=query_pre_attn_scalar,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return _fixed(model, embed_dim, norm_eps, final_logit_softcapping)


# google/gemma-2-{2b,9b,27b}(-it) config.json
_SIZES = {
    "2b": dict(vocab_size=256_000, num_layers=26, num_heads=8, head_dim=256, num_kv_heads=4, embed_dim=2304,
               intermediate_dim=9216, max_seq_len=8192, query_pre_attn_scalar=256),
    "9b": dict(vocab_size=256_000, num_layers=42, num_heads=16, head_dim=256, num_kv_heads=8, embed_dim=3584,
               intermediate_dim=14336, max_seq_len=8192, query_pre_attn_scalar=256),
    "27b": dict(vocab_size=256_000, num_layers=46, num_heads=32, head_dim=128, num_kv_heads=16, embed_dim=4608,
                intermediate_dim=36864, max_seq_len=8192, query_pre_attn_scalar=144),
}


def named_builders(name: str, title: str, full_builder, lora_builder, dims: dict):
    """``(full, lora)``: argument-free builders of one size (``dims``) of a tied-output family, named
    ``name`` / ``lora_<name>``; ``lora`` takes torchtune's ``lora_gemma2_*`` arguments (Gemma 2
    and Gemma 3 share it)."""

    def full() -> TransformerDecoder:
        return full_builder(**dims)

    def lora(
        lora_attn_modules: List[LORA_ATTN_MODULES],
        apply_lora_to_mlp: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: bool = False,
    ) -> TransformerDecoder:
        return lora_builder(
            lora_attn_modules, apply_lora_to_mlp, **dims, lora_rank=lora_rank, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base,
        )

    full.__name__, lora.__name__ = name, f"lora_{name}"
    full.__doc__ = f"{title}."
    lora.__doc__ = f"{title}, with LoRA: the arguments of torchtune's ``lora_gemma2_*``."
    return full, lora


def _named(size: str):
    return named_builders(f"gemma2_{size}", f"Gemma 2 {size.upper()} (google/gemma-2-{size}'s config.json)",
                          gemma2, lora_gemma2, _SIZES[size])


gemma2_2b, lora_gemma2_2b = _named("2b")
gemma2_9b, lora_gemma2_9b = _named("9b")
gemma2_27b, lora_gemma2_27b = _named("27b")
qlora_gemma2_2b = partial(lora_gemma2_2b, quantize_base=True)
qlora_gemma2_9b = partial(lora_gemma2_9b, quantize_base=True)
qlora_gemma2_27b = partial(lora_gemma2_27b, quantize_base=True)
