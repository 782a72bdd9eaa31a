"""--data reads the formats corpora are kept in: JSON Lines (a chosen text field), Parquet, `datasets` folders, text
files and folders of one kind; anything else, a record without the field, or a folder mixing kinds, is one clear
error naming it. The same documents give the same text whichever format holds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynaformer.data.corpus import read_text
from dynaformer.errors import DynaformerError

from .conftest import cli_in_process

DOCS = ["The first story. Ann went to the market.", "A second one: Bob held the lamp.", "Third, and last."]
WANT = "\n\n".join(DOCS)


def _jsonl(path: Path, field: str = "text", extra: dict | None = None) -> Path:
    path.write_text("\n".join(json.dumps({field: d, "id": i, **(extra or {})}) for i, d in enumerate(DOCS)) + "\n\n")
    return path


def test_jsonl_reads_the_text_field_not_the_json(tmp_path):
    text, desc = read_text(str(_jsonl(tmp_path / "c.jsonl")))
    assert text == WANT and "{" not in text and "field 'text'" in desc
    body = _jsonl(tmp_path / "b.jsonl", field="body")
    assert read_text(str(body), text_field="body")[0] == WANT
    with pytest.raises(DynaformerError, match=r"line 1 has no text field 'text' \(keys \['body', 'id'\]\)"):
        read_text(str(body))


def test_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    with pytest.raises(DynaformerError, match="line 2 is not JSON"):
        read_text(str(p))
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DynaformerError, match="line 2 has no text field"):
        read_text(str(p))
    p.write_text("[1, 2]\n")
    with pytest.raises(DynaformerError, match=r"line 1 has no text field 'text' \(list\)"):
        read_text(str(p))


def test_parquet_and_datasets_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "c.parquet")
    assert read_text(str(tmp_path / "c.parquet"))[0] == WANT
    with pytest.raises(DynaformerError, match=r"no column 'body' \(columns: text, n\)"):
        read_text(str(tmp_path / "c.parquet"), text_field="body")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(DynaformerError, match="row 1 has no text"):
        read_text(str(tmp_path / "nulls.parquet"))
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DynaformerError, match="is not a Parquet file"):
        read_text(str(tmp_path / "fake.parquet"))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    text, desc = read_text(str(tmp_path / "ds"))
    assert text == WANT and "datasets folder" in desc
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS}),
                               "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert read_text(str(tmp_path / "dd"))[0] == WANT  # the train split
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["x"]}),
                          "b": datasets.Dataset.from_dict({"text": ["y"]})}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(DynaformerError, match="splits a, b and none is 'train'"):
        read_text(str(tmp_path / "ab"))


def test_folders_of_one_kind_and_refused_kinds(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    _jsonl(one / "a.jsonl")
    _jsonl(one / "b.jsonl")
    assert read_text(str(one))[0] == WANT + "\n" + WANT
    (one / "notes.txt").write_text("plain")
    with pytest.raises(DynaformerError, match=r"mixes kinds of files \(jsonl: a.jsonl, text: notes.txt\)"):
        read_text(str(one))
    for name, why in (("c.json", "JSON Lines"), ("c.txt.gz", "compressed"), ("data-00000.arrow", "datasets folder")):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(DynaformerError, match=why):
            read_text(str(tmp_path / name))
    (tmp_path / "plain.txt").write_text(WANT)
    assert read_text(str(tmp_path / "plain.txt"))[0] == WANT  # text files as before


def test_training_on_jsonl_from_the_command_line(tmp_path, capsys):
    """`train --data c.jsonl --text_field body` trains on the documents; without the field it is one line."""
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"story {i}: " + DOCS[i % 3] * 20}) for i in range(60)))
    tiny = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--batch_size", "2",
            "--max_steps", "2", "--eval_tokens", "64", "--progress_bar", "false", "--warmup_steps", "0"]
    res = cli_in_process(capsys, "train", *tiny, "--data", str(data), "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "has no text field 'text'" in res.stderr and not (tmp_path / "bad").exists()
    res = cli_in_process(capsys, "train", *tiny, "--data", str(data), "--text_field", "body",
                         "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "field 'body'" in json.dumps(meta)
