"""Tier 1: preference data: truncation, validation of rows, collate."""

import json

import pytest
import torch

from prefopt.data import padded_collate_preference, preference_dataset, truncate_pair


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
