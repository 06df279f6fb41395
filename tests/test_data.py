"""Tier 1: preference data: truncation, validation of rows, collate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prefopt.collate import padded_collate_preference
from prefopt.data import BadExample, find_undecodable_text, preference_dataset, truncate_pair


def test_truncate_pair_princeton_rule():
    P, C, R = list(range(10)), [100] * 6, [200] * 4
    # fits: untouched
    assert truncate_pair(P, C, R, max_seq_len=16, max_prompt_len=8) == (P, 6, 4)
    # too long: prompt keeps its end (after the BOS), then responses fit what is left
    prompt, nc, nr = truncate_pair([1] + P, C, R, max_seq_len=12, max_prompt_len=5, bos_id=1)
    assert prompt == [1, 6, 7, 8, 9] and (nc, nr) == (6, 4)
    prompt, nc, nr = truncate_pair([1] + P, C, R, max_seq_len=9, max_prompt_len=5, bos_id=1)
    assert prompt == [1, 6, 7, 8, 9] and (nc, nr) == (4, 4)
    # keep_start
    prompt, _, _ = truncate_pair(P, C, R, max_seq_len=9, max_prompt_len=5, prompt_truncation="keep_start")
    assert prompt == [0, 1, 2, 3, 4]
    # no max_prompt_len: the prompt stays whole and the responses may be cut to nothing
    prompt, nc, nr = truncate_pair(P, C, R, max_seq_len=10, max_prompt_len=None)
    assert prompt == P and (nc, nr) == (0, 0)


def pair(prompt, chosen, rejected, rprompt=None):
    return {
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": rprompt or prompt}, {"role": "assistant", "content": rejected}],
    }


def write(tmp_path, rows, name="pairs.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_dataset_tokens_labels_and_bos_eos(tmp_path, tiny_tokenizer):
    f = write(tmp_path, [pair("Where are the keys?", "The keys are in the garden.", "No.")])
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=f, split="train")
    ex = ds[0]
    assert ex["row"] == 0
    ids, labels = ex["chosen_input_ids"], ex["chosen_labels"]
    assert ids[0] == tiny_tokenizer.bos_id and ids[-1] == tiny_tokenizer.eos_id
    n_prompt = sum(l == -100 for l in labels)
    assert ex["rejected_input_ids"][:n_prompt] == ids[:n_prompt]  # shared prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # response labelled, EOS included
    assert tiny_tokenizer.decode(ids[n_prompt:]).strip() == "The keys are in the garden."


class _EndMasked:
    """The tiny tokenizer, but the final token's label is ignored (as Llama 3's tokenizer does
    with its end-of-turn token): the positions a response masks are kept through truncation."""

    def __init__(self, tok):
        self.tok, self.bos_id, self.eos_id = tok, tok.bos_id, tok.eos_id

    def encode(self, *args, **kwargs):
        return self.tok.encode(*args, **kwargs)

    def tokenize_messages(self, messages):
        ids, mask = self.tok.tokenize_messages(messages)
        return ids, mask[:-1] + [True]


def test_masked_response_positions_kept_and_cut_with_the_response(tmp_path, tiny_tokenizer):
    f = write(tmp_path, [pair("Where are the keys?", "The keys are in the garden by the tree.", "No.")])
    tok = _EndMasked(tiny_tokenizer)
    ex = preference_dataset(tok, source="json", data_files=f, split="train")[0]
    ids, labels = ex["chosen_input_ids"], ex["chosen_labels"]
    n_prompt = next(i for i, l in enumerate(labels) if l != -100)
    assert labels[-1] == -100 and labels[n_prompt:-1] == ids[n_prompt:-1] and ids[-1] == tiny_tokenizer.eos_id
    assert ex["rejected_labels"][-1] == -100 and ex["rejected_labels"][n_prompt] == ex["rejected_input_ids"][n_prompt]
    # cut before its end, the chosen response keeps no masked position
    full = len(ids)
    cut = preference_dataset(tok, source="json", data_files=f, split="train", max_seq_len=full - 3)[0]
    assert cut["chosen_input_ids"] == ids[: full - 3] and cut["chosen_labels"][n_prompt:] == ids[n_prompt : full - 3]


@pytest.mark.parametrize("enabled", [True, False])
def test_build_leaves_the_garbage_collector_as_it_found_it(tmp_path, tiny_tokenizer, enabled):
    """The encoder turns cyclic GC off for each batch and back on only if it was on."""
    import gc

    f = write(tmp_path, [pair("Where are the keys?", "The keys are in the garden.", "No.")])
    (gc.enable if enabled else gc.disable)()
    try:
        ds = preference_dataset(tiny_tokenizer, source="json", data_files=f, split="train", cache_dir=tmp_path / "c", num_proc=1)
        assert len(ds) == 1 and gc.isenabled() is enabled
    finally:
        gc.enable()


def test_bad_rows_dropped_and_counted(tmp_path, tiny_tokenizer, caplog):
    rows = [
        pair("Q one?", "good answer", "bad answer"),
        {"chosen": [], "rejected": pair("x", "y", "z")["rejected"]},  # empty chosen
        {"rejected": pair("x", "y", "z")["rejected"]},  # missing chosen
        pair("Q two?", "good", "   "),  # empty rejected response
        {"chosen": "just a string", "rejected": pair("x", "y", "z")["rejected"]},  # wrong type
        pair("Q three?", "good", "bad", rprompt="another prompt"),  # different prompts
        pair("Q four?", "fine", "also fine"),
    ]
    f = write(tmp_path, rows)
    with caplog.at_level("WARNING"):
        ds = preference_dataset(tiny_tokenizer, source="json", data_files=f, split="train")
    assert [ex["row"] for ex in ds] == [0, 6]
    assert sum(ds.dropped.values()) == 5
    assert ds.dropped["different prompts"] == 1
    assert "dropped 5 of 7 rows" in caplog.text


@pytest.mark.parametrize(
    "row, field, needle",
    [
        ({"chosen": [], "rejected": []}, "chosen", "non-empty list"),
        (pair("Q?", "good", "bad", rprompt="other"), "rejected", "prompt"),
        (pair("Q?", "good", ""), "rejected", "no non-empty assistant message"),
    ],
)
def test_error_mode_names_file_row_and_field(tmp_path, tiny_tokenizer, row, field, needle):
    f = write(tmp_path, [pair("ok?", "yes", "no"), row])
    with pytest.raises(ValueError) as e:
        preference_dataset(tiny_tokenizer, source="json", data_files=f, split="train", on_bad_example="error")
    msg = str(e.value)
    assert "pairs.jsonl" in msg and "row 1" in msg and f"'{field}'" in msg and needle in msg


def test_truncation_keeps_prompt_end_and_drops_unscorable(tmp_path, tiny_tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(60)) + " Where are the keys?"
    f = write(tmp_path, [pair(long_prompt, "In the garden, next to the old tree.", "In the garage.")])
    ds = preference_dataset(
        tiny_tokenizer, source="json", data_files=f, split="train", max_seq_len=40, max_prompt_len=24
    )
    ex = ds[0]
    assert len(ex["chosen_input_ids"]) <= 40 and len(ex["rejected_input_ids"]) <= 40
    n_prompt = sum(l == -100 for l in ex["chosen_labels"])
    assert n_prompt == 24
    assert ex["chosen_input_ids"][0] == tiny_tokenizer.bos_id
    assert tiny_tokenizer.decode(ex["chosen_input_ids"][1:n_prompt]).endswith("Where are the keys?")
    # without max_prompt_len the prompt alone fills max_seq_len: nothing to score -> dropped
    with pytest.raises(ValueError, match="no usable preference pairs"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, split="train", max_seq_len=40)
    with pytest.raises(ValueError, match="no response token left after truncation"):
        preference_dataset(
            tiny_tokenizer, source="json", data_files=f, split="train", max_seq_len=40, on_bad_example="error"
        )


def test_bad_arguments(tmp_path, tiny_tokenizer):
    f = write(tmp_path, [pair("a", "b", "c")])
    with pytest.raises(ValueError, match="max_prompt_len"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, max_seq_len=10, max_prompt_len=10)
    with pytest.raises(ValueError, match="train_on_input"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, train_on_input=True)


def test_collate_layout():
    batch = [
        {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4], "rejected_labels": [-100, 4], "row": 7},
        {"chosen_input_ids": [1, 5], "chosen_labels": [-100, 5], "rejected_input_ids": [1, 6, 6, 6], "rejected_labels": [-100, 6, 6, 6], "row": 9},
    ]
    out = padded_collate_preference(batch, padding_idx=0, pad_to_multiple_of=8)
    assert out["tokens"].shape == (4, 8)
    assert out["tokens"][:, :4].tolist() == [[1, 2, 3, 0], [1, 5, 0, 0], [1, 4, 0, 0], [1, 6, 6, 6]]
    assert out["labels"][1].tolist() == [-100, 5] + [-100] * 6
    assert out["rows"].tolist() == [7, 9]
    assert out["num_tokens"].item() == 3 + 2 + 2 + 4


# Undecodable text. pyarrow's JSON reader (under `datasets`) lets bytes that are not UTF-8 inside
# a JSON Lines string through, to fail when that row is read: a bad row like any other. A lone
# surrogate escape ("\ud800"), or bad bytes in a JSON array file, make it reject the whole file:
# then there is no row to drop, and the load fails with the file, line, row and field.


def jsonl_bytes(rows):
    return [json.dumps(r).encode() for r in rows]


ROWS = [pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.") for i in range(4)]


def test_invalid_utf8_in_a_row_is_a_bad_example(tmp_path, tiny_tokenizer):
    lines = jsonl_bytes(ROWS)
    lines[2] = lines[2].replace(b"good answer", b"good \xff\xfe answer")  # in 'chosen'
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(BadExample) as e:
        preference_dataset(tiny_tokenizer, source="json", data_files=str(f), split="train", on_bad_example="error")
    assert str(e.value).startswith(f"json:{f}: row 2, field 'chosen': text that is not UTF-8 (b'\\xff' at byte ")
    assert e.value.reason == "undecodable text"
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(f), split="train")  # drop: counted
    assert [ex["row"] for ex in ds] == [0, 1, 3]
    assert ds.dropped == {"undecodable text": 1}


def test_lone_surrogate_file_is_an_error_naming_file_line_row_field(tmp_path, tiny_tokenizer):
    rows = json.loads(json.dumps(ROWS))
    rows[1]["rejected"][1]["content"] += "\ud800"  # json.dumps writes the escape "\ud800"
    f = tmp_path / "surrogate.jsonl"
    f.write_bytes(b"\n".join(jsonl_bytes(rows)) + b"\n\n")
    for mode in ("error", "drop"):  # drop cannot drop a row of a file that does not load
        with pytest.raises(BadExample) as e:
            preference_dataset(tiny_tokenizer, source="json", data_files=str(f), split="train", on_bad_example=mode)
        assert str(e.value) == (
            f"{f}: line 2 (row 1), field 'rejected[1].content': a lone surrogate escape \"\\ud800\" (not Unicode text); "
            "the file cannot be loaded, fix or delete that line"
        )
        assert "DatasetGenerationError" in repr(e.value.__cause__)  # what `datasets` raised


def test_invalid_utf8_in_a_json_array_file_names_the_line(tmp_path, tiny_tokenizer):
    lines = jsonl_bytes(ROWS)
    lines[3] = lines[3].replace(b"Bad 3", b"Bad \xc3\x28")
    f = tmp_path / "array.json"
    f.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(BadExample) as e:
        preference_dataset(tiny_tokenizer, source="json", data_files=str(f), split="train", on_bad_example="drop")
    assert str(e.value).startswith(f"{f}: line 5, field 'rejected[1].content': bytes that are not UTF-8 (b'\\xc3' at byte ")


def test_find_undecodable_text_passes_valid_text(tmp_path):
    f = tmp_path / "ok.jsonl"
    # a valid surrogate PAIR (an emoji, escaped by json.dumps), an escaped backslash before "ud800"
    f.write_text(json.dumps({"a": "smile \U0001F600", "b": "a literal \\ud800 in text"}) + "\n\n" + json.dumps({"a": "é"}) + "\n")
    assert "\\ud83d\\ude00" in f.read_text() and "\\\\ud800" in f.read_text()
    assert find_undecodable_text(f) is None
    f.write_text(f.read_text() + '{"a": "low half alone \\udc80"}\n')
    assert find_undecodable_text(f) == f"{f}: line 4 (row 2), field 'a': a lone surrogate escape \"\\udc80\" (not Unicode text)"


def test_lone_surrogate_reaching_a_row_is_a_bad_example(tmp_path, tiny_tokenizer, monkeypatch):
    """A loader that hands over Python strings with a lone surrogate (none of the `datasets`
    formats can: they store UTF-8) gets the row check: no tokenizer can encode such text."""
    import prefopt.data.sources as pdata  # where the rows are read

    rows = json.loads(json.dumps(ROWS))
    rows[2]["chosen"][0]["content"] += "\udfff"
    monkeypatch.setattr(pdata, "load_dataset", lambda *a, **k: rows)
    with pytest.raises(BadExample) as e:
        preference_dataset(tiny_tokenizer, source="my/hub-set", split="train", on_bad_example="error")
    assert str(e.value) == (
        "my/hub-set[train]: row 2, field 'chosen': message 0 holds a lone surrogate '\\udfff' at character 11: "
        "not valid Unicode text"
    )
    ds = preference_dataset(tiny_tokenizer, source="my/hub-set", split="train")
    assert ds.dropped == {"undecodable text": 1} and len(ds) == 3


# ---- formats: each on a small local file in that exact schema --------------------------------

Q, A, B = "Where are the keys?", "The keys are in the garden.", "No, not there."
SYSTEM = "You answer in one sentence."


def reference(tok, prompt=Q, chosen=A, rejected=B, system=None):
    """The torchtune/H4 `messages` format's item for one pair (today's tokens)."""
    head = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    row = {"chosen": head + [{"role": "assistant", "content": chosen}], "rejected": head + [{"role": "assistant", "content": rejected}]}
    return row


def items(ds):
    return [ds[i] for i in range(len(ds))]


def test_format_messages_h4_schema(tmp_path, tiny_tokenizer):
    # HuggingFaceH4/ultrafeedback_binarized's columns; only chosen / rejected are read
    row = {"prompt": Q, "prompt_id": "ab" * 32, **reference(tiny_tokenizer), "messages": reference(tiny_tokenizer)["chosen"],
           "score_chosen": 8.0, "score_rejected": 3.0}
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, [row]), format="messages", cache_dir=str(tmp_path / "c"))
    ex = ds[0]
    want_prompt = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(Q, add_bos=False, add_eos=False)
    n = len(want_prompt)
    assert ex["chosen_input_ids"][:n] == want_prompt == ex["rejected_input_ids"][:n]
    assert ex["chosen_labels"] == [-100] * n + ex["chosen_input_ids"][n:]
    assert ex["chosen_input_ids"][-1] == tiny_tokenizer.eos_id
    assert tiny_tokenizer.decode(ex["rejected_input_ids"][n:]).strip() == B
    assert (n, len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) == (13, 13 + 16, 13 + 10)


def test_format_trl_conversational(tmp_path, tiny_tokenizer):
    # trl-lib/ultrafeedback_binarized: prompt = message list, chosen / rejected = the response only
    rows = [
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q}],
         "chosen": [{"role": "assistant", "content": A}], "rejected": [{"role": "assistant", "content": B}], "score_chosen": 9.0, "score_rejected": 2.0},
        {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A}], "rejected": [{"role": "assistant", "content": "  "}], "score_chosen": 9.0, "score_rejected": 2.0},
    ]
    f = write(tmp_path, rows)
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=f, format="trl_conversational", cache_dir=str(tmp_path / "c"))
    ref = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, [reference(tiny_tokenizer, system=SYSTEM)], "ref.jsonl"), cache_dir=str(tmp_path / "c"))
    assert items(ds) == items(ref) and ds.dropped == {"empty response": 1}
    with pytest.raises(BadExample, match=r"row 1, field 'rejected': has no non-empty assistant message"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, format="trl_conversational", on_bad_example="error", cache_dir=str(tmp_path / "c"))


def test_format_trl_strings_raw_and_with_a_chat_template(tmp_path, tiny_tokenizer):
    from torchtune.models.llama2 import llama2_tokenizer

    # TRL's standard format with plain text, under other column names (column_map)
    rows = [{"question": Q, "good": A, "bad": B}, {"question": Q, "good": A, "bad": 7}]
    f = write(tmp_path, rows)
    kw = dict(source="json", data_files=f, format="trl_strings", column_map={"prompt": "question", "chosen": "good", "rejected": "bad"},
              cache_dir=str(tmp_path / "c"))
    with pytest.raises(BadExample, match=r"row 1, field 'bad': expected a string, got int"):
        preference_dataset(tiny_tokenizer, on_bad_example="error", **kw)
    ds = preference_dataset(tiny_tokenizer, **kw)  # prompt_template None: raw concatenation, as `messages` gives
    ref = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, [reference(tiny_tokenizer)], "ref.jsonl"), cache_dir=str(tmp_path / "c"))
    assert items(ds) == items(ref) and ds.dropped == {"wrong type": 1}
    # the model's chat template applies to the strings
    chat = llama2_tokenizer(str(TINY_TOK), max_seq_len=None, prompt_template="torchtune.models.llama2.Llama2ChatTemplate")
    ex = preference_dataset(chat, **kw)[0]
    n = ex["chosen_labels"].count(-100)
    assert chat.decode(ex["chosen_input_ids"][:n]).strip() == f"[INST] {Q} [/INST]"
    assert chat.decode(ex["chosen_input_ids"][n:]).strip() == A


def test_format_princeton_on_policy(tmp_path, tiny_tokenizer):
    # princeton-nlp/llama3-ultrafeedback-armorm: prompt string, message lists with the prompt turn;
    # a list holding only the response gets the prompt string as the user turn
    full = reference(tiny_tokenizer)
    rows = [
        {"prompt_id": "0" * 64, "prompt": Q, "all_generated_responses": [A, B, "x", "y", "z"], "all_rm_scores": [0.1, 0.05, 0.0, 0.0, 0.0],
         "chosen": full["chosen"], "rejected": full["rejected"]},
        {"prompt_id": "1" * 64, "prompt": Q, "all_generated_responses": [A, B], "all_rm_scores": [0.1, 0.05],
         "chosen": full["chosen"][1:], "rejected": full["rejected"][1:]},
    ]
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, rows), format="princeton", cache_dir=str(tmp_path / "c"))
    ref = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, [full], "ref.jsonl"), cache_dir=str(tmp_path / "c"))
    want = {k: v for k, v in ref[0].items() if k != "row"}
    assert [{k: v for k, v in ex.items() if k != "row"} for ex in items(ds)] == [want, want]
    assert [ex["row"] for ex in items(ds)] == [0, 1]


def test_format_column_missing_from_the_file_is_one_clear_error(tmp_path, tiny_tokenizer):
    f = write(tmp_path, [reference(tiny_tokenizer)])
    with pytest.raises(ValueError, match=r"no column 'prompt' .*format 'trl_strings' reads \('prompt', 'chosen', 'rejected'\)"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, format="trl_strings", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="format must be one of"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, format="sharegpt")
    with pytest.raises(ValueError, match=r"column_map: \['prompt'\] are not columns of format 'messages'"):
        preference_dataset(tiny_tokenizer, source="json", data_files=f, column_map={"prompt": "q"})


# ---- the cache ------------------------------------------------------------------------------

TINY_TOK = Path(__file__).resolve().parents[1] / "prefopt" / "assets" / "tiny" / "tokenizer.model"


@pytest.fixture
def count_tokenizer_calls(monkeypatch, tiny_tokenizer):
    """How many conversations the tokenizer was asked for (patched on the class: the tokenizer's
    pickled state, which the cache key hashes, stays the same)."""
    calls = []
    cls = type(tiny_tokenizer)
    orig = cls.tokenize_messages
    monkeypatch.setattr(cls, "tokenize_messages", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k))
    return calls


def test_cache_hit_reads_without_tokenizing_and_changes_rebuild(tmp_path, tiny_tokenizer, count_tokenizer_calls):
    from torchtune.models.llama2 import llama2_tokenizer

    rows = [pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.") for i in range(10)] + [pair("Q?", "same", "same")]
    f = write(tmp_path, rows)
    cache = tmp_path / "cache"
    kw = dict(source="json", data_files=f, max_seq_len=64, max_prompt_len=32, cache_dir=str(cache))
    first = preference_dataset(tiny_tokenizer, **kw)
    assert first.cache_info["cache"] == "built" and len(count_tokenizer_calls) == 22  # 11 rows x 2 sides
    second = preference_dataset(tiny_tokenizer, **kw)
    assert second.cache_info == {**second.cache_info, "cache": "hit", "path": first.cache_info["path"]}
    assert len(count_tokenizer_calls) == 22  # read from the cache: not tokenized again
    assert items(second) == items(first) and len(second) == 10 and second.dropped == {"identical responses": 1}
    # error mode reads the same cache and raises the first bad row
    with pytest.raises(BadExample, match="row 10, field 'rejected': chosen and rejected responses are identical"):
        preference_dataset(tiny_tokenizer, on_bad_example="error", **kw)
    assert len(count_tokenizer_calls) == 22
    # num_proc / batch_size do not change the tokens: still a hit
    assert preference_dataset(tiny_tokenizer, num_proc=2, batch_size=4, **kw).cache_info["cache"] == "hit"
    # a changed truncation, template, tokenizer or data rebuilds
    assert preference_dataset(tiny_tokenizer, **{**kw, "max_seq_len": 48}).cache_info["cache"] == "built"
    chat = llama2_tokenizer(str(TINY_TOK), max_seq_len=None, prompt_template="torchtune.models.llama2.Llama2ChatTemplate")
    assert preference_dataset(chat, **kw).cache_info["cache"] == "built"
    assert preference_dataset(tiny_tokenizer, new_system_prompt="Be brief.", **kw).cache_info["cache"] == "built"
    n = len(count_tokenizer_calls)
    rows[3] = pair("Question 3?", "A changed good answer.", "Bad 3.")
    write(tmp_path, rows)
    changed = preference_dataset(tiny_tokenizer, **kw)
    assert changed.cache_info["cache"] == "built" and len(count_tokenizer_calls) == n + 22
    assert changed[3] != first[3] and changed[4] == first[4]
    assert len(list((cache / "preference").iterdir())) == 5  # one folder per distinct input, no leftovers


def _no_load(monkeypatch):
    """Make any read of the source rows fail the test (by pyarrow or by datasets)."""
    import prefopt.data.sources as pdata  # where the rows are read

    def fail(*a, **k):
        raise AssertionError("the source rows were read")

    monkeypatch.setattr(pdata, "_read_json_lines", fail)
    monkeypatch.setattr(pdata, "load_dataset", fail)


def test_local_json_lines_cached_start_reads_no_row_and_keeps_the_dropped_lines(tmp_path, tiny_tokenizer, monkeypatch, caplog):
    """Local JSON Lines files are keyed on their paths, sizes and modification times: a cached
    start reads no row, and lines that were not JSON objects are still counted, warned about,
    and raised in error mode (a file with such a line used to miss the cache every time: its
    fixed copy had a new temporary path)."""
    import logging

    lines = [json.dumps(pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.")) for i in range(6)]
    lines[2] = lines[2][:30]  # cut short
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    kw = dict(source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    first = preference_dataset(tiny_tokenizer, **kw)
    assert first.cache_info["cache"] == "built" and first.dropped == {"invalid JSON": 1} and len(first) == 5
    with monkeypatch.context() as m:
        _no_load(m)
        with caplog.at_level(logging.WARNING, logger="prefopt.data"):
            again = preference_dataset(tiny_tokenizer, **kw)
        assert again.cache_info["cache"] == "hit" and again.dropped == {"invalid JSON": 1}
        assert items(again) == items(first) and [again[i]["row"] for i in range(5)] == [0, 1, 3, 4, 5]
        assert f"{f}: line 3 (row 2): not valid JSON (" in caplog.text and "the row is dropped" in caplog.text
        with pytest.raises(BadExample, match=f"^{f}: line 3 \\(row 2\\): not valid JSON .*set on_bad_example=drop to skip it"):
            preference_dataset(tiny_tokenizer, on_bad_example="error", **kw)
    # a changed file rebuilds; no copy of the rows is left behind
    f.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    changed = preference_dataset(tiny_tokenizer, **kw)
    assert changed.cache_info["cache"] == "built" and len(changed) == 5 and not changed.dropped
    built = sorted(Path(d.cache_info["path"]).name for d in (first, changed))
    assert sorted(p.name for p in (tmp_path / "cache" / "preference").iterdir()) == built


def test_a_tokenizer_that_has_tokenized_gets_the_same_cache_key(tmp_path):
    """torchtune's sentencepiece tokenizer sets attributes at its first use; the key leaves them out."""
    from torchtune.models.llama2 import llama2_tokenizer

    f = write(tmp_path, ROWS)
    fresh = llama2_tokenizer(str(TINY_TOK), max_seq_len=None, prompt_template=None)
    used = llama2_tokenizer(str(TINY_TOK), max_seq_len=None, prompt_template=None)
    preference_dataset(used, source="json", data_files=write(tmp_path, ROWS[:2], "other.jsonl"), cache_dir=str(tmp_path / "c"))
    assert "prefix" in vars(used._spm_model) and "prefix" not in vars(fresh._spm_model)
    first = preference_dataset(fresh, source="json", data_files=f, cache_dir=str(tmp_path / "c"))
    again = preference_dataset(used, source="json", data_files=f, cache_dir=str(tmp_path / "c"))
    assert (first.cache_info["cache"], again.cache_info["cache"]) == ("built", "hit")
    assert "prefix" in vars(used._spm_model)  # left as it was


