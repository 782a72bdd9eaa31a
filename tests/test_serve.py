"""`dynaformer serve` as its users meet it: the official `openai` client against a server started on a free loopback
port (in this process on a thread; a subprocess for SIGTERM). Completions, streaming, stop strings, seeds; greedy
results equal to `dynaformer generate --temperature 0` alone and under concurrent batching (a dense and a span
model); every bad request a 400 naming the field; 401, 429, 503; a client that disconnects frees its cache; SIGTERM
drains and exits 0; bad command-line input is one line and exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from dynaformer.configtools import to_dict
from dynaformer.data.tokenizers import ByteTokenizer, CharTokenizer
from dynaformer.model import ModelConfig, Transformer
from dynaformer.runs import generate_from_run
from dynaformer.serve.config import ServeConfig
from dynaformer.serve.engine import TextStream
from dynaformer.serve.server import BackgroundServer
from dynaformer.train.checkpoint import save_checkpoint

from .conftest import ROOT, assert_user_error, cli_in_process

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz .,!?\n"))
# Tiny models with weights far from their init (greedy text that varies), 2,048 positions so a long
# generation takes long enough to disconnect from or drain in the middle of.
DENSE = dict(context_len=2048, n_layer=2, n_head=2, d_model=32)
SPAN = dict(DENSE, residual="dynamic", span="dynamic", span_max=16, span_ramp=4, span_init=8.0)
PROMPTS = ["a", "the cat", "hello there, world", "zz", "quiet night.\nthe", "x y z", "to be or not to be", "ok"]


def make_run(folder: Path, progress: float = 0.0, **model) -> Path:
    """A run folder (one verified checkpoint, char tokenizer) of a randomly initialised, perturbed model."""
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **model)
    net = Transformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net.progress.fill_(progress)  # where training stopped: a learned span's cache bound depends on it
    save_checkpoint(folder, 1, net.state_dict(), {"model": to_dict(cfg), "tokenizer": tok.to_dict()}, {"step": 1})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("serve-runs")
    return {"dense": make_run(base / "dense", **DENSE), "span": make_run(base / "span", **SPAN)}


@pytest.fixture(scope="module")
def servers(runs):
    started = {kind: BackgroundServer(run, ServeConfig(port=0, max_batch=16)) for kind, run in runs.items()}
    yield started
    for s in started.values():
        s.close()


HTTP = httpx.Client(timeout=60)  # one client: each new one builds an SSL context (~0.1 s)


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                         http_client=HTTP, **kw)


def metrics(server) -> dict[str, float]:
    text = HTTP.get(server.url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dynaformer_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def wait_idle(server, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["dynaformer_active_sequences"] == 0 and m["dynaformer_kv_bytes_in_use"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def test_models_completion_and_usage(servers):
    server = servers["dense"]
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["dense"]
    r = c.completions.create(model="dense", prompt="the cat", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "dense" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].text) == 12  # a char tokenizer
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 12, 19)
    assert HTTP.get(server.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("kind", ["dense", "span"])
def test_greedy_equals_generate_alone_and_batched(servers, runs, kind):
    """Token for token what `dynaformer generate --temperature 0` gives: one request at a time, 8 concurrent
    requests of different lengths (decoded together), and one request holding all 8 prompts."""
    server = servers[kind]
    lengths = [5 + 7 * i for i in range(len(PROMPTS))]  # each sequence leaves the batch at its own step
    expected = [generate_from_run(runs[kind], p, n, temperature=0)[len(p):]
                for p, n in zip(PROMPTS, lengths, strict=True)]
    assert len(set(expected)) == len(expected) and len(set("".join(expected))) > 8  # varied text
    c = client(server)
    alone = [c.completions.create(model=kind, prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in zip(PROMPTS, lengths, strict=True)]
    assert alone == expected

    async def concurrent() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as ac:
            rs = await asyncio.gather(*(ac.completions.create(model=kind, prompt=p, max_tokens=n, temperature=0)
                                        for p, n in zip(PROMPTS, lengths, strict=True)))
        return [r.choices[0].text for r in rs]

    before = metrics(server)["dynaformer_tokens_generated_total"]
    assert asyncio.run(concurrent()) == expected
    assert metrics(server)["dynaformer_tokens_generated_total"] - before == sum(lengths)
    r = c.completions.create(model=kind, prompt=PROMPTS, max_tokens=5, temperature=0)  # greedy: a prefix
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [e[:5] for e in expected]
    assert wait_idle(server)["dynaformer_kv_bytes_in_use"] == 0


def test_streaming_matches_and_ends_with_done(servers):
    server = servers["span"]
    c = client(server)
    whole = c.completions.create(model="span", prompt="the cat", max_tokens=30, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="span", prompt="the cat", max_tokens=30, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length" and len(chunks) > 5
    body = {"model": "span", "prompt": ["a", "b"], "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with HTTP.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}
    finished = [json.loads(e)["choices"][0] for e in events[:-2] if json.loads(e)["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finished) == [0, 1]


def test_stop_strings(servers):
    server = servers["dense"]
    c = client(server)
    full = c.completions.create(model="dense", prompt="hello", max_tokens=40, temperature=0).choices[0].text
    stop = full[9:12]  # a stop string that first appears at or before position 9
    cut = full.index(stop)
    r = c.completions.create(model="dense", prompt="hello", max_tokens=40, temperature=0, stop=[stop, "\x00?"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model="dense", prompt="hello", max_tokens=40, temperature=0, stop=stop,
                                         stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_text_stream_holds_partial_characters_and_stop_prefixes():
    byte = ByteTokenizer()
    s = TextStream(byte.decode)
    out = [s.push(b) for b in "a€b".encode()]
    assert out == ["a", "", "", "€", "b"] and s.flush() == ""
    s = TextStream(byte.decode, stop=("END",))
    out = "".join(s.push(b) for b in b"xyEN")
    assert out == "xy" and not s.stopped  # "EN" may begin the stop string: held back
    assert s.push(ord("D")) == "" and s.stopped and s.text == "xy"
    s = TextStream(byte.decode, stop=("END",))
    assert "".join(s.push(b) for b in b"xyEN") + s.flush() == "xyEN"  # ended by length: released


def test_seeded_sampling_reproducible(servers, runs):
    server = servers["span"]
    c = client(server)
    args = dict(model="span", prompt="the", max_tokens=25, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=7, **args).choices[0].text
    assert a == c.completions.create(seed=7, **args).choices[0].text
    assert a == generate_from_run(runs["span"], "the", 25, temperature=1.0, top_p=0.9, seed=7)[3:]
    assert a != c.completions.create(seed=8, **args).choices[0].text

    async def beside_others() -> str:  # the same sample while other requests share its batch
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as ac:
            rs = await asyncio.gather(*(ac.completions.create(**{**args, "seed": s, "prompt": p})
                                        for s, p in [(1, "a b"), (7, "the"), (3, "zz top")]))
        return rs[1].choices[0].text

    assert asyncio.run(beside_others()) == a
    topk = c.completions.create(seed=7, extra_body={"top_k": 1}, **{**args, "top_p": 1.0}).choices[0].text
    assert topk == c.completions.create(model="span", prompt="the", max_tokens=25, temperature=0).choices[0].text


def sampled(server, prompt, seed: int, n: int = 1, **kw) -> list[str]:
    """The choices' texts of one seeded sampling request, in index order (checked to be 0..len-1)."""
    r = client(server).completions.create(model=server.name, prompt=prompt, max_tokens=kw.pop("max_tokens", 20),
                                          temperature=1.0, top_p=0.9, seed=seed, n=n, **kw)
    assert sorted(ch.index for ch in r.choices) == list(range(len(r.choices)))
    return [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]


