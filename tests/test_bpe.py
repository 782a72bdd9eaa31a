"""Byte-level BPE: exact round trip on any Unicode, bytes per token for bits per byte, the HF tokenizer
gives the same ids, `data tokenizer` → `train --tokenizer bpe` → eval / export; bad inputs exit 2."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaformer.data.corpus import generated_stories

pytest.importorskip("tokenizers", reason="needs the [hf] extra: pip install 'dynaformer[hf]'")

from dynaformer.data.bpe import EOT, BPETokenizer, train_bpe  # noqa: E402
from dynaformer.data.tokenizers import tokenizer_from_dict  # noqa: E402

from .conftest import assert_user_error as _one_line_error
from .conftest import cli_in_process as _cli


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe([generated_stories(30_000, seed=5), "naïve café — 東京 😀"], vocab_size=400)


def test_trained_vocab(bpe):
    assert 300 < bpe.vocab_size <= 400  # merges were learnt
    assert bpe.eot_id == 0 and bpe.decode([0]) == EOT
    text = "Ada went to the kitchen."
    assert len(bpe.encode(text)) <= len(text.encode()) / 2  # frequent words became single tokens


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)
    # bytes per token add up to the UTF-8 length, so bits per byte are right
    if EOT not in text:
        assert int(bpe.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_serialises_with_the_run(bpe):
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    text = "Where is Hugo? In the attic. 🙂"
    assert again.encode(text) == bpe.encode(text) and again.vocab_size == bpe.vocab_size


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=80))
def test_hf_tokenizer_same_ids(bpe, text):
    pytest.importorskip("transformers", reason="needs the [hf] extra")
    from dynaformer.hf.tokenization import to_hf_tokenizer

    hf = _hf_cache.setdefault("tok", to_hf_tokenizer(bpe))
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == bpe.encode(text)
    assert hf.decode(ids) == text


_hf_cache: dict = {}






TINY = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--batch_size", "2",
        "--eval_tokens", "64", "--progress_bar", "false", "--max_steps", "2", "--warmup_steps", "0"]


def test_cli_tokenizer_train_eval(tmp_path, text_file, capsys):
    tok = tmp_path / "tok.json"
    res = _cli(capsys, "data", "tokenizer", str(text_file), "--vocab", "320", "--out", str(tok), "--json")
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["vocab_size"] <= 320 and rec["bytes_per_token"] > 1.5
    run = tmp_path / "run"
    res = _cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(run), "--tokenizer", "bpe",
               "--tokenizer_file", str(tok))
    assert res.returncode == 0, res.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["tokenizer"] == "bpe" and info["model"]["vocab_size"] == rec["vocab_size"]
    assert info["data"]["dtype"] == "uint16"
    res = _cli(capsys, "eval", str(run), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["bpb"] > 0

    # bad inputs: one line, exit 2, nothing written
    _one_line_error(_cli(capsys, "data", "tokenizer", str(text_file), "--vocab", "100", "--out",
                         str(tmp_path / "t2.json")), "--vocab must be")
    _one_line_error(_cli(capsys, "data", "tokenizer", str(text_file), "--out", str(tok)), "exists")
    out2 = tmp_path / "run2"
    _one_line_error(_cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(out2), "--tokenizer", "bpe"),
                    "tokenizer_file")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{nope")
    _one_line_error(_cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(out2), "--tokenizer", "bpe",
                         "--tokenizer_file", str(not_json)), "not JSON")
    assert not out2.exists()
    # resuming with a tokenizer file whose contents differ from the run's tokenizer
    tok.write_text(train_bpe([generated_stories(5000, seed=9)], 300).hf.to_str())
    _one_line_error(_cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(run), "--tokenizer", "bpe",
                         "--tokenizer_file", str(tok), "--resume", "auto", "--max_steps", "2"), "does not match")