def test_a_killed_builds_scratch_is_removed_by_the_next_build_once_stale(tmp_path, tiny_tokenizer):
    import os
    import time

    folder = tmp_path / "c" / "preference"
    old, recent, other = folder / "raw-123-abc", folder / "0123abcd.tmp-99-1", folder / "raw-notes.txt"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "raw-0.arrow").write_bytes(b"x" * 100)
    other.write_text("a file, not a scratch folder")
    two_days = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days, two_days))
    os.utime(other, (two_days, two_days))
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, ROWS), cache_dir=str(tmp_path / "c"))
    assert ds.cache_info["cache"] == "built"
    assert not old.exists() and recent.exists() and other.exists()  # only what is stale, and only scratch folders
    assert sorted(p.name for p in folder.iterdir()) == sorted([recent.name, other.name, Path(ds.cache_info["path"]).name])


def test_local_json_lines_pyarrow_cannot_read_go_through_datasets(tmp_path, tiny_tokenizer, monkeypatch):
    """What pyarrow cannot read as one table is read by datasets.load_dataset: a column whose
    type changes (datasets' Json feature keeps such a column). Several files are one table, a
    line longer than pyarrow's block is read with bigger blocks."""
    import prefopt.data.sources as pdata  # where the rows are read

    loads = []
    real = pdata.load_dataset
    monkeypatch.setattr(pdata, "load_dataset", lambda *a, **k: loads.append(k["data_files"]) or real(*a, **k))
    rows = [pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.") for i in range(4)]
    mixed = [dict(r) for r in rows]
    mixed[1]["rejected"] = "a string, not messages"
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, mixed, "mixed.jsonl"), cache_dir=str(tmp_path / "c"))
    assert ds.dropped == {"wrong type": 1} and [ds[i]["row"] for i in range(3)] == [0, 2, 3]
    assert len(loads) == 1 and loads[0].endswith("mixed.jsonl")  # the rest: pyarrow's reader
    files = [write(tmp_path, rows[:2], "a.jsonl"), write(tmp_path, rows[2:], "b.jsonl")]
    two = preference_dataset(tiny_tokenizer, source="json", data_files=files, cache_dir=str(tmp_path / "c"))
    assert len(two) == 4 and not two.dropped and [two[i]["row"] for i in range(4)] == [0, 1, 2, 3]
    ref = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, rows, "ref.jsonl"), cache_dir=str(tmp_path / "c"))
    assert items(two) == items(ref)
    long = [pair("Question?", "word " * 300_000 + "end.", "Bad.")] + rows  # a 1.5 MB line
    big = preference_dataset(tiny_tokenizer, source="json", data_files=write(tmp_path, long, "long.jsonl"), cache_dir=str(tmp_path / "c"))
    assert len(big) == 5 and big.lengths()["chosen_full"][0] > 300_000
    assert len(loads) == 1


