"""Batched sampling from a torchtune decoder: left-padded prompts, KV caches, stop tokens,
temperature / top-k / top-p, every row seeded on its own.

Built on ``torchtune.generation``'s pieces (the causal mask of a left-padded batch, the
right-shifted position ids, the stop-token tracker, the exponential-noise sampling trick) and
``torchtune.modules.local_kv_cache``; written as one loop here rather than a call to
``torchtune.generation.generate`` because that function

- keeps the logits of every generated position (``[rows, new tokens, vocab]`` in float32: 128k
  vocab x 4096 tokens x 25 rows is 50 GB), where sampling needs only the last position's;
- finds padding by comparing tokens with ``pad_id`` (a prompt that holds that id is mis-masked);
- draws one noise tensor for the whole batch from one generator, so a prompt's samples depend on
  which prompts share its batch; here each row has its own generator (:func:`row_seed`), so the
  same prompt, seed and settings give the same tokens in any batch position;
- has no top-p (nucleus) sampling, which princeton's on-policy data uses (top_p 0.95);
- runs every row's prompt and every row to the end: here the k samples of a prompt share one
  prefill, and rows that have stopped leave the batch.

Used by ``recipes/generate_preference_pairs.py`` and by the judge of trained generations.
"""

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torchtune.data import Message
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import KVCache, local_kv_cache

from prefopt.cpu_linear import packed_linears

__all__ = [
    "Generation",
    "filter_logits",
    "sample_tokens",
    "row_seed",
    "prompt_ids",
    "stop_token_ids",
    "generate_batch",
    "output_at_one_position",
]


@dataclass(frozen=True)
class Generation:
    """One sampled response: its token ids (without the stop token) and whether a stop token
    ended it (False: it ran to ``max_new_tokens``)."""

    tokens: List[int]
    stopped: bool

    @property
    def num_generated(self) -> int:
        """Tokens the model produced for it, the stop token included."""
        return len(self.tokens) + int(self.stopped)


# ------------------------------------------------------------------------------------------------
# sampling (pure)