def test_n_choices_are_the_derived_seeds_single_requests(servers):
    """n choices of a seeded request: choice j samples what a one-choice request seeded seed + j gives, so the
    choices differ and the whole response is reproducible; a list of prompts numbers them prompt × n + j."""
    server = servers["span"]
    three = sampled(server, "the", 7, n=3)
    assert three == [sampled(server, "the", s)[0] for s in (7, 8, 9)]
    assert len(set(three)) == 3 and sampled(server, "the", 7, n=3) == three
    four = sampled(server, ["the", "zz top"], 7, n=2, max_tokens=12)
    assert four == [sampled(server, p, s, max_tokens=12)[0] for p in ("the", "zz top") for s in (7, 8)]
    r = client(server).completions.create(model="span", prompt=["the", "zz top"], max_tokens=12, temperature=1.0,
                                          seed=7, n=2)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3 + 6, 4 * 12)


def test_n_choices_stream_each_chunk_naming_its_choice(servers):
    server = servers["span"]
    whole = sampled(server, ["a b", "the"], 5, n=3, max_tokens=15)
    body = {"prompt": ["a b", "the"], "max_tokens": 15, "temperature": 1.0, "top_p": 0.9, "seed": 5, "n": 3,
            "stream": True, "stream_options": {"include_usage": True}}
    with HTTP.stream("POST", server.url + "/v1/completions", json=body) as r:
        events = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 6 * 15
    texts, finished = [""] * 6, []
    for e in events[:-2]:
        (choice,) = json.loads(e)["choices"]  # one choice per chunk, named by its index
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finished.append(choice["index"])
    assert texts == whole and sorted(finished) == list(range(6))