def test_num_proc_gives_the_same_items(tmp_path, tiny_tokenizer):
    rows = [pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.") for i in range(4000)]
    rows[2500] = {"chosen": [], "rejected": []}  # a bad row in the second shard
    f = write(tmp_path, rows)
    one = preference_dataset(tiny_tokenizer, source="json", data_files=f, num_proc=1, cache_dir=str(tmp_path / "a"))
    two = preference_dataset(tiny_tokenizer, source="json", data_files=f, num_proc=2, cache_dir=str(tmp_path / "b"))
    assert two.cache_info["num_proc"] == 2 and len(list(Path(two.cache_info["path"]).glob("*.arrow"))) == 2
    assert len(two) == 3999 and two.dropped == {"wrong type": 1}
    assert [two[i] for i in (0, 2499, 2500, 3998)] == [one[i] for i in (0, 2499, 2500, 3998)]
    assert two[2500]["row"] == 2501


def _rank_builds(rank, world, init, f, cache, out):
    import os

    import torch.distributed as dist
    from conftest import init_gloo
    from torchtune.models.llama2 import llama2_tokenizer

    os.environ["LOCAL_RANK"] = str(rank)
    init_gloo(rank, world, init)  # collectives time out after 2 minutes, not 30
    tok = llama2_tokenizer(str(TINY_TOK), max_seq_len=None, prompt_template=None)
    ds = preference_dataset(tok, source="json", data_files=f, cache_dir=cache)
    Path(out, f"{rank}.json").write_text(json.dumps({"cache": ds.cache_info["cache"], "path": ds.cache_info["path"], "first": ds[0]}))
    dist.destroy_process_group()


def test_one_rank_builds_the_others_read_its_cache(tmp_path):
    import torch.multiprocessing as mp

    f = write(tmp_path, ROWS)
    # fork: the children inherit the imports (spawn took ~20 s on 2 busy cores)
    args = (2, f"file://{tmp_path / 'pg'}", f, str(tmp_path / "cache"), str(tmp_path))
    mp.start_processes(_rank_builds, args=args, nprocs=2, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert (r0["cache"], r1["cache"]) == ("built", "hit")  # rank 1 waited, then mapped rank 0's files
    assert r0["path"] == r1["path"] and r0["first"] == r1["first"]


# ---- the start-up summary ---------------------------------------------------------------------


def test_padding_share_by_hand():
    from prefopt.packing import padding_share

    # one batch of 2 pairs: rows 4, 2 (chosen) and 1, 3 (rejected), padded to 4: 6 pad of 16
    assert padding_share(np.array([4, 2]), np.array([1, 3]), 2) == pytest.approx(6 / 16)
    assert padding_share(np.array([5, 5, 5]), np.array([5, 5, 5]), 1) == 0.0
    assert padding_share(np.array([5]), np.array([5]), 2) == 0.0  # no full batch


def test_summary_counts_lengths_truncation_and_padding(tmp_path, tiny_tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(60)) + " Where are the keys?"
    rows = [pair(long_prompt, "In the garden, next to the old tree.", "In the garage."), pair("Q?", "Yes.", "No."), {"chosen": [], "rejected": []}]
    f = write(tmp_path, rows)
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=f, max_seq_len=40, max_prompt_len=24, batch_size=2, cache_dir=str(tmp_path / "c"))
    L = ds.lengths()
    n_long = len(tiny_tokenizer.encode(long_prompt, add_eos=False))  # BOS + the words
    assert L["prompt_full"].tolist() == [n_long, len(tiny_tokenizer.encode("Q?", add_eos=False))] and L["prompt"].tolist() == [24, L["prompt_full"][1]]
    lines = ds.summary.splitlines()
    assert lines[0] == f"json:{f} (format messages): 2 pairs kept of 3; dropped: wrong type: 1"
    assert lines[3].split() == ["prompt", *(f"{x:.0f}" for x in np.percentile(L["prompt_full"], [50, 90, 99])), str(n_long)]
    assert lines[6] == "  truncated: 1 pairs (50.0%) at max_seq_len=40, max_prompt_len=24"
    c, r = L["prompt"] + L["chosen"], L["prompt"] + L["rejected"]
    pad = 1 - (c.sum() + r.sum()) / (4 * max(c.max(), r.max()))
    assert lines[7] == f"  padding: {100 * pad:.1f}% of the tokens of a padded batch of 2 pairs"


def test_collate_takes_numpy_items():
    batch = [{"chosen_input_ids": np.array([1, 2, 3], np.int32), "chosen_labels": np.array([-100, 2, 3], np.int32),
              "rejected_input_ids": np.array([1, 4], np.int32), "rejected_labels": np.array([-100, 4], np.int32), "row": 7}]
    out = padded_collate_preference(batch)
    assert out["tokens"].dtype == torch.long and out["tokens"].tolist() == [[1, 2, 3], [1, 4, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]] and out["num_tokens"].item() == 5


def test_packed_share_by_hand():
    from prefopt.packing import packed_share, padding_share

    # one batch of 2 pairs: prompts 10 and 2, responses (5, 3) and (1, 1)
    p, c, r = np.array([10, 2]), np.array([5, 1]), np.array([3, 1])
    # padded: 4 rows of the longest sequence, 15 tokens = 60 positions; packed: 18 + 4 = 22
    assert packed_share(p, c, r, 2) == pytest.approx(22 / 60)
    assert padding_share(p + c, p + r, 2) == pytest.approx(1 - (15 + 13 + 3 + 3) / 60)
    assert packed_share(p, c, r, 3) == 1.0  # no full batch


def test_bad_lines_and_bad_rows_are_decided_in_one_place_in_row_order(tmp_path, tiny_tokenizer, caplog):
    """A line that is not a row and a row the encoder refuses are the same kind of bad row:
    error mode raises the first in row order (whichever kind it is), drop mode drops both, and
    a cached start (no row read) decides the same."""
    import logging

    lines = [json.dumps(pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.")) for i in range(5)]
    lines[1] = json.dumps(pair("Q?", "same", "same"))
    lines[3] = "[1, 2]"
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    kw = dict(source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # built, then a hit
        with pytest.raises(BadExample, match=f"^json:{f}: row 1, field 'rejected': chosen and rejected responses are identical"):
            preference_dataset(tiny_tokenizer, on_bad_example="error", **kw)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        ds = preference_dataset(tiny_tokenizer, **kw)
    assert ds.cache_info["cache"] == "hit" and [ds[i]["row"] for i in range(len(ds))] == [0, 2, 4]
    assert dict(ds.dropped) == {"identical responses": 1, "invalid JSON": 1}
    assert caplog.text.count(f"{f}: line 4 (row 3): a JSON list, not an object; the row is dropped") == 1
    lines[1] = lines[0]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadExample, match=f"^{f}: line 4 \\(row 3\\): a JSON list, not an object; fix or delete"):
        preference_dataset(tiny_tokenizer, on_bad_example="error", **kw)


def test_filter_fn_keeps_each_line_message_on_its_row(tmp_path, tiny_tokenizer):
    """filter_fn renumbers the rows (items and row messages count rows after it; a broken line's
    message names its line in the file): each broken line's message stays with its row."""
    lines = [json.dumps(pair(f"Question {i}?", f"The good answer {i}.", f"Bad {i}.")) for i in range(6)]
    lines[2], lines[4] = "null", lines[4][:25]

    def no_question_1(row):  # a broken line is a row of nulls here
        return row["chosen"] is None or "Question 1?" not in row["chosen"][0]["content"]

    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(f), filter_fn=no_question_1, cache_dir=str(tmp_path / "c"))
    assert [ds[i]["row"] for i in range(len(ds))] == [0, 2, 4] and dict(ds.dropped) == {"invalid JSON": 2}  # rows 0, 3, 5
    with pytest.raises(BadExample, match=f"^{f}: line 3 \\(row 2\\): a JSON NoneType"):
        preference_dataset(tiny_tokenizer, source="json", data_files=str(f), filter_fn=no_question_1, on_bad_example="error",
                           cache_dir=str(tmp_path / "c"))

    def only_broken(row):
        return row["chosen"] is None or "Question 3?" in row["chosen"][0]["content"]

    ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(f), filter_fn=only_broken, cache_dir=str(tmp_path / "c"))
    assert [ds[i]["row"] for i in range(len(ds))] == [1] and dict(ds.dropped) == {"invalid JSON": 2}  # row 3
