"""Scoring (prompt, response) pairs: a reward model or any Python callable, behind one ``score``.

Two kinds of the config's ``reward`` block, built by :func:`build_reward`:

- a reward model (``_component_: prefopt.reward.reward_model``): a Hugging Face
  ``*ForSequenceClassification`` checkpoint with ONE output (e.g. Skywork-Reward-Llama-3.1-8B-v0.2),
  loaded through torchtune's checkpointer (``model_type: REWARD`` maps ``score.weight`` to the
  decoder's ``output.weight``) into a torchtune decoder whose output layer has one class
  (:func:`classifier`, or torchtune's ``llama2_classifier``/``mistral_classifier``). Whole
  conversations are laid out by the reward model's own tokenizer and template, scored in batches
  of similar length, each at its last token (princeton's ``reward_model_annotate.py`` scores one
  response at a time);
- any callable ``(prompt, response) -> float`` named by ``_component_`` (rule-based or verifiable
  rewards; the block's other keys are bound as keyword arguments), e.g.
  :func:`example_rule_reward`.

Shared by ``recipes/generate_preference_pairs.py`` and the judge of trained generations.
"""

import contextlib
import functools
import importlib
import inspect
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config, training
from torchtune.data import Message
from torchtune.modules import TransformerDecoder

from prefopt.attention import SharedPrefixRows, use_packed_attention
from prefopt.cpu_linear import packed_linears
from prefopt.generation import output_at_one_position
from prefopt.packing import MIN_FLEX_LEN, PAD, SHARED, common_prefix, packed_attention_mask, packing_unsupported_reason

__all__ = [
    "Reward",
    "RewardModel",
    "CallableReward",
    "reward_model",
    "classifier",
    "build_reward",
    "reward_bound_args",
    "reward_head_problem",
    "prompt_text",
    "example_rule_reward",
    "topic_rule_reward",
    "well_formed",
    "TINY_TOPICS",
    "reward_settings",
    "shared_prefix_layout",
    "shared_rows",
]


def prompt_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt as one string for a callable reward: the content of its last user message
    (the question being answered; princeton's ``prompt`` column)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


class Reward:
    """What a reward is: ``score(prompts, responses) -> [float]`` (``prompts[i]`` a list of
    ``{"role", "content"}`` messages, ``responses[i]`` the assistant's text), plus ``name`` (for
    the output file) and the throughput counters ``items``, ``tokens`` and ``seconds``."""

    name: str = "reward"

    def __init__(self) -> None:
        self.items = 0
        self.tokens = 0  # tokens of the conversations a reward model scored (0 for a callable)
        self.seconds = 0.0

    def score(self, prompts: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str]) -> List[float]:
        raise NotImplementedError

    def packed(self) -> ContextManager[Any]:
        """A block in which the reward's model (if it has one) keeps its CPU linear layers packed for
        oneDNN (:func:`prefopt.cpu_linear.packed_linears`), so a loop of ``score`` calls packs once."""
        return contextlib.nullcontext()


class CallableReward(Reward):
    """A Python callable ``fn(prompt: str, response: str) -> float`` as a :class:`Reward`;
    ``prompt`` is :func:`prompt_text` of the prompt's messages."""

    def __init__(self, fn: Callable[[str, str], float], name: str) -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def score(self, prompts, responses) -> List[float]:
        t0 = time.perf_counter()
        out = [float(self.fn(prompt_text(p), r)) for p, r in zip(prompts, responses)]
        self.seconds += time.perf_counter() - t0
        self.items += len(out)
        return out