def test_n_prefills_each_prompt_once(servers, monkeypatch):
    """A prompt's n sequences share one prefill: its cache is copied, not recomputed."""
    server = servers["dense"]
    model = server.engine.model
    calls: list[tuple[int, int]] = []
    real = model.hidden

    def counting(idx, *a, **kw):
        calls.append(tuple(idx.shape))
        return real(idx, *a, **kw)

    monkeypatch.setattr(model, "hidden", counting)
    texts = sampled(server, ["hello there", "the cat"], 3, n=4, max_tokens=6)
    prefills = [c for c in calls if c[1] > 1]
    assert sorted(prefills) == [(1, 7), (1, 11)]  # one forward per prompt, for 2 × 4 choices
    assert len(set(texts[:4])) > 1 and len(set(texts[4:])) > 1  # the copies sample apart


def test_greedy_n_choices_are_one_decoded_text(servers):
    """temperature 0 with n > 1 (OpenAI accepts it): n identical choices, decoded once, usage counting each."""
    server = servers["dense"]
    c = client(server)
    one = c.completions.create(model="dense", prompt="the cat", max_tokens=10, temperature=0).choices[0].text
    before = metrics(server)["dynaformer_tokens_generated_total"]
    r = c.completions.create(model="dense", prompt="the cat", max_tokens=10, temperature=0, n=3)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == [one] * 3
    assert r.usage.completion_tokens == 30
    assert metrics(server)["dynaformer_tokens_generated_total"] - before == 10


