"""Preference data for SimPO: the formats users have, princeton-style truncation, row
validation, tokenized once with ``datasets`` into memory-mapped Arrow files that are cached on
disk and shared by every rank.

One public entry, :func:`preference_dataset`; a row's way in, one module a step:

- :mod:`prefopt.data.sources`: a split's rows read (local files, hub data sets); JSON Lines
  lines that are not rows named; undecodable files named;
- :mod:`prefopt.data.encoding`: a row -> a checked, tokenized, truncated pair (the map function);
- :mod:`prefopt.data.cache`: the tokenized cache (key, build, read; one builder per node);
- :mod:`prefopt.data.dataset`: the path through them, ``on_bad_example`` decided (in one place),
  the start-up summary, the items;
- :mod:`prefopt.data.prompts`: the prompts of a preference or prompts file, deduplicated and
  sorted as princeton's on-policy generation reads them (for generation, not training).

The collates that turn items into batches are in :mod:`prefopt.collate`.

Config use (``source`` / ``data_files`` / ``split`` as in ``torchtune.datasets.preference_dataset``)::

    dataset:
      _component_: prefopt.data.preference_dataset
      source: json
      data_files: my_pairs.jsonl
      split: train
      format: messages          # or trl_conversational, trl_strings, princeton
      max_seq_len: 2048
      max_prompt_len: 1800
      batch_size: ${batch_size} # only for the start-up summary's padding figure

Formats (``column_map`` renames the columns when a file's names differ):

- ``messages`` (torchtune's, HuggingFaceH4/ultrafeedback_binarized): ``chosen`` and ``rejected``
  are message lists (``{"role", "content"}``) that include the prompt;
- ``trl_conversational`` (TRL's standard conversational format, trl-lib/ultrafeedback_binarized):
  ``prompt`` is a message list, ``chosen`` / ``rejected`` lists of only the response message(s);
- ``trl_strings`` (TRL's standard format with plain text): ``prompt``, ``chosen``, ``rejected``
  strings; the prompt becomes a user message and each response an assistant message, so the
  tokenizer's chat template applies (``prompt_template: null`` means raw concatenation);
- ``princeton`` (princeton-nlp/llama3-ultrafeedback-armorm and its siblings): a ``prompt`` string
  plus ``chosen`` / ``rejected`` message lists; lists that hold the prompt turn(s) (the published
  sets do) are used as they are, lists of only the response get the prompt as a user message.
"""

from prefopt.data.cache import default_cache_dir
from prefopt.data.dataset import ON_BAD_EXAMPLE, PreferenceDataset, preference_dataset
from prefopt.data.encoding import FORMATS, PROMPT_TRUNCATION, truncate_pair
from prefopt.data.prompts import PROMPT_FORMATS, PromptSet, read_prompts
from prefopt.data.sources import BadExample, data_files_problems, find_undecodable_text

__all__ = [
    "preference_dataset",
    "PreferenceDataset",
    "BadExample",
    "FORMATS",
    "PROMPT_TRUNCATION",
    "ON_BAD_EXAMPLE",
    "truncate_pair",
    "find_undecodable_text",
    "data_files_problems",
    "default_cache_dir",
    "read_prompts",
    "PromptSet",
    "PROMPT_FORMATS",
]