class RewardModel(Reward):
    """A one-output classifier decoder scoring whole conversations.

    Args:
        model: a torchtune ``TransformerDecoder`` whose ``output`` maps to 1 value, on ``device``.
        tokenizer: the reward model's torchtune tokenizer (its template lays out the conversation).
        batch_size (int): conversations per forward.
        add_eos (bool): keep the tokenizer's final end-of-sequence token after the last turn's
            end-of-turn tokens. torchtune's Llama 3 tokenizer appends ``<|end_of_text|>`` after
            ``<|eot_id|>``; Hugging Face's Llama 3 chat template (what Skywork's and ArmoRM's
            cards score with) does not, so the default drops it and the score is read at ``<|eot_id|>``.
        device: where the model is.
        name (str): what the output file names as the reward.
        flex_attention (Optional[bool]): how a row of a prompt and its k responses attends
            (:mod:`prefopt.attention`): FlexAttention with a ``BlockMask`` (True; compiled once
            per process, on the CPU with a C++ compiler), or one SDPA call per prompt and per
            response (False). Both compute only what a response may see, never another
            response's tokens. Default (None): True on CUDA (one fused kernel a layer), False
            elsewhere (no compile, and faster on the CPU: ``benchmarks/results/generation.md``).

    Raises:
        ValueError: a model whose output layer does not have exactly one output, or
            ``flex_attention`` for a model whose attention takes no arbitrary mask.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8, add_eos: bool = False,
                 device: torch.device = torch.device("cpu"), name: str = "reward model",
                 flex_attention: Optional[bool] = None) -> None:
        super().__init__()
        out_features = getattr(getattr(model, "output", None), "out_features", None)
        if out_features != 1:
            raise ValueError(f"the reward model's output layer has {out_features} outputs; a reward model has exactly 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.add_eos = add_eos
        self.device = torch.device(device)
        self.name = name
        if flex_attention and not self._shares_prefixes:
            raise ValueError(f"reward.flex_attention: {packing_unsupported_reason(self.model)}")
        if flex_attention and self._row_limit < MIN_FLEX_LEN:
            raise ValueError(f"reward.flex_attention: the reward model's max_seq_len ({self._row_limit}) is under "
                             f"FlexAttention's shortest row ({MIN_FLEX_LEN} positions, prefopt.packing.MIN_FLEX_LEN)")
        wanted = self.device.type == "cuda" if flex_attention is None else bool(flex_attention)
        self.flex_attention = wanted and self._shares_prefixes and self._row_limit >= MIN_FLEX_LEN
        if self._shares_prefixes:
            use_packed_attention(self.model)  # our masks to FlexAttention / per-part SDPA, None to torchtune's SDPA

    def encode(self, prompt: Sequence[Mapping[str, str]], response: str) -> List[int]:
        """Token ids of the conversation ``prompt + [assistant: response]`` in the reward
        model's template, ending with the last turn's end tokens."""
        msgs = [Message(role=m["role"], content=m["content"], masked=True) for m in prompt]
        msgs.append(Message(role="assistant", content=response, masked=False))
        ids, _ = self.tokenizer.tokenize_messages(msgs, add_end_tokens=True)
        ids = list(ids)
        if not self.add_eos and len(ids) > 1 and ids[-1] == self.tokenizer.eos_id:
            ids = ids[:-1]
        return ids

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[Sequence[int]], groups: Optional[Sequence[Any]] = None) -> List[float]:
        """The score of each token sequence: the output at its last token.

        Without ``groups``, sequences are sorted by length and scored ``batch_size`` at a time,
        right-padded: with a causal mask a token never sees the padding after it, so no mask is
        needed and a padded row scores what it would alone.

        With ``groups`` (a key per sequence, e.g. its prompt), the sequences of a group are laid
        out in one row as their common token prefix once, then each one's remaining tokens
        (:func:`shared_prefix_layout`): the prompt of k responses is computed once, not k times.
        A row's mask lets each response see the prefix and itself only, and its positions
        continue the prefix's, so each scores what it would alone (to float rounding); the mask
        is a ``BlockMask`` (``flex_attention``) or a :class:`prefopt.attention.SharedPrefixRows`,
        neither of which computes what a response may not see. Forwards
        hold whole groups of up to ``batch_size`` sequences (a larger group alone). Models whose
        attention takes no arbitrary mask (:func:`prefopt.packing.packing_unsupported_reason`)
        are scored without it.

        Only the scored positions go through the head.

        Raises:
            ValueError: an empty sequence, one longer than the model's ``max_seq_len``, or
                ``len(groups) != len(sequences)``.
        """
        lens = [len(s) for s in sequences]
        limit = self.model.max_seq_len
        if lens and (min(lens) == 0 or max(lens) > limit):
            raise ValueError(f"a conversation of {max(lens) if min(lens) else 0} tokens: the reward model scores 1..{limit} tokens")
        if groups is not None and len(groups) != len(sequences):
            raise ValueError(f"{len(groups)} group keys for {len(sequences)} sequences")
        t0 = time.perf_counter()
        with self.packed():  # on CPU: oneDNN on packed weights (packed once if the caller's block did)
            if groups is not None and self._shares_prefixes:
                scores = self._score_shared(sequences, groups)
            else:
                scores = self._score_padded(sequences)
        self.tokens += sum(lens)
        self.seconds += time.perf_counter() - t0
        self.items += len(sequences)
        return scores

    def _score_padded(self, sequences: Sequence[Sequence[int]]) -> List[float]:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        scores: List[float] = [0.0] * len(sequences)
        pad = getattr(self.tokenizer, "pad_id", 0) or 0
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            lens = [len(sequences[i]) for i in idx]
            batch = torch.full((len(idx), max(lens)), pad, dtype=torch.long)
            for r, i in enumerate(idx):
                batch[r, :lens[r]] = torch.tensor(sequences[i], dtype=torch.long)
            last = torch.tensor(lens, device=self.device) - 1
            with output_at_one_position(self.model, last):
                out = self.model(batch.to(self.device))  # [b, 1, 1]
            for r, v in zip(idx, out[:, 0, 0].float().tolist()):
                scores[r] = v
        return scores

    def _score_shared(self, sequences: Sequence[Sequence[int]], groups: Sequence[Any]) -> List[float]:
        members: Dict[Any, List[int]] = {}
        for i, key in enumerate(groups):
            members.setdefault(key, []).append(i)
        units = [(part, shared_prefix_layout([sequences[i] for i in part]))
                 for idx in members.values() for part in shared_rows(sequences, idx, self._row_limit)]
        units.sort(key=lambda u: u[1][0].numel())
        scores: List[float] = [0.0] * len(sequences)
        pad = getattr(self.tokenizer, "pad_id", 0) or 0
        start = 0
        while start < len(units):  # whole groups, up to batch_size sequences a forward
            end, count = start + 1, len(units[start][0])
            while end < len(units) and count + len(units[end][0]) <= self.batch_size:
                count += len(units[end][0])
                end += 1
            batch = units[start:end]
            width = max(u[1][0].numel() for u in batch)
            if self.flex_attention:  # FlexAttention's rows: at least two blocks (prefopt.attention)
                width = max(width, MIN_FLEX_LEN)
            most = max(len(u[0]) for u in batch)
            tokens = torch.full((len(batch), width), pad, dtype=torch.long)
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            last = torch.zeros((len(batch), most), dtype=torch.long)
            for r, (_, (ids, pos, parts, ends)) in enumerate(batch):
                n = ids.numel()
                tokens[r, :n], positions[r, :n] = ids, pos
                last[r, :ends.numel()] = ends
            mask = self._mask([u[1][2] for u in batch], width)
            with output_at_one_position(self.model, last.to(self.device)):
                out = self.model(tokens.to(self.device), mask=mask, input_pos=positions.to(self.device))  # [b, most, 1]
            values = out[..., 0].float().tolist()
            for r, (idx, _) in enumerate(batch):
                for j, i in enumerate(idx):
                    scores[i] = values[r][j]
            start = end
        return scores

    def _mask(self, parts: Sequence[torch.Tensor], width: int) -> Any:
        # parts: each row's shared_prefix_layout parts ([n], 0 for the prefix, j + 1 for response j)
        if not self.flex_attention:
            # one document a row, from its start: the prompt, then each response
            return SharedPrefixRows(docs=tuple(
                ((0, int((p == SHARED).sum()), tuple(torch.bincount(p)[1:].tolist())),) for p in parts))
        # the packed layout's BlockMask (prefopt.packing): a row is one document (its group), the
        # prefix SHARED, each response its own part; every padding position its own document
        doc = -1 - torch.arange(len(parts) * width).view(len(parts), width)
        kind = torch.full((len(parts), width), PAD, dtype=torch.long)
        for r, p in enumerate(parts):
            doc[r, :p.numel()], kind[r, :p.numel()] = r, p
        return packed_attention_mask(doc.to(self.device), kind.to(self.device), block_mask=True)

    def packed(self) -> ContextManager[Any]:
        return packed_linears(self.model)

    @property
    def _row_limit(self) -> int:
        # torchtune's decoder refuses rows longer than its max_seq_len (a row holds a prompt once
        # and several responses, more than any one conversation)
        return self.model.max_seq_len

    @functools.cached_property
    def _shares_prefixes(self) -> bool:
        return packing_unsupported_reason(self.model) is None

    def score(self, prompts, responses) -> List[float]:
        # a prompt's responses share its tokens up to the response: computed once (score_ids' groups)
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)],
                              groups=[json.dumps(p, sort_keys=True) for p in prompts])


def shared_rows(sequences: Sequence[Sequence[int]], members: Sequence[int], limit: int) -> List[List[int]]:
    """``members`` (indices into ``sequences``, one group) split, in order, into runs whose
    :func:`shared_prefix_layout` row has at most ``limit`` positions: each run as long as the next
    member still fits (its common prefix once, then each member's own tokens). Pure.

    Raises:
        ValueError: a member longer than ``limit`` alone.
    """
    runs: List[List[int]] = []
    run: List[int] = []
    for i in members:
        if len(sequences[i]) > limit:
            raise ValueError(f"a sequence of {len(sequences[i])} tokens does not fit a row of {limit}")
        if run and _layout_length([sequences[j] for j in run + [i]]) > limit:
            runs.append(run)
            run = []
        run.append(i)
    return runs + [run] if run else runs


def _prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    # the prefix all share (each sequence's with the first), every sequence keeping its last token
    first = np.asarray(sequences[0])
    return min([len(s) - 1 for s in sequences] + [common_prefix(first, np.asarray(s)) for s in sequences[1:]])


def _layout_length(sequences: Sequence[Sequence[int]]) -> int:
    p = _prefix_length(sequences)
    return p + sum(len(s) - p for s in sequences)


def shared_prefix_layout(sequences: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row holding ``sequences``: their common token prefix once (each keeps at least its
    last token of its own), then what each has after it, in order. Pure.

    Returns:
        (ids ``[n]``, positions ``[n]`` (each sequence's own: the prefix's, then continuing from
        it), parts ``[n]`` (0 = :data:`prefopt.packing.SHARED` for the prefix, ``j + 1`` for the
        ``j``-th sequence's own tokens: as ``doc_kind`` of :func:`prefopt.packing.packed_attention_mask`,
        causal within the prefix and within each part, which also sees the whole prefix, never
        another's part), ends ``[k]`` (the index in the row of each sequence's last token)).

    Raises:
        ValueError: no sequences, or an empty one.
    """
    if not sequences or min(map(len, sequences)) == 0:
        raise ValueError("shared_prefix_layout needs one or more non-empty sequences")
    first = sequences[0]
    p = _prefix_length(sequences)
    n = p + sum(len(s) - p for s in sequences)
    ids = torch.empty(n, dtype=torch.long)
    positions = torch.empty(n, dtype=torch.long)
    parts = torch.full((n,), SHARED, dtype=torch.long)
    ids[:p] = torch.tensor(list(first[:p]), dtype=torch.long)
    positions[:p] = torch.arange(p)
    ends = []
    at = p
    for j, s in enumerate(sequences):
        m = len(s) - p
        ids[at:at + m] = torch.tensor(list(s[p:]), dtype=torch.long)
        positions[at:at + m] = torch.arange(p, p + m)
        parts[at:at + m] = j + 1
        at += m
        ends.append(at - 1)
    return ids, positions, parts, torch.tensor(ends, dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# building from a config block


def classifier(base: str, num_classes: int = 1, **kwargs: Any) -> TransformerDecoder:
    """Any torchtune decoder builder (``base``, a dotted path such as
    ``torchtune.models.llama3_1.llama3_1_8b``) with its output layer replaced by a
    ``Linear(embed_dim, num_classes, bias=False)``: the shape a Hugging Face
    ``*ForSequenceClassification`` checkpoint loads into (torchtune 0.6 has classifier builders
    for Llama 2 and Mistral only). ``kwargs`` go to ``base``."""
    module, _, attr = base.rpartition(".")
    model = getattr(importlib.import_module(module), attr)(**kwargs)
    embed_dim = model.tok_embeddings.embedding_dim
    model.output = nn.Linear(embed_dim, num_classes, bias=False)
    return model


def reward_head_problem(checkpoint_dir: Any) -> Optional[str]:
    """Why the Hugging Face checkpoint in ``checkpoint_dir`` is not a one-output reward model,
    from its ``config.json`` alone (read before any weight): a ``num_labels``/``id2label`` of
    more than one class, or an architecture that is not ``*ForSequenceClassification``. None if
    it is one (or there is no config.json to tell)."""
    path = Path(str(checkpoint_dir)) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path} cannot be read ({e})"
    archs = cfg.get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    # transformers writes id2label only when it is not its default of 2 labels
    n = cfg.get("num_labels") or (len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else (2 if classifier else 1))
    if n != 1:
        return f"{path} declares a head of {n} outputs (num_labels/id2label); a reward model has exactly 1"
    archs = cfg.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        return f"{path}: architectures {archs} is not a *ForSequenceClassification reward model"
    return None


def reward_model(
    *,
    model: Mapping[str, Any],
    tokenizer: Mapping[str, Any],
    checkpointer: Mapping[str, Any],
    batch_size: int = 8,
    add_eos: bool = False,
    flex_attention: Optional[bool] = None,
    device: Any = "cpu",
    dtype: Any = torch.float32,
) -> RewardModel:
    """A :class:`RewardModel` from the config's sub-blocks (the recipe passes ``device`` and
    ``dtype``): the head checked from ``config.json``, the weights read by the checkpointer
    (``model_type: REWARD``), the model built on ``device`` in ``dtype`` and loaded strictly.

    Raises:
        ValueError: a head with more than one output (naming ``reward.checkpointer``), or weights
            that do not fit the model.
    """
    problem = reward_head_problem(checkpointer.get("checkpoint_dir"))
    if problem:
        raise ValueError(f"reward.checkpointer.checkpoint_dir: {problem}")
    device = torch.device(device)
    dtype = training.get_dtype(dtype, device=device) if isinstance(dtype, str) else dtype
    ckpt = config.instantiate(_as_config(checkpointer))
    state = ckpt.load_checkpoint()[training.MODEL_KEY]
    head = state.get("output.weight")
    if head is not None and head.shape[0] != 1:
        raise ValueError(f"reward.checkpointer: the checkpoint's score head has {head.shape[0]} outputs; a reward model has exactly 1")
    with training.set_default_dtype(dtype), device:
        net = config.instantiate(_as_config(model))
    net.load_state_dict(state, strict=True)
    tok = config.instantiate(_as_config(tokenizer))
    name = str(checkpointer.get("checkpoint_dir", "reward model"))
    return RewardModel(net, tok, batch_size=batch_size, add_eos=add_eos, device=device, name=name,
                       flex_attention=flex_attention)


reward_model.builds_reward = True  # build_reward: call it with device/dtype, do not wrap it


def _as_config(block: Any) -> DictConfig:
    return block if isinstance(block, DictConfig) else OmegaConf.create(dict(block))


def _target(block: Mapping[str, Any]) -> Any:
    module, _, attr = str(block["_component_"]).rpartition(".")
    return getattr(importlib.import_module(module), attr)


def reward_bound_args(block: Any) -> Tuple[str, ...]:
    """The arguments of the ``reward`` block's component that the recipe supplies (for
    :func:`prefopt.config.validate_config`): ``device``/``dtype`` of a reward-model builder, or
    the two positional ``(prompt, response)`` parameters of a scoring callable."""
    try:
        fn = _target(block)
    except Exception:  # noqa: BLE001 - validate_config reports the import error itself
        return ()
    if getattr(fn, "builds_reward", False):
        return ("device", "dtype")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params[:2])


