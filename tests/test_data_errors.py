"""Tier 1: the data layer's failure classes (issue 25): stale rows after a copied-in file, folders,
binary files and files of different columns as data_files, a corrupt cache entry, a split whose
every row is bad, and the identity a resume compares."""

import json
import logging
import os
import shutil

import pytest

from prefopt.data import preference_dataset


def pair(i, chosen=None):
    return {
        "chosen": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": chosen or f"The good answer {i}."}],
        "rejected": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Bad {i}."}],
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_chosen(ds, tok):
    ex = ds[0]
    return tok.decode(ex["chosen_input_ids"])


def test_a_file_copied_in_with_its_old_mtime_is_read_again(tmp_path, tiny_tokenizer):
    """cp -p / rsync -a: a corrected file of the same size with the old mtime must not be served
    from the cache of the old rows (the key was path, size and mtime)."""
    f = write(tmp_path / "pairs.jsonl", [pair(i) for i in range(4)])
    kw = dict(source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    old = preference_dataset(tiny_tokenizer, **kw)
    assert "The good answer 0." in first_chosen(old, tiny_tokenizer)
    st = os.stat(f)
    fixed = write(tmp_path / "fixed.jsonl", [pair(i, chosen=f"The goad answer {i}.") for i in range(4)])  # same size
    assert os.stat(fixed).st_size == st.st_size
    os.utime(fixed, ns=(st.st_atime_ns, st.st_mtime_ns))
    shutil.move(str(fixed), str(f))  # what `cp -p fixed pairs.jsonl` leaves: the same size and mtime
    assert (os.stat(f).st_size, os.stat(f).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    new = preference_dataset(tiny_tokenizer, **kw)
    assert new.cache_info["cache"] == "built" and "The goad answer 0." in first_chosen(new, tiny_tokenizer)
    assert new.identity["key"] != old.identity["key"] and new.identity["rows"] == old.identity["rows"] == 4
    again = preference_dataset(tiny_tokenizer, **kw)
    assert again.cache_info["cache"] == "hit" and again.identity == new.identity  # untouched: still a hit


def test_identity_changes_when_rows_are_appended(tmp_path, tiny_tokenizer):
    f = write(tmp_path / "pairs.jsonl", [pair(i) for i in range(4)])
    kw = dict(source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    a = preference_dataset(tiny_tokenizer, **kw).identity
    with open(f, "a") as fh:
        fh.write(json.dumps(pair(4)) + "\n")
    b = preference_dataset(tiny_tokenizer, **kw).identity
    assert (a["rows"], b["rows"]) == (4, 5) and a["key"] != b["key"] and a["source"] == b["source"] == f"json:{f}"


def test_a_folder_as_data_files_reads_the_files_in_it(tmp_path, tiny_tokenizer):
    d = tmp_path / "data"
    d.mkdir()
    write(d / "b.jsonl", [pair(i) for i in range(2, 4)])
    write(d / "a.jsonl", [pair(i) for i in range(2)])
    (d / "README.md").write_text("not data")
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(d), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 4 and "Question 0?" in first_chosen(ds, tiny_tokenizer)  # a.jsonl first
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"data_files: {empty} is a folder with no \.json/\.jsonl/\.ndjson file for source 'json' "
                                         rf"\(it holds \['notes.txt'\]\); name the files, or a glob such as {empty}/\*\.jsonl"):
        preference_dataset(tiny_tokenizer, source="json", data_files=str(empty), cache_dir=str(tmp_path / "cache"))


def test_a_parquet_file_read_as_json_is_named(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "pairs.jsonl"  # a Parquet file under a JSON Lines name
    pq.write_table(pa.Table.from_pylist([pair(i) for i in range(3)]), f)
    with pytest.raises(ValueError, match=rf"^{f}: a Parquet file \(its first bytes are b'PAR1'\), not json text: use source: parquet"):
        preference_dataset(tiny_tokenizer, source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    ds = preference_dataset(tiny_tokenizer, source="parquet", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3


def test_files_of_different_columns_are_named_with_their_columns(tmp_path, tiny_tokenizer):
    a = write(tmp_path / "a.jsonl", [pair(i) for i in range(3)])
    b = write(tmp_path / "b.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(3)])
    with pytest.raises(ValueError) as e:
        preference_dataset(tiny_tokenizer, source="json", data_files=[str(a), str(b)], cache_dir=str(tmp_path / "cache"))
    assert str(e.value) == (
        f"data_files: the files do not have the same columns ({a}: ['chosen', 'rejected']; {b}: ['chosen', 'prompt', 'rejected']): "
        "give them the same columns, or load them as separate data sets"
    )


def test_a_corrupt_cache_entry_is_rebuilt_once(tmp_path, tiny_tokenizer, caplog):
    f = write(tmp_path / "pairs.jsonl", [pair(i) for i in range(4)])
    kw = dict(source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    first = preference_dataset(tiny_tokenizer, **kw)
    items = [first[i] for i in range(4)]
    arrow = next((tmp_path / "cache" / "preference" / first.identity["key"]).glob("*.arrow"))
    del first
    arrow.write_bytes(arrow.read_bytes()[:100])  # cut short (a full disk, a killed copy)
    with caplog.at_level(logging.WARNING, logger="prefopt.data"):
        healed = preference_dataset(tiny_tokenizer, **kw)
    assert "the cached tokens cannot be read" in caplog.text and "building them again" in caplog.text
    assert healed.cache_info["cache"] == "built" and [healed[i] for i in range(4)] == items
    assert preference_dataset(tiny_tokenizer, **kw).cache_info["cache"] == "hit"
    assert sorted(p.name for p in (tmp_path / "cache" / "preference").iterdir()) == [healed.identity["key"]]  # nothing left aside


def test_every_row_dropped_shows_each_reasons_first_row_and_the_format_that_reads(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"Question {i}?", "chosen": f"The good answer {i}.", "rejected": f"Bad {i}."} for i in range(4)]
    f = write(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(ValueError) as e:  # messages format, but the files hold TRL's plain strings
        preference_dataset(tiny_tokenizer, source="json", data_files=str(f), cache_dir=str(tmp_path / "cache"))
    assert str(e.value) == (
        f"json:{f}: no usable preference pairs (dropped: {{'wrong type': 4}}); the first row of each reason: "
        f"[wrong type] json:{f}: row 0, field 'chosen': expected a non-empty list of messages, got str; "
        "the rows read as format 'trl_strings': set dataset.format"
    )
    ds = preference_dataset(tiny_tokenizer, source="json", data_files=str(f), format="trl_strings", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 4


def test_data_files_problems_found_without_reading_a_row(tmp_path):
    """What the recipes check at start-up, before any model is built: a typo in a path, a folder
    that does not exist, a split the local files do not have (a hub config's train_prefs)."""
    from prefopt.data import data_files_problems

    f = write(tmp_path / "pairs.jsonl", [pair(0)])
    assert data_files_problems("json", "train", str(f)) == []
    assert data_files_problems("json", "train[:90%]", [str(f)]) == []
    assert data_files_problems("json", "test", {"train": str(f), "test": str(f)}) == []
    assert data_files_problems("json", "train", str(tmp_path / "*.jsonl")) == []  # a glob: datasets' to resolve
    assert data_files_problems("json", "train", str(tmp_path / "pair.jsonl")) == [
        f"dataset.data_files: {tmp_path / 'pair.jsonl'} does not exist (its folder holds ['pairs.jsonl'])"]
    assert data_files_problems("json", "train_prefs", str(tmp_path / "nope" / "a.jsonl"), key="eval_dataset") == [
        f"eval_dataset.data_files: {tmp_path / 'nope' / 'a.jsonl'} does not exist (nor does its folder {tmp_path / 'nope'})",
        "eval_dataset.split: 'train_prefs', but the local data_files have only the split(s) ['train'] "
        "(data_files as a {split: files} mapping names others)",
    ]
    assert data_files_problems("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", None) == []