def test_n_choices_admitted_by_their_whole_kv_bytes(runs):
    """Admission charges all n caches: n whose caches never fit the budget, or that exceed the batch, is a 400
    naming n; a fitting n holds n caches' bytes while it runs, and gives them all back."""
    server = BackgroundServer(runs["dense"], ServeConfig(port=0, kv_budget_mb=1, max_batch=4))
    try:
        per = server.engine.kv_bytes(1 + 1000)  # prompt "a" + max_tokens
        assert 2 * per <= server.engine.kv_budget < 3 * per
        for body in ({"prompt": "a", "max_tokens": 1000, "n": 3}, {"prompt": "a", "max_tokens": 2, "n": 5}):
            r = HTTP.post(server.url + "/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
        assert r.json()["error"]["message"].count("max_batch") == 1
        r = HTTP.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1000, "n": 3,
                                                            "temperature": 0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3  # greedy: one sequence's bytes
        # decoding steps wait while the metrics are read: a fast machine could otherwise finish the request first
        gate, step = threading.Event(), server.engine._step
        server.engine._step = lambda: gate.wait(60) and step()
        body = {"prompt": "a", "max_tokens": 1000, "n": 2, "stream": True}
        try:
            with HTTP.stream("POST", server.url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                t0 = time.monotonic()
                while (m := metrics(server))["dynaformer_active_sequences"] < 2 and time.monotonic() - t0 < 30:
                    time.sleep(0.05)
                assert m["dynaformer_active_sequences"] == 2 and m["dynaformer_kv_bytes_in_use"] == 2 * per
                gate.set()
                assert sum(1 for ln in r.iter_lines() if ln.startswith("data: {")) > 2
        finally:
            gate.set()
        assert wait_idle(server)["dynaformer_kv_bytes_in_use"] == 0
    finally:
        server.close()


BAD = [
    ("{not json", None),
    ("[1, 2]", None),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "ÄÖ"}, "prompt"),  # characters outside the char tokenizer's vocabulary
    ({"prompt": [1, 10_000]}, "prompt"),
    ({"prompt": "a" * 2049}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 10**12}, "max_tokens"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ('{"prompt": "a", "temperature": NaN}', "temperature"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -5}, "top_k"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "seed": "x"}, "seed"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": -2}, "n"),
    ({"prompt": "a", "n": 1.5}, "n"),
    ({"prompt": "a", "n": "2"}, "n"),
    ({"prompt": "a", "n": True}, "n"),
    ({"prompt": "a", "n": 129}, "n"),
    ({"prompt": "a", "n": 2, "best_of": 3}, "best_of"),
    ({"prompt": "a", "logprobs": 3}, "logprobs"),
    ({"prompt": "a", "frobnicate": [1]}, "frobnicate"),
    ({"prompt": "a", "model": 3}, "model"),
]