def build_reward(block: Any, *, device: Any = "cpu", dtype: Any = torch.float32) -> Reward:
    """The :class:`Reward` of a config's ``reward`` block: a builder marked ``builds_reward``
    (:func:`reward_model`) is called with the block's keys plus ``device``/``dtype``; a class
    that is a :class:`Reward` is instantiated with the block's keys; any other callable is the
    scoring function, the block's other keys bound as keyword arguments.

    Raises:
        ImportError / AttributeError: the ``_component_`` cannot be imported.
        TypeError: the component is not callable.
    """
    fn = _target(block)
    kwargs = {k: v for k, v in block.items() if k != "_component_"}
    if getattr(fn, "builds_reward", False):
        return fn(**kwargs, device=device, dtype=dtype)
    if inspect.isclass(fn) and issubclass(fn, Reward):
        return fn(**OmegaConf.to_container(_as_config(kwargs), resolve=True))
    if not callable(fn):
        raise TypeError(f"reward._component_: {block['_component_']} is not callable")
    plain = OmegaConf.to_container(_as_config(kwargs), resolve=True) if kwargs else {}
    return CallableReward(functools.partial(fn, **plain) if plain else fn, name=str(block["_component_"]))


# ------------------------------------------------------------------------------------------------
# an example rule-based reward

