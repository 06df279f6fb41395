"""Qwen3 (dense: 0.6B, 1.7B, 4B, 8B, 14B, 32B): builders and tokenizer.

torchtune 0.6.1 (its last release) has no Qwen3: its Qwen3 builders were merged after it and
never released. Qwen3 is Qwen 2.5 with a per-head RMSNorm of q and k (before RoPE), no q/k/v
bias, and a head size of its own (``head_dim`` 128 at every size, not ``embed_dim / num_heads``);
the small sizes tie the output layer to the embedding. Built on :mod:`prefopt.models.qk_norm`;
the checkpoint loads with :class:`prefopt.models.checkpointer.HFCheckpointer` (``model_type:
QWEN3``); logits equal transformers' ``Qwen3ForCausalLM`` (tests/test_models.py).

The tokenizer is Qwen 2.5's byte-level BPE with Qwen3's added tokens; the last assistant turn
renders as Qwen3's chat template renders it with thinking off (:class:`Qwen3Tokenizer`).
"""

from functools import partial
from typing import List, Optional, Tuple

from torch import nn
from torchtune.data import Message
from torchtune.data._prompt_templates import _get_prompt_template
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS, Qwen2_5Tokenizer
from torchtune.modules import RMSNorm, TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.modules.peft import LORA_ATTN_MODULES
from torchtune.modules.transforms.tokenizers import parse_hf_tokenizer_json

from prefopt.models.qk_norm import qk_norm_decoder

__all__ = [
    "QWEN3_SPECIAL_TOKENS",
    "THINKING_OFF",
    "Qwen3Tokenizer",
    "qwen3_tokenizer",
    "qwen3",
    "lora_qwen3",
    "qwen3_0_6b",
    "qwen3_1_7b",
    "qwen3_4b",
    "qwen3_8b",
    "qwen3_14b",
    "qwen3_32b",
    "lora_qwen3_0_6b",
    "lora_qwen3_1_7b",
    "lora_qwen3_4b",
    "lora_qwen3_8b",
    "lora_qwen3_14b",
    "lora_qwen3_32b",
    "qlora_qwen3_8b",
]

# Qwen/Qwen3-*'s tokenizer.json added tokens: Qwen 2.5's, then the tool-response and think tags
QWEN3_SPECIAL_TOKENS = {
    **QWEN2_5_SPECIAL_TOKENS,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
# what Qwen3's template puts after "<|im_start|>assistant\n" with enable_thinking=False
THINKING_OFF = "<think>\n\n</think>\n\n"


class Qwen3Tokenizer(Qwen2_5Tokenizer):
    """torchtune's Qwen 2.5 tokenizer; a conversation ending in an assistant turn renders that
    turn as Qwen3's chat template does.

    Qwen3's template writes the last assistant turn (after the last user message) as
    ``<|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>``: with an
    empty reasoning for a plain answer, exactly what its generation prompt with
    ``enable_thinking=False`` ends in. So the prompt (masked) is the conversation up to and
    including ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``, the way the model is served
    without thinking, and the response (labelled) is the answer and ``<|im_end|>``: the empty
    think block counts in neither side's length. A response that carries its own
    ``<think>...</think>`` keeps it, normalised as the template does, as part of the response
    (the prompt then ends at ``assistant\\n``, thinking mode's generation prompt). Earlier turns
    render as Qwen 2.5's (Qwen3's template drops their think blocks; plain answers are the same).
    """

    def tokenize_messages(self, messages: List[Message], *, add_eos: bool = True) -> Tuple[List[int], List[bool]]:
        """(ids, mask): mask True where the label is ignored (the prompt). See the class."""
        last = messages[-1] if messages else None
        if last is None or last.role != "assistant" or last.ipython or len(last.content) != 1 \
                or last.content[0]["type"] != "text":
            return super().tokenize_messages(messages, add_eos=add_eos)
        ids, mask = super().tokenize_messages(messages[:-1], add_eos=False) if len(messages) > 1 else ([], [])
        text = last.content[0]["content"]
        head = "assistant\n"
        if "</think>" in text:  # as the template: reasoning and answer, each stripped of newlines
            reasoning = text.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            text = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n" + text.split("</think>")[-1].lstrip("\n")
        else:
            head, text = head + THINKING_OFF, text.lstrip("\n")
        head_ids = [self.im_start_id] + self.encode(head, add_bos=False, add_eos=False)
        body = self.encode(text, add_bos=False, add_eos=False) + ([self.eos_id] if add_eos else [])
        ids = ids + head_ids + body
        mask = mask + [True] * len(head_ids) + [last.masked] * len(body)
        if self.max_seq_len and len(ids) > self.max_seq_len:
            ids, mask = ids[: self.max_seq_len], mask[: self.max_seq_len]
        return ids, mask


def qwen3_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    prompt_template: Optional[str] = None,
) -> Qwen3Tokenizer:
    """Qwen3's tokenizer from its ``vocab.json`` and ``merges.txt`` (torchtune's
    ``qwen2_5_tokenizer`` arguments); the added tokens are :data:`QWEN3_SPECIAL_TOKENS` unless
    ``special_tokens_path`` (a ``tokenizer.json``) is given."""
    special = QWEN3_SPECIAL_TOKENS if special_tokens_path is None else parse_hf_tokenizer_json(special_tokens_path)
    template = _get_prompt_template(prompt_template) if prompt_template is not None else None
    return Qwen3Tokenizer(path=path, merges_file=merges_file, special_tokens=special, max_seq_len=max_seq_len,
                          prompt_template=template)


