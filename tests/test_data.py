"""Tier 1: preference data: truncation, validation of rows, collate."""

import json

import pytest
import torch

from prefopt.data import BadExample, find_undecodable_text, padded_collate_preference, preference_dataset, truncate_pair


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
    import prefopt.data as pdata

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
