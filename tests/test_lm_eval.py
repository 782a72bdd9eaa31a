"""lm-evaluation-harness adapter: batched scores equal a one-at-a-time reference, rolling log-likelihood
equals the full-sequence one, generation stops at the stop string; a bundled task runs offline from the
CLI and returns a number; an unknown task exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dynaformer.data import CharTokenizer
from dynaformer.data.corpus import generated_stories
from dynaformer.model import Transformer
from dynaformer.model.generate import generate

from .conftest import ROOT, tiny_config

pytest.importorskip("lm_eval", reason="needs the [eval] extra: pip install 'dynaformer[eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

from dynaformer.eval.lm_harness import DynaformerLM  # noqa: E402

CHARS = sorted(set(generated_stories(20_000)))


@pytest.fixture(scope="module")
def lm() -> DynaformerLM:
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, context_len=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # a peaked distribution, so greedy answers are not ties
    return DynaformerLM(model, tok, batch_size=3)


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _reference_ll(lm: DynaformerLM, ctx: str, cont: str) -> tuple[float, bool]:
    ids = lm.tok.encode(ctx + cont)[-(lm.max_length + 1):]
    n = len(lm.tok.encode(cont))
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(x)[0][0], dim=-1)[-n:]
    tgt = torch.tensor(ids[-n:])
    return logp.gather(-1, tgt[:, None]).sum().item(), bool((logp.argmax(-1) == tgt).all())


def test_loglikelihood_matches_reference(lm):
    pairs = [("Ada went to the", " kitchen."), ("Where is Ada?", " In the attic."), ("a", "b"),
             (generated_stories(200, seed=2), " The end."),  # longer than the window: cut from the left
             ("Lars took the", " map.")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (c, x), (ll, greedy) in zip(pairs, got, strict=True):
        ref_ll, ref_greedy = _reference_ll(lm, c, x)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    # is_greedy is true for the model's own greedy continuation
    ctx = "Hugo walked to the"
    cont = lm.tok.decode(generate(lm.model, torch.tensor([lm.tok.encode(ctx)]), 3, temperature=0)[0, -3:].tolist())
    assert lm.loglikelihood([_req("loglikelihood", ctx, cont)])[0][1]


def test_rolling_equals_full_sequence(lm):
    text = "Ada went to the kitchen."  # fits in one window: rolling == one pass after the prefix token
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    ids = [lm.prefix_token_id] + lm.tok.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0][0], dim=-1)
    ref = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert got == pytest.approx(ref, abs=1e-4)
    long = generated_stories(300, seed=4)  # several windows: every token is predicted exactly once
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", long)])
    assert ll < 0 and torch.isfinite(torch.tensor(ll))


def test_generate_until_stops(lm):
    ctx = "Where is Ada? In the"
    (out,) = lm.generate_until([_req("generate_until", ctx, {"until": ["\n"], "max_gen_toks": 40})])
    full = generate(lm.model, torch.tensor([lm.tok.encode(ctx)]), 40, temperature=0)
    ref = lm.tok.decode(full[0, len(ctx):].tolist())
    assert out == ref.split("\n")[0]
    stop = ref[3] if len(ref) > 4 else "\n"
    (cut,) = lm.generate_until([_req("generate_until", ctx, {"until": [stop], "max_gen_toks": 40})])
    assert stop not in cut and ref.startswith(cut)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    data = tmp / "stories.txt"
    data.write_text(generated_stories(20_000, seed=1))
    run = tmp / "run"
    from dynaformer.cli import main

    rc = main(["train", "--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "64",
               "--batch_size", "2", "--eval_tokens", "128", "--progress_bar", "false", "--max_steps", "2",
               "--data", str(data), "--out", str(run), "--tokenizer", "char"])
    assert rc == 0
    return run


def _cli_offline(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dynaformer.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def test_bundled_task_offline(trained_run):
    res = _cli_offline("eval", str(trained_run), "--lm-eval", "dynaformer_story_qa,dynaformer_stories_ppl",
                       "--limit", "6", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    acc = out["results"]["dynaformer_story_qa"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert out["results"]["dynaformer_stories_ppl"]["bits_per_byte"] > 0


def test_unknown_task(trained_run, capsys):
    from dynaformer.cli import main

    capsys.readouterr()
    rc = main(["eval", str(trained_run), "--lm-eval", "dynaformer_story_qa,dynaformer_no_such_task"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "dynaformer_no_such_task" in err[0] and "dynaformer_story_qa" in err[0]