def _qwen3_parts(head_dim: int, max_seq_len: int, rope_base: float, norm_eps: float) -> dict:
    rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    return dict(norm=partial(RMSNorm, eps=norm_eps), activation=nn.SiLU, layer=TransformerSelfAttentionLayer,
                embedding=nn.Embedding, final_norm=partial(RMSNorm, eps=norm_eps),
                rope_and_window=lambda i: (rope, None))


def qwen3(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: int = 128,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
) -> TransformerDecoder:
    """A Qwen3 decoder: torchtune's ``qwen2`` arguments plus ``head_dim``, no q/k/v bias.

    Returns:
        TransformerDecoder: ``model(tokens [b, s])`` -> ``[b, s, vocab_size]`` logits.
    """
    return qk_norm_decoder(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
        attn_dropout=attn_dropout, tie_word_embeddings=tie_word_embeddings,
        **_qwen3_parts(head_dim, max_seq_len, rope_base, norm_eps),
    )


def lora_qwen3(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    head_dim: int = 128,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """:func:`qwen3` with LoRA: torchtune's ``lora_qwen2`` arguments plus ``head_dim``.

    Raises:
        ValueError: ``apply_lora_to_output`` with ``tie_word_embeddings``.
    """
    return qk_norm_decoder(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
        attn_dropout=attn_dropout, tie_word_embeddings=tie_word_embeddings,
        **_qwen3_parts(head_dim, max_seq_len, rope_base, norm_eps),
        lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base,
    )


# Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B}'s config.json (all: vocab 151936, head_dim 128, 8 KV
# heads, RoPE θ 1e6, rms_norm_eps 1e-6, max_position_embeddings 40960, no sliding window)
_COMMON = dict(vocab_size=151_936, num_kv_heads=8, head_dim=128, max_seq_len=40_960, rope_base=1_000_000.0,
               norm_eps=1e-6)
_SIZES = {
    "0_6b": dict(num_layers=28, num_heads=16, embed_dim=1024, intermediate_dim=3072, tie_word_embeddings=True),
    "1_7b": dict(num_layers=28, num_heads=16, embed_dim=2048, intermediate_dim=6144, tie_word_embeddings=True),
    "4b": dict(num_layers=36, num_heads=32, embed_dim=2560, intermediate_dim=9728, tie_word_embeddings=True),
    "8b": dict(num_layers=36, num_heads=32, embed_dim=4096, intermediate_dim=12288, tie_word_embeddings=False),
    "14b": dict(num_layers=40, num_heads=40, embed_dim=5120, intermediate_dim=17408, tie_word_embeddings=False),
    "32b": dict(num_layers=64, num_heads=64, embed_dim=5120, intermediate_dim=25600, tie_word_embeddings=False),
}


def _named(size: str):
    hub = "Qwen/Qwen3-" + size.replace("_", ".").upper()

    def full() -> TransformerDecoder:
        return qwen3(**_COMMON, **_SIZES[size])

    def lora(
        lora_attn_modules: List[LORA_ATTN_MODULES],
        apply_lora_to_mlp: bool = False,
        apply_lora_to_output: bool = False,
        lora_rank: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: bool = False,
    ) -> TransformerDecoder:
        return lora_qwen3(
            lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, **_COMMON, **_SIZES[size],
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora,
            quantize_base=quantize_base,
        )

    full.__name__, lora.__name__ = f"qwen3_{size}", f"lora_qwen3_{size}"
    full.__doc__ = f"Qwen3 {size.replace('_', '.').upper()} ({hub}'s config.json)."
    lora.__doc__ = f"Qwen3 {size.replace('_', '.').upper()} with LoRA: the arguments of torchtune's ``lora_qwen2_5_*``."
    return full, lora


qwen3_0_6b, lora_qwen3_0_6b = _named("0_6b")
qwen3_1_7b, lora_qwen3_1_7b = _named("1_7b")
qwen3_4b, lora_qwen3_4b = _named("4b")
qwen3_8b, lora_qwen3_8b = _named("8b")
qwen3_14b, lora_qwen3_14b = _named("14b")
qwen3_32b, lora_qwen3_32b = _named("32b")
qlora_qwen3_8b = partial(lora_qwen3_8b, quantize_base=True)
qlora_qwen3_8b.__doc__ = "Qwen3 8B with QLoRA (NF4 base weights under the LoRA layers)."