def filter_logits(logits: torch.Tensor, *, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """``logits`` with every token outside the top-k and outside the nucleus set to ``-inf``.

    top-k keeps the ``top_k`` largest logits (ties with the k-th kept too, as torchtune's
    ``sample`` does); top-p then keeps the smallest set of most probable tokens whose probability
    sums to at least ``top_p`` (the most probable token always stays), computed on what top-k
    left, as Hugging Face's and vLLM's samplers do. Pure: the input is not changed.

    Args:
        logits (torch.Tensor): ``[..., vocab]``, already divided by the temperature.
        top_k (Optional[int]): keep this many tokens; None or 0: no top-k.
        top_p (Optional[float]): in (0, 1]; None or 1.0: no top-p.

    Returns:
        torch.Tensor: same shape and dtype.

    Raises:
        ValueError: ``top_k < 0`` or ``top_p`` outside (0, 1].
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k:
        pivot = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < pivot, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # probability of the tokens ranked above each one: a token is kept while that is < top_p,
        # so the set stops at the first token that brings the sum to top_p (and the first stays)
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The next token of each row: greedy (``temperature == 0``) or sampled.

    Sampling is torchtune's: ``argmax(probs / noise)`` with ``noise ~ Exponential(1)``, which
    draws from ``probs`` (the Gumbel-max trick in exponential form) and lets every row take its
    noise from its own generator.

    Args:
        logits (torch.Tensor): ``[rows, vocab]``.
        temperature (float): >= 0; 0 means greedy (top-k/top-p then change nothing).
        top_k, top_p: as in :func:`filter_logits`.
        noise (Optional[torch.Tensor]): ``[rows, vocab]`` Exponential(1) draws; required when
            ``temperature > 0``.

    Returns:
        torch.Tensor: ``[rows]`` int64 token ids.

    Raises:
        ValueError: a negative temperature, or sampling without ``noise``.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    if noise is None:
        raise ValueError("sampling (temperature > 0) needs the noise tensor")
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return (probs / noise).argmax(dim=-1)


def row_seed(seed: int, key: str) -> int:
    """The seed of one row's generator: a hash of the run's ``seed`` and ``key`` (e.g. the
    prompt's text), so that a prompt's samples depend on the prompt and the seed only, not on
    its batch, its position or the number of ranks. A 63-bit int (``torch.Generator.manual_seed``)."""
    digest = hashlib.sha256(json.dumps([int(seed), key]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------
# tokenizer side


def prompt_ids(tokenizer, messages: Sequence[dict]) -> List[int]:
    """Token ids of a prompt (a list of ``{"role", "content"}`` messages) as the policy's chat
    template lays it out for generation: the turns, then the assistant's opening (its header),
    no end tokens: what precedes a response's first token in the training layout.

    The conversation is tokenized with an empty assistant turn and with a one-letter one, both
    without end tokens (``add_end_tokens=False`` for torchtune's Llama tokenizers, ``add_eos=False``
    for Gemma's, Mistral's and Qwen's), and cut where the two differ: an end of turn that a
    template writes after the response (Gemma's ``<end_of_turn>``) is not part of the prompt.
    """
    import inspect

    params = inspect.signature(tokenizer.tokenize_messages).parameters
    end = {"add_end_tokens": False} if "add_end_tokens" in params else {"add_eos": False}

    def ids(response: str) -> List[int]:
        msgs = [Message(role=m["role"], content=m["content"], masked=True) for m in messages]
        msgs.append(Message(role="assistant", content=response, masked=False))
        return list(tokenizer.tokenize_messages(msgs, **end)[0])

    empty, one = ids(""), ids("x")
    n = next((i for i, (a, b) in enumerate(zip(empty, one)) if a != b), min(len(empty), len(one)))
    return empty[:n]


def check_prompts_fit(prompt_ids: Sequence[List[int]], keys: Sequence[str], max_new_tokens: int, *,
                      max_seq_len: int, vocab_size: int) -> None:
    """Before any weight is read: every prompt + ``max_new_tokens`` fits the policy's context, and
    the tokenizer's ids fit its vocabulary (else the tokenizer is another model's). Pure.

    Args:
        prompt_ids: [n] each prompt's token ids; keys: [n] each prompt's text (for the message).
        max_new_tokens (int): the longest response sampled.
        max_seq_len, vocab_size (int): the policy model's (read on a meta-device copy).

    Raises:
        ValueError: naming ``tokenizer`` or ``max_new_tokens``, the count and the longest prompt.
    """
    top = max(max(ids) for ids in prompt_ids)
    if top >= vocab_size:
        raise ValueError(f"tokenizer: gives token id {top}, but the policy model has {vocab_size} embeddings: "
                         "the tokenizer and model are of different models")
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    n = len(prompt_ids[longest])
    if n + max_new_tokens > max_seq_len:
        too_long = sum(len(ids) + max_new_tokens > max_seq_len for ids in prompt_ids)
        raise ValueError(
            f"max_new_tokens: {too_long} prompt(s) + max_new_tokens={max_new_tokens} exceed the policy's "
            f"context (model max_seq_len={max_seq_len}); the longest, prompt {longest}, has {n} tokens "
            f"({keys[longest][:80]!r}). Lower max_new_tokens or drop those prompts."
        )


def stop_token_ids(tokenizer, extra: Sequence = ()) -> List[int]:
    """The ids that end a response: the tokenizer's ``stop_tokens`` (EOS and, for Llama 3, the
    end-of-turn and end-of-message ids) plus ``extra`` (ids, or strings that encode to exactly
    one id, e.g. Gemma's ``"<end_of_turn>"``).

    Raises:
        ValueError: an ``extra`` string that is not one token.
    """
    ids = list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
    for s in extra:
        if isinstance(s, int):
            ids.append(s)
            continue
        enc = tokenizer.encode(s, add_bos=False, add_eos=False)
        if len(enc) != 1:
            raise ValueError(f"{s!r} is not one token of this tokenizer (it encodes to {enc})")
        ids.append(enc[0])
    return sorted(set(ids))


# ------------------------------------------------------------------------------------------------
# the loop


@contextmanager
def output_at_one_position(model: nn.Module, index: Optional[torch.Tensor] = None) -> Iterator[None]:
    """The model's output layer applied at one position per row only (the last, or ``index``
    ``[b]``), or at ``m`` positions per row (``index`` ``[b, m]``), through its own ``unembed``
    (so a final norm, soft-capping or a classifier head apply as they are): the forward returns
    ``[b, 1, out]`` (``[b, m, out]``), not ``[b, s, out]``."""
    orig = model.unembed

    def unembed(h: torch.Tensor) -> torch.Tensor:
        if index is None:
            return orig(h[:, -1:])
        rows = torch.arange(h.size(0), device=h.device)
        if index.dim() == 2:
            return orig(h[rows[:, None], index.to(h.device)])
        return orig(h[rows, index.to(h.device)].unsqueeze(1))

    model.unembed = unembed  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.unembed


def _take_cache_rows(model: nn.Module, index: torch.Tensor) -> None:
    """Every KV cache of ``model`` with its batch rows taken by ``index`` ``[n]`` (a row of the
    prefill batch per generated row; or the rows still decoding); their fill position is kept."""
    for cache in model.modules():
        if isinstance(cache, KVCache):
            cache.k_cache = cache.k_cache.index_select(0, index)
            cache.v_cache = cache.v_cache.index_select(0, index)
            cache.batch_size = index.numel()


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    seeds: Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    device: torch.device = torch.device("cpu"),
    cache_dtype: Optional[torch.dtype] = None,
    decode: Optional[Callable[..., torch.Tensor]] = None,
    cache_len: Optional[int] = None,
) -> List[Generation]:
    """Sample one response per row: ``prompts[i]`` continued with a generator seeded by ``seeds[i]``.

    Rows are left-padded to the longest prompt; the model gets torchtune's causal mask of the
    padded batch and right-shifted positions, so a padded row computes what it would alone. Rows
    with the same prompt (the k samples of one prompt) share its prefill: each distinct prompt
    is run once and its KV cache copied to its rows, which then decode apart. KV caches of
    ``longest prompt + max_new_tokens`` are set up for the batch and deleted after. Rows that
    have stopped leave the batch (their caches dropped) once a quarter of it has, so the steps
    after cost only the rows still decoding (not with a compiled ``decode``). The loop ends when
    every row has produced a stop token or ``max_new_tokens`` tokens. On CPU (without a compiled
    ``decode``) the linear layers run through oneDNN (:func:`prefopt.cpu_linear.packed_linears`;
    packed here unless the caller's block already did, once for all its batches).

    Args:
        model: a torchtune ``TransformerDecoder`` without caches set up (``num_output_chunks == 0``).
        prompts: token ids of each row's prompt (each non-empty), e.g. from :func:`prompt_ids`.
        seeds: one generator seed per row (see :func:`row_seed`); unused when greedy.
        max_new_tokens (int): >= 1.
        temperature, top_k, top_p: see :func:`sample_tokens` (``temperature == 0``: greedy).
        stop_tokens: ids that end a row (not included in its tokens).
        pad_id (int): the id fed at padded positions (masked out: its value does not matter).
        device: where the model is.
        cache_dtype: dtype of the KV caches (default: the model's).
        decode: what runs each one-token step, called as the model is (default: ``model``),
            e.g. ``torch.compile(model)``: the steps after the prefill are most of the time,
            have one shape per batch, and run the model as it is (the prefill, with its
            one-position output layer, stays eager).
        cache_len: the KV caches' length (default: longest prompt + ``max_new_tokens``); one
            length for every batch keeps a compiled ``decode``'s shapes, so it compiles once.

    Returns:
        List[Generation]: one per row, in order.

    Raises:
        ValueError: an empty prompt, ``len(seeds) != len(prompts)``, ``max_new_tokens < 1``, a
            prompt + ``max_new_tokens`` longer than ``model.max_seq_len`` or ``cache_len``, or
            a ``cache_len`` longer than ``model.max_seq_len``.
    """
    rows = len(prompts)
    if rows == 0:
        return []
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for {rows} prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("an empty prompt (no token ids)")
    longest = max(lengths)
    total = longest + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {total} exceeds the model's max_seq_len={model.max_seq_len}"
        )
    if cache_len is not None:
        if not total <= cache_len <= model.max_seq_len:
            raise ValueError(f"cache_len={cache_len}: must hold the longest prompt ({longest} tokens) + max_new_tokens="
                             f"{max_new_tokens} and be at most the model's max_seq_len={model.max_seq_len}")
        total = cache_len  # the caches and masks are this long; the positions after the last token stay unused
    cache_dtype = cache_dtype or next(model.parameters()).dtype

    # each distinct prompt once: row i decodes from distinct prompt source[i]'s prefill
    distinct: dict = {}
    source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    firsts = list(distinct)
    tokens = torch.full((len(firsts), longest), pad_id, dtype=torch.long)
    real_first = torch.zeros((len(firsts), total), dtype=torch.bool)
    for i, p in enumerate(firsts):
        tokens[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        real_first[i, longest - len(p):] = True  # the prompt's tokens and every generated position
    source_t = torch.tensor(source, dtype=torch.long, device=device)
    tokens, real_first = tokens.to(device), real_first.to(device)
    real = real_first.index_select(0, source_t)  # [rows, total]
    input_pos_first = get_position_ids_from_padding_mask(real_first)  # [distinct prompts, total]
    input_pos = input_pos_first.index_select(0, source_t)  # [rows, total]
    positions = torch.arange(total, device=device)

    sampling = temperature > 0
    # one per row still in the batch (see the compaction below)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds] if sampling else []
    vocab = model.tok_embeddings.num_embeddings

    def next_tokens(logits: torch.Tensor) -> torch.Tensor:
        noise = None
        if sampling:  # each row's draw from its own generator: independent of the batch
            noise = torch.stack([torch.empty(vocab, device=device).exponential_(1, generator=g) for g in generators])
        return sample_tokens(logits[:, -1].float(), temperature=temperature, top_k=top_k, top_p=top_p, noise=noise)

    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    out = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    ended_at = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    step = model if decode is None else decode  # (not `or`: a compiled module has no truth value)
    was_training = model.training
    model.eval()
    try:
        # on CPU the linear layers run on weights packed for oneDNN (not under a compiled decode)
        with packed_linears(model, enabled=decode is None), \
                local_kv_cache(model, batch_size=len(firsts), device=device, dtype=cache_dtype, decoder_max_seq_len=total):
            mask = get_causal_mask_from_padding_mask(real_first[:, :longest], target_seq_len=total)
            with output_at_one_position(model):
                logits = model(tokens, input_pos=input_pos_first[:, :longest], mask=mask)
            if len(firsts) < rows:
                logits = logits.index_select(0, source_t)
                _take_cache_rows(model, source_t)
            live_t = torch.arange(rows, device=device)  # batch row j is output row live_t[j]
            dropped_at = rows  # batch size at the last compaction
            for t in range(max_new_tokens):
                nxt = next_tokens(logits)
                out[live_t, t] = nxt
                hit = torch.isin(nxt, stop) & ~stopped[live_t]
                ended_at[live_t[hit]] = t
                stopped[live_t[hit]] = True
                done = stopped[live_t]
                n_done = int(done.sum())
                if t == max_new_tokens - 1 or n_done == live_t.numel():
                    break
                # Finished rows leave the batch once a quarter of it has finished (a forward costs
                # in proportion to its rows; copying the caches is cheap next to that, but not free).
                # Not with a compiled `decode`: its shapes must not change.
                if decode is None and n_done * 4 >= dropped_at:
                    keep = (~done).nonzero().squeeze(1)
                    _take_cache_rows(model, keep)
                    real, input_pos, nxt, live_t = real[keep], input_pos[keep], nxt[keep], live_t[keep]
                    generators = [generators[j] for j in keep.tolist()] if sampling else generators
                    dropped_at = live_t.numel()
                pos = longest + t  # the new token's position in the padded batch
                mask = (real & (positions <= pos))[:, None, :]  # [live rows, 1, total]
                logits = step(nxt[:, None], input_pos=input_pos[:, pos:pos + 1], mask=mask)  # [live rows, 1, vocab]
    finally:
        model.train(was_training)
    out, ended_at, stopped = out.tolist(), ended_at.tolist(), stopped.tolist()
    return [Generation(tokens=out[i][:ended_at[i]], stopped=stopped[i]) for i in range(rows)]