_WORD = re.compile(r"[A-Za-z']+")
_STOP = frozenset("a an the in on at of to and or is are was were one line sentence about write describe tell me "
                  "what how why who give for with".split())


def example_rule_reward(prompt: str, response: str, target_words: int = 12) -> float:
    """A rule-based reward for one-sentence answers (the tiny data's kind), each term in [0, 1]:

    - form: starts with a capital letter, ends with ``.``, ``!`` or ``?``, one sentence;
    - no repetition: the share of distinct word bigrams (loops such as "Hi Hi Hi" score low);
    - length: 1 at ``target_words`` words, falling off linearly to 0 at 0 or twice as many, so
      that a longer answer is not a better one;
    - on topic: the share of the prompt's content words that the answer uses.

    Returns their sum (0..4); an empty response scores 0.
    """
    text = response.strip()
    words = _WORD.findall(text)
    if not words:
        return 0.0
    form = (text[0].isupper() + (text[-1] in ".!?") + (sum(text.count(c) for c in ".!?") == 1)) / 3
    bigrams = list(zip(words, words[1:]))
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    length = max(0.0, 1.0 - abs(len(words) - target_words) / target_words)
    topic_words = {w.lower() for w in _WORD.findall(prompt)} - _STOP
    used = {w.lower() for w in words}
    topic = len(topic_words & used) / len(topic_words) if topic_words else 0.0
    score = form + distinct + length + topic
    return score if math.isfinite(score) else 0.0


