"""`dynaformer serve` beyond a plain fp32 run folder: `--cache_dtype` (a bf16 cache admits twice the sessions of
fp32 in one budget and serves what `generate` gives with that cache, close to fp32's), and a folder written by
`dynaformer export-hf` (the same greedy completions as the run it was exported from; the tokenizer read back
exactly). A source that is none of these is one line and exit 2."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from dynaformer.data.tokenizers import ByteTokenizer, CharTokenizer
from dynaformer.model.generate import generate
from dynaformer.runs import load_model
from dynaformer.serve.config import ServeConfig
from dynaformer.serve.engine import Engine, SamplingParams
from dynaformer.serve.server import BackgroundServer

from .conftest import assert_user_error, cli_in_process
from .test_serve import CHARS, DENSE, HTTP, SPAN, client, make_run, metrics

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serve-sources")
    return {"dense": make_run(base / "dense", **DENSE), "span": make_run(base / "span", progress=0.6, **SPAN)}


def greedy(server, prompts: list[str], n: int = 20) -> list[str]:
    c = client(server)
    return [c.completions.create(model=server.name, prompt=p, max_tokens=n, temperature=0).choices[0].text
            for p in prompts]


# --- the KV cache's dtype --------------------------------------------------------------------------------------

def _admitted(model, cache_dtype, budget: int, want: int) -> tuple[int, int]:
    """(sequences decoding, sequences waiting) once an engine of this budget has admitted what it can of `want`
    long sequences; they are then cancelled."""
    engine = Engine(model, CharTokenizer(CHARS).decode, budget, max_batch=16, cache_dtype=cache_dtype)
    gate, step = threading.Event(), engine._step
    engine._step = lambda: gate.wait(30) and step()  # no sequence finishes (and makes room) while counted
    engine.start()
    try:
        seqs = engine.submit([[1, 2, 3]] * want, SamplingParams(max_tokens=1500, temperature=0),
                             [lambda e: None] * want)
        deadline = time.monotonic() + 10
        while engine.snapshot()["active_sequences"] + engine.snapshot()["queue_length"] != want or \
                engine.snapshot()["queue_length"] == want:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        snap = engine.snapshot()
        engine.cancel(seqs)
        return int(snap["active_sequences"]), int(snap["queue_length"])
    finally:
        gate.set()
        engine.stop()


def test_a_bf16_cache_admits_twice_the_sessions(runs):
    model, _, _ = load_model(runs["dense"])
    fp32 = Engine(model, str, 2**20)
    bf16 = Engine(model, str, 2**20, cache_dtype=torch.bfloat16)
    assert 2 * bf16.kv_bytes(1503) == fp32.kv_bytes(1503) == 2 * 2 * 32 * 4 * 1503  # 2 layers × (k, v) × 32 wide
    budget = 2 * fp32.kv_bytes(1503) + 100  # two fp32 sequences of 3 + 1,500 tokens fit, not three
    assert _admitted(model, None, budget, 6) == (2, 4)
    assert _admitted(model, torch.bfloat16, budget, 6) == (4, 2)
    assert _admitted(model, torch.float16, budget, 6) == (4, 2)


def test_bf16_cache_serves_generates_tokens_close_to_fp32(runs):
    """The bf16 server's greedy text is `generate(..., cache_dtype=bfloat16)`'s token for token (the same path, so
    on any CPU), and its first tokens are fp32's: on these prompts fp32's top-two logit margin over 12 tokens is
    ≥ 0.44, over twice the largest logit change a bf16 cache makes there (≤ 0.18), so no CPU kind flips them."""
    prompts = ["the cat", "zz", "x y z", "ok"]
    servers = {d: BackgroundServer(runs["dense"], ServeConfig(port=0, cache_dtype=d)) for d in ("fp32", "bf16")}
    try:
        assert metrics(servers["bf16"])["dynaformer_kv_element_bytes"] == 2
        assert metrics(servers["fp32"])["dynaformer_kv_element_bytes"] == 4
        assert (2 * metrics(servers["bf16"])["dynaformer_kv_bytes_per_context_sequence"]
                == metrics(servers["fp32"])["dynaformer_kv_bytes_per_context_sequence"])
        bf16 = greedy(servers["bf16"], prompts, 20)
        fp32 = greedy(servers["fp32"], prompts, 20)
    finally:
        for s in servers.values():
            s.close()
    model, tok, _ = load_model(runs["dense"])
    for p, text in zip(prompts, bf16, strict=True):
        out = generate(model, torch.tensor([tok.encode(p)]), 20, temperature=0, cache_dtype=torch.bfloat16)
        assert tok.decode(out[0].tolist())[len(p):] == text
    assert [t[:8] for t in bf16] == [t[:8] for t in fp32]


def test_bad_cache_dtype_is_one_line(runs, capsys):
    res = cli_in_process(capsys, "serve", str(runs["dense"]), "--cache_dtype", "fp8")
    assert_user_error(res, "serve.cache_dtype", "bf16")


# --- an exported folder ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    from dynaformer.hf.export import export_hf

    base = tmp_path_factory.mktemp("serve-exports")
    return {kind: Path(export_hf(run, base / f"{kind}-hf")["out"]) for kind, run in runs.items()}


@pytest.mark.parametrize("kind", ["dense", "span"])
def test_an_export_serves_what_its_run_serves(runs, exports, kind):
    prompts = ["the cat", "hello there, world", "a"]
    started = [BackgroundServer(src, ServeConfig(port=0)) for src in (runs[kind], exports[kind])]
    try:
        run, export = started
        assert export.name == f"{kind}-hf" and [m.id for m in client(export).models.list().data] == [f"{kind}-hf"]
        assert greedy(export, prompts) == greedy(run, prompts)
        assert export.engine.max_sessions() == run.engine.max_sessions()  # the same cache, span-bounded or not
        r = HTTP.post(export.url + "/v1/completions", json={"prompt": "ÄÖ", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # the char vocabulary, as the run's
        r = HTTP.post(export.url + "/v1/completions", json={"prompt": "a<|pad|>", "max_tokens": 2})
        assert r.status_code == 400  # the export's pad token is no character of the vocabulary
    finally:
        for s in started:
            s.close()


def test_export_tokenizers_read_back_exactly(tmp_path):
    from dynaformer.data.bpe import train_bpe
    from dynaformer.hf.tokenization import from_hf_spec, to_hf_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 20 + "ünïcödé €"
    for tok in (CharTokenizer(sorted(set(text))), ByteTokenizer(), train_bpe([text], 300)):
        hf = to_hf_tokenizer(tok)
        hf.save_pretrained(tmp_path / tok.kind)
        spec = json.loads((tmp_path / tok.kind / "tokenizer.json").read_text())
        back = from_hf_spec(spec, tok.vocab_size)
        assert type(back) is type(tok) and back.encode(text) == tok.encode(text)
        assert back.to_dict() == tok.to_dict() or tok.kind == "bpe"


def test_a_source_that_is_none_of_the_three(runs, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for folder in (tmp_path / "notes", other, tmp_path / "notes" / "a.txt"):
        res = cli_in_process(capsys, "serve", str(folder))
        assert_user_error(res, "neither a run folder with a checkpoint, a step-N checkpoint nor an exported model",
                          "export-hf")
    assert_user_error(cli_in_process(capsys, "serve", str(tmp_path / "missing")), "does not exist", "export-hf")
