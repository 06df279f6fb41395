"""The decoder Qwen3 and Gemma 3 share: attention with a per-head RMSNorm of q and k applied
BEFORE RoPE, a head size independent of ``embed_dim / num_heads``, per-layer RoPE and sliding
windows; built from torchtune's components (its last release, 0.6.1, has neither family).

Why our own attention: torchtune 0.6.1's ``MultiHeadAttention`` takes ``q_norm``/``k_norm``
but applies them AFTER RoPE; transformers' ``Qwen3Attention`` and ``Gemma3Attention`` normalise
first. The norm's per-channel scale does not commute with the rotation, so torchtune's order
computes another model. :class:`QKNormAttention` is a ``MultiHeadAttention`` (torchtune's
recipes, LoRA utilities and prefopt's packed layout treat it as one) with the transformers order.

RoPE here is Qwen 2's (torchtune's ``Qwen2RotaryPositionalEmbeddings``: the rotate-half layout of
the Hugging Face weights), so checkpoints load without the q/k row permutation torchtune's Llama
conversion applies (:mod:`prefopt.models.checkpointer`).
"""

from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn
from torchtune.modules import FeedForward, FrozenNF4Linear, MultiHeadAttention, TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import reparametrize_as_dtype_state_dict_post_hook
from torchtune.modules.peft import LORA_ATTN_MODULES, DoRALinear, LoRALinear

__all__ = ["QKNormAttention", "window_mask", "qk_norm_decoder"]


def window_mask(seq_len: int, window: int, input_pos: Optional[torch.Tensor], device) -> torch.Tensor:
    """``[b or 1, s, s]`` bool, True where key ``kv`` is within ``window`` positions of query
    ``q`` (``pos[q] - pos[kv] < window``, transformers' sliding window), positions being
    ``input_pos`` (the packed layout's RoPE positions) or ``0..s-1``; causality is not included."""
    pos = input_pos if input_pos is not None else torch.arange(seq_len, device=device)[None]
    return (pos[:, :, None] - pos[:, None, :]) < window