def reward_settings(reward: Reward) -> Dict[str, Any]:
    """What the output file records about the reward: its kind and name."""
    return {"kind": "reward_model" if isinstance(reward, RewardModel) else "callable", "name": reward.name}


# The tiny data's topics (prefopt/assets/tiny: "Write one sentence about the summer.") and the
# places, times and subjects of its sentences that fit each one. The tiny answers are drawn
# without regard to the topic, so a warm-up on them cannot teach this: what the on-policy loop
# (scripts/onpolicy_demo.sh) has to learn from its own samples. Each phrase fits ONE topic, so
# one fixed answer fits at most three topics (its subject, place and time): beating that needs
# answers that follow the prompt.
TINY_TOPICS: Dict[str, Tuple[str, ...]] = {
    "the weekend": ("on sunday", "on the hill"),
    "a small town": ("at the market", "in the city"),
    "a busy day": ("at noon", "at the station"),
    "the family": ("my brother", "my aunt", "before dinner"),
    "a trip": ("near the river", "in the forest"),
    "the house": ("in the kitchen", "behind the house", "by the window"),
    "an afternoon": ("after the rain", "yesterday"),
    "the summer": ("in the garden", "under the bridge"),
}


def well_formed(response: str, target_words: int = 11) -> float:
    """How well-formed a one-sentence answer is, in [0, 1]: the mean of its form (starts with a
    capital, ends with ``.``/``!``/``?``, one sentence), no repetition (distinct word bigrams,
    and no word said twice in a row), and its length (1 at ``target_words`` words, falling off
    linearly to 0 at 0 or twice as many: a longer answer is not a better one). 0 when empty."""
    text = response.strip()
    words = _WORD.findall(text)
    if not words:
        return 0.0
    form = (text[0].isupper() + (text[-1] in ".!?") + (sum(text.count(c) for c in ".!?") == 1)) / 3
    bigrams = list(zip(words, words[1:]))
    distinct = len(set(bigrams)) / len(bigrams) if bigrams else 1.0
    stutter = sum(a.lower() == b.lower() for a, b in bigrams)
    repetition = max(0.0, distinct - stutter / max(len(bigrams), 1))
    length = max(0.0, 1.0 - abs(len(words) - target_words) / target_words)
    return (form + repetition + length) / 3