def test_bad_requests_are_400_naming_the_field(servers):
    server = servers["dense"]
    for body, param in BAD:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = HTTP.post(server.url + "/v1/completions", headers={"content-type": "application/json"}, **kw)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["message"], (body, err)
        if param:
            assert param in err["message"] or param == "prompt", err
    r = HTTP.post(server.url + "/v1/completions", json={"prompt": "a", "model": "other"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).completions.create(model="dense", prompt="a", max_tokens=0)
    r = client(server).completions.create(model="dense", prompt="a", max_tokens=3)  # unaffected
    assert len(r.choices[0].text) == 3
    assert metrics(server)['dynaformer_requests_total{endpoint="/v1/completions",status="400"}'] >= len(BAD)


def test_api_key(runs, monkeypatch):
    monkeypatch.setenv("DYNAFORMER_API_KEY", "s3cret")
    server = BackgroundServer(runs["dense"], ServeConfig(port=0))
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").completions.create(model="dense", prompt="a", max_tokens=2)
        r = HTTP.get(server.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert HTTP.get(server.url + "/metrics").status_code == 401
        assert HTTP.get(server.url + "/health").status_code == 200  # probes need no key
        ok = client(server, api_key="s3cret").completions.create(model="dense", prompt="a", max_tokens=2)
        assert len(ok.choices[0].text) == 2
    finally:
        server.close()


def test_overload_429_and_draining_503(runs):
    server = BackgroundServer(runs["dense"], ServeConfig(port=0, max_queue=2, max_batch=1))
    try:
        r = HTTP.post(server.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 400 and "at most 2 prompts" in r.json()["error"]["message"]  # could never queue

        async def flood() -> list[int]:  # 12 at once: two wait (or one waits, one decodes), the rest are turned away
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
                rs = await asyncio.gather(*(ac.post("/v1/completions", json={"prompt": "a", "max_tokens": 400})
                                            for _ in range(12)))
                return [x.status_code for x in rs]

        codes = asyncio.run(flood())
        assert set(codes) <= {200, 429} and codes.count(429) >= 8 and codes.count(200) >= 2, codes
        m = metrics(server)
        assert m['dynaformer_requests_total{endpoint="/v1/completions",status="429"}'] == codes.count(429)
        assert wait_idle(server)["dynaformer_queue_length"] == 0
        server.engine.drain(30)
        r = HTTP.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert HTTP.get(server.url + "/health").status_code == 503
    finally:
        server.close()


def test_disconnect_frees_the_cache_and_drain_deadline_cancels(runs):
    server = BackgroundServer(runs["span"], ServeConfig(port=0))
    try:
        before = metrics(server)["dynaformer_tokens_generated_total"]
        body = {"prompt": "the", "max_tokens": 2000, "stream": True}
        with HTTP.stream("POST", server.url + "/v1/completions", json=body) as r:
            next(r.iter_lines())  # the first token arrived; then the client goes away
        m = wait_idle(server)
        assert m["dynaformer_active_sequences"] == 0 and m["dynaformer_kv_bytes_in_use"] == 0
        assert m["dynaformer_tokens_generated_total"] - before < 2000  # stopped early, not run to the end

        events: list[str] = []

        def reader() -> None:
            with HTTP.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
                events.extend(ln for ln in r.iter_lines() if ln.startswith("data: "))

        t = threading.Thread(target=reader)
        t.start()
        while metrics(server)["dynaformer_active_sequences"] == 0:
            time.sleep(0.01)
        server.engine.drain(0.0)  # the deadline is now: the in-flight request is cancelled
        t.join(10)
        assert events[-1] == "data: [DONE]" and "cancelled" in events[-2]
        assert wait_idle(server)["dynaformer_kv_bytes_in_use"] == 0
    finally:
        server.close()


def test_span_cache_admits_more_sessions(servers):
    dense, span = (metrics(servers[k]) for k in ("dense", "span"))
    assert dense["dynaformer_kv_budget_bytes"] == span["dynaformer_kv_budget_bytes"]
    assert span["dynaformer_kv_bytes_per_context_sequence"] * 20 < dense["dynaformer_kv_bytes_per_context_sequence"]
    assert span["dynaformer_kv_max_sessions"] > 20 * dense["dynaformer_kv_max_sessions"]


def test_sigterm_drains_in_flight_and_exits_0(runs):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dynaformer.entry", "serve", str(runs["dense"]), "--port", "0",
                             "--drain_s", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://[\d.:]+)/v1", line).group(1)
        events: list[str] = []
        first = threading.Event()

        def reader() -> None:
            body = {"prompt": "the", "max_tokens": 300, "stream": True, "temperature": 0}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for ln in r.iter_lines():
                    if ln.startswith("data: "):
                        events.append(ln)
                        first.set()

        t = threading.Thread(target=reader)
        t.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert proc.wait(30) == 0, proc.stderr.read()
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut off
        assert len("".join(c["choices"][0]["text"] for c in chunks)) == 300
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_command_lines(runs, tmp_path, capsys, monkeypatch):
    res = cli_in_process(capsys, "serve", str(tmp_path / "missing"))
    assert_user_error(res, "does not exist")
    res = cli_in_process(capsys, "serve", str(runs["dense"]), "--kv_budget_mb", "-1")
    assert_user_error(res, "serve.kv_budget_mb")
    res = cli_in_process(capsys, "serve", str(runs["dense"]), "--kv_budget_mb", "lots")
    assert_user_error(res, "serve.kv_budget_mb")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        res = cli_in_process(capsys, "serve", str(runs["dense"]), "--port", str(busy.getsockname()[1]))
    assert_user_error(res, "cannot listen on 127.0.0.1")
    import dynaformer.extras

    real = dynaformer.extras.importlib.util.find_spec
    monkeypatch.setattr(dynaformer.extras.importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert_user_error(cli_in_process(capsys, "serve", str(runs["dense"])), "dynaformer[serve]")