class QKNormAttention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` with q/k normalised per head before RoPE, an optional
    sliding window and an optional score scale other than ``head_dim ** -0.5``.

    Args:
        sliding_window_size (Optional[int]): keys more than this many positions back are masked
            (None: full causal attention).
        query_pre_attn_scalar (Optional[float]): scores are scaled by its ``** -0.5`` (Gemma 3);
            None: ``head_dim ** -0.5``.
        **kwargs: ``MultiHeadAttention``'s arguments (``q_norm`` and ``k_norm`` required).

    ``forward(x [b, s, d], y=x, mask=None | [b, s, s] bool, input_pos=None | [b, s])`` ->
    ``[b, s, d]``. With torchtune's KV cache set up (``setup_cache``, e.g. by
    ``torchtune.modules.local_kv_cache``) it decodes as ``MultiHeadAttention`` does; ``mask`` is
    then required (``[b, s, cache length]``).
    """

    def __init__(self, *, sliding_window_size: Optional[int] = None, query_pre_attn_scalar: Optional[float] = None,
                 **kwargs):
        super().__init__(**kwargs)
        if self.q_norm is None:
            raise ValueError("QKNormAttention needs q_norm and k_norm")
        self.sliding_window_size = sliding_window_size
        # SDPA scales by head_dim ** -0.5: pre-scaling q by this factor gives the wanted scale
        self.q_scale = 1.0 if query_pre_attn_scalar is None else (self.head_dim / query_pre_attn_scalar) ** 0.5

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, *, mask=None,
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = x if y is None else y
        b, s_x, _ = x.shape
        s_y = y.shape[1]
        q = self.q_norm(self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim))
        v = self.v_proj(y).view(b, s_y, self.num_kv_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
            k = self.pos_embeddings(k, input_pos=input_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        q_index = None
        if self.kv_cache is not None and self.cache_enabled:
            # generation (torchtune's KV cache, set up by MultiHeadAttention.setup_cache): the new
            # keys join the cache; the caller's mask covers every cache slot
            q_index = self.kv_cache.cache_pos[:s_x].clone()  # the slots the new tokens fill
            k, v = self.kv_cache.update(k, v)
            s_y = k.shape[2]
        if self.num_heads != self.num_kv_heads:
            shape = (b, self.num_kv_heads, self.num_heads // self.num_kv_heads, s_y, self.head_dim)
            k = k.unsqueeze(2).expand(shape).flatten(1, 2)
            v = v.unsqueeze(2).expand(shape).flatten(1, 2)
        if self.sliding_window_size is not None:
            if mask is not None and not isinstance(mask, torch.Tensor):
                # prefopt.packing.packing_unsupported_reason keeps such models on the padded layout
                raise NotImplementedError("a sliding window with a FlexAttention BlockMask")
            if q_index is not None:
                # with a cache, slot distance is position distance (a left-padded row's slots and
                # positions differ by its padding); the mask the caller gives hides the padding
                if mask is None:
                    raise ValueError("QKNormAttention with a KV cache needs the mask over the cache")
                window = (q_index[:, None] - torch.arange(s_y, device=x.device)[None]) < self.sliding_window_size
                mask = mask & window[None]
            else:
                if mask is None:
                    mask = torch.ones(s_x, s_y, dtype=torch.bool, device=x.device).tril_()[None]
                mask = mask & window_mask(s_x, self.sliding_window_size, input_pos, x.device)
            mask = mask.expand(b, s_x, s_y)
        out = self._attention_call(
            q, k, v, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask is None and self.is_causal,
        )
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


def _linear(in_dim: int, out_dim: int, *, lora: bool, quantize_base: bool, lora_rank: int = 0,
            lora_alpha: float = 1.0, lora_dropout: float = 0.0, use_dora: bool = False) -> nn.Module:
    """A bias-free projection: LoRA (or DoRA) when ``lora``, else frozen NF4 under QLoRA, else plain."""
    if lora:
        cls = DoRALinear if use_dora else LoRALinear
        return cls(in_dim, out_dim, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, quantize_base=quantize_base)
    return FrozenNF4Linear(in_dim, out_dim, bias=False) if quantize_base else nn.Linear(in_dim, out_dim, bias=False)


def qk_norm_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    attn_dropout: float,
    norm: Callable[[int], nn.Module],
    activation: Callable[[], nn.Module],
    layer: Callable[..., nn.Module],
    embedding: Callable[[int, int], nn.Module],
    final_norm: Callable[[int], nn.Module],
    rope_and_window: Callable[[int], Tuple[nn.Module, Optional[int]]],
    tie_word_embeddings: bool,
    query_pre_attn_scalar: Optional[float] = None,
    lora_attn_modules: Optional[List[LORA_ATTN_MODULES]] = None,
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """A decoder of :class:`QKNormAttention` layers; the family's parts passed in.

    Args:
        norm: ``dim -> module``, the layers' RMSNorm (also q/k's, over ``head_dim``).
        activation: the MLP's gate activation (``nn.SiLU`` for Qwen3, tanh-GELU for Gemma 3).
        layer: ``TransformerSelfAttentionLayer``-like constructor taking ``attn, mlp, sa_norm,
            mlp_norm`` (and ``sa_scale, mlp_scale`` when given by the family via ``partial``).
        embedding, final_norm: the token embedding ``(vocab, dim)`` and the final norm ``(dim)``.
        rope_and_window: ``layer index -> (RoPE module, sliding window or None)``.
        lora_attn_modules: None for the full model; else LoRA on these projections (torchtune's
            ``lora_*`` arguments follow, with ``quantize_base`` for QLoRA).

    Returns:
        TransformerDecoder: ``model(tokens [b, s])`` -> ``[b, s, vocab_size]`` logits.

    Raises:
        ValueError: LoRA on a tied output layer.
    """
    lora_attn_modules = list(lora_attn_modules or [])
    quantize_base = quantize_base and bool(lora_attn_modules or apply_lora_to_mlp)
    lin = partial(_linear, quantize_base=quantize_base, lora_rank=lora_rank, lora_alpha=lora_alpha,
                  lora_dropout=lora_dropout, use_dora=use_dora)
    q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
    layers = nn.ModuleList()
    for i in range(num_layers):
        rope, window = rope_and_window(i)
        attn = QKNormAttention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=lin(embed_dim, q_dim, lora="q_proj" in lora_attn_modules),
            k_proj=lin(embed_dim, kv_dim, lora="k_proj" in lora_attn_modules),
            v_proj=lin(embed_dim, kv_dim, lora="v_proj" in lora_attn_modules),
            output_proj=lin(q_dim, embed_dim, lora="output_proj" in lora_attn_modules),
            pos_embeddings=rope, q_norm=norm(head_dim), k_norm=norm(head_dim), kv_cache=None,
            max_seq_len=max_seq_len, attn_dropout=attn_dropout, sliding_window_size=window,
            query_pre_attn_scalar=query_pre_attn_scalar,
        )
        mlp = FeedForward(
            gate_proj=lin(embed_dim, intermediate_dim, lora=apply_lora_to_mlp),
            down_proj=lin(intermediate_dim, embed_dim, lora=apply_lora_to_mlp),
            up_proj=lin(embed_dim, intermediate_dim, lora=apply_lora_to_mlp),
            activation=activation(),
        )
        layers.append(layer(attn=attn, mlp=mlp, sa_norm=norm(embed_dim), mlp_norm=norm(embed_dim)))
    tok_embeddings = embedding(vocab_size, embed_dim)
    if tie_word_embeddings:
        if apply_lora_to_output:
            raise ValueError("apply_lora_to_output with tie_word_embeddings: the output layer is the embedding")
        output = TiedLinear(tok_embeddings)
    else:  # as torchtune's builders: the output layer is never quantized
        output = _linear(embed_dim, vocab_size, lora=apply_lora_to_output, quantize_base=False, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora)
    model = TransformerDecoder(
        tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len, num_heads=num_heads,
        head_dim=head_dim, norm=final_norm(embed_dim), output=output,
    )
    if quantize_base:
        # as torchtune's QLoRA builders: NF4 weights leave the state dict in the model's dtype
        model._register_state_dict_hook(partial(reparametrize_as_dtype_state_dict_post_hook, offload_to_cpu=True))
    return model