def topic_rule_reward(
    prompt: str,
    response: str,
    topics: Optional[Mapping[str, Sequence[str]]] = None,
    target_words: int = 11,
    topic_weight: float = 1.0,
) -> float:
    """A rule-based reward that pays for what a warm-up on the tiny answers does not teach: an
    answer that fits the prompt's topic, on top of a well-formed sentence.

    ``well_formed(response) + topic_weight * fit`` (0 .. 1 + topic_weight), where ``fit`` is 1
    when the response contains (case-insensitively) one of the phrases of the topic the prompt
    names, else 0 (also 0 for a prompt naming none of ``topics``). ``topics`` maps a topic
    (found in the prompt, case-insensitively; the longest match wins) to its fitting phrases;
    the default is :data:`TINY_TOPICS`. Config use::

        reward:
          _component_: prefopt.reward.topic_rule_reward
          topic_weight: 1.0
    """
    topics = TINY_TOPICS if topics is None else topics
    p, r = prompt.lower(), " ".join(_WORD.findall(response.lower()))
    named = [t for t in topics if t.lower() in p]
    fit = 0.0
    if named:
        phrases = topics[max(named, key=len)]
        fit = float(any(" ".join(_WORD.findall(ph.lower())) in r for ph in phrases))
    score = well_formed(response, target_words) + topic_weight * fit if response.strip() else 0.0
    return score if math.isfinite(score) else 0.0
