"""One tokenizer, two faces: text made of ``w<id>`` words maps to exactly the ids ``<id>``.

The benchmark's data set is pre-tokenized: every prompt and response is a string of ``w<id>``
words drawn from the model's full vocabulary. torchtune's recipes get :class:`WordTokenizer` (a
torchtune ``ModelTokenizer``: BOS + message tokens, EOS after each assistant message, like
``llama2_tokenizer`` without a prompt template); TRL gets :func:`hf_word_tokenizer` (a
``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model). Both give, for a pair with a
P-word prompt and R-word responses, the sequences ``BOS + prompt + response + EOS`` of
``P + R + 2`` tokens, so the three tools see identical token ids and counts.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_WORD_ID = 3  # ids 0..2 are special


def words(ids: List[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


class WordTokenizer:
    """torchtune ``ModelTokenizer`` + ``BaseTokenizer`` for ``w<id>`` text (component for configs)."""

    def __init__(self, vocab_size: int = 32000, max_seq_len: Optional[int] = None) -> None:
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self.special_tokens: Dict[str, int] = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, **_: Any) -> List[int]:
        ids = []
        for w in text.split():
            if w[0] != "w" or not w[1:].isdigit() or not FIRST_WORD_ID <= int(w[1:]) < self.vocab_size:
                raise ValueError(f"not a w<id> word of this vocabulary: {w!r}")
            ids.append(int(w[1:]))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, token_ids: List[int], **_: Any) -> str:
        return words([i for i in token_ids if i >= FIRST_WORD_ID])

    def tokenize_messages(
        self, messages: List[Any], *, add_start_tokens: bool = True, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        tokens: List[int] = []
        mask: List[bool] = []
        if add_start_tokens:
            tokens.append(self.bos_id)
            mask.append(bool(messages[0].masked))
        for m in messages:
            ids = self.encode(m.text_content, add_bos=False, add_eos=False)
            tokens += ids
            mask += [bool(m.masked)] * len(ids)
            if m.role == "assistant" and add_end_tokens:
                tokens.append(self.eos_id)
                mask.append(bool(m.masked))
        if self.max_seq_len is not None:
            tokens, mask = tokens[: self.max_seq_len], mask[: self.max_seq_len]
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        sample = dict(sample)
        tokens, mask = self.tokenize_messages(sample.pop("messages"))
        sample["tokens"], sample["mask"] = tokens, mask
        return sample


def hf_word_tokenizer(vocab_size: int = 32000):
    """The same mapping as a Hugging Face fast tokenizer (for TRL)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD_ID, vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
