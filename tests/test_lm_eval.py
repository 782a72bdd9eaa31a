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

from dynaformer.lmeval.adapter import DynaformerLM  # noqa: E402

CHARS = sorted(set(generated_stories(20_000)))


# The adapter over the baseline and over each residual-stream relative (model/streams.py; the value residual rides
# along on two of them): the relatives carry more than one stream, which the adapter must never see.
LM_KINDS = [("prenorm", False), ("hyper", True), ("hyper_static", False), ("mhc", False), ("attnres", True)]


@pytest.fixture(scope="module", params=LM_KINDS, ids=lambda k: k[0] + ("+value_residual" if k[1] else ""))
def lm(request) -> DynaformerLM:
    residual, value_residual = request.param
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, context_len=32, residual=residual,
                                    value_residual=value_residual)).eval()
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


@pytest.fixture
def lm_eval_in_process(monkeypatch):
    """For lm-eval's command line run in this process. It indexes its ~15,000 built-in task files (15-20 s on a
    2-core machine) before anything else; tests that name only tasks on their own task paths index those paths
    alone, since what they check does not depend on the built-in tasks. Its log handler, bound to the stderr of
    the test that first ran it, is removed afterwards, so later tests never write to a closed stream."""
    import logging

    from lm_eval import tasks as lm_tasks
    from lm_eval import utils as lm_utils

    class LocalTaskManager(lm_tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_tasks, "TaskManager", LocalTaskManager)
    monkeypatch.setattr(lm_utils, "_LOGGING_CONFIGURED", getattr(lm_utils, "_LOGGING_CONFIGURED", False))
    logger = logging.getLogger("lm_eval")
    saved = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


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


# --- the whole chain, as people run it: train → export-hf → lm-eval's own CLI, offline ----------------

_TASKS = {
    "local_where": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "local_text": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "local_gen": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _local_tasks(folder) -> None:
    """Three lm-eval tasks over a JSON Lines file written here (no download): multiple choice, rolling
    log-likelihood, and generation (which lm-eval's HF model left-pads in batches)."""
    import random

    rng = random.Random(0)
    places = ["kitchen", "garden", "attic", "cellar"]
    docs = []
    for i in range(6):
        who, where = ["Ada", "Lars", "Hugo", "Mina"][i % 4], rng.choice(places)
        docs.append({"question": f"{who} went to the {where}. Where is {who}? In the",
                     "choices": [f" {p}." for p in places], "answer": places.index(where),
                     "text": generated_stories(60 + 40 * i, seed=i)})
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    for name, body in _TASKS.items():
        head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                f"test_split: test\n")
        (folder / f"{name}.yaml").write_text(head + body)


def _offline_env(tmp) -> dict:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "HF_MODULES_CACHE": str(tmp / "hf-modules"),
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _results(out_dir) -> dict:
    (path,) = [p for p in out_dir.rglob("results_*.json")]
    res = json.loads(path.read_text())["results"]
    return {t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, int | float) and "stderr" not in k}
            for t, m in res.items()}


def _samples(out_dir, task: str) -> dict:
    (path,) = [p for p in out_dir.rglob(f"samples_{task}_*.jsonl")]
    return {r["doc_id"]: r["filtered_resps"] for r in map(json.loads, path.read_text().splitlines())}


def test_lm_eval_chain_offline(tmp_path, capsys, monkeypatch, lm_eval_in_process):
    """`lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True` (lm-eval's own command, in its
    own process) scores local tasks on an exported folder and agrees with our model run through `dynaformer
    lm-eval` (within 1e-5) and through `dynaformer eval --lm-eval --include_path` (both in this process)."""
    from dynaformer.cli import main

    bin_dir = os.path.dirname(sys.executable)
    lm_eval_cmd = os.path.join(bin_dir, "lm_eval")
    if not os.path.exists(lm_eval_cmd):
        pytest.skip("lm-eval's console script is not installed beside this Python")
    pytest.importorskip("accelerate", reason="lm-eval's HF model needs accelerate (the [eval] extra installs it)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(generated_stories(30_000, seed=1))
    tok = tmp_path / "tok.json"
    assert main(["data", "tokenizer", "--vocab", "300", str(corpus), "--out", str(tok)]) == 0
    run = tmp_path / "run"
    assert main(["train", "--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "48",
                 "--batch_size", "2", "--eval_tokens", "96", "--progress_bar", "false", "--max_steps", "3",
                 "--residual", "dynamic", "--span", "dynamic", "--span_max", "24", "--span_init", "6",
                 "--data", str(corpus), "--out", str(run), "--tokenizer", "bpe", "--tokenizer_file", str(tok)]) == 0
    export = tmp_path / "export"
    assert main(["export-hf", str(run), str(export)]) == 0
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    _local_tasks(tasks_dir)
    env = _offline_env(tmp_path)
    common = ["--tasks", "local_where,local_text,local_gen", "--include_path", str(tasks_dir), "--batch_size", "4",
              "--log_samples"]
    hf = subprocess.run([lm_eval_cmd, "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
                         *common, "--output_path", str(tmp_path / "out-hf")],
                        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert hf.returncode == 0, hf.stderr[-3000:]
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    capsys.readouterr()
    # lm-eval asks for cuda:0 by default: our model falls back to the CPU, and says so
    with pytest.warns(UserWarning, match="CUDA is not available"):
        rc = main(["lm-eval", "--model_args", f"pretrained={run}", *common, "--output_path",
                   str(tmp_path / "out-ours")])
    assert rc == 0, capsys.readouterr().err[-3000:]
    a, b = _results(tmp_path / "out-hf"), _results(tmp_path / "out-ours")
    assert set(a) == set(b) == {"local_where", "local_text", "local_gen"}
    for task in a:
        for metric, value in a[task].items():
            assert b[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-5), (task, metric)
    assert a["local_text"]["bits_per_byte"] > 0
    # generation: lm-eval's HF model left-pads batches of 4; the texts equal ours, generated one at a time
    gen_a, gen_b = _samples(tmp_path / "out-hf", "local_gen"), _samples(tmp_path / "out-ours", "local_gen")
    assert gen_a == gen_b and len(gen_a) == 6 and any(gen_a.values())
    # the same tasks through `dynaformer eval --lm-eval --include_path`
    capsys.readouterr()
    rc = main(["eval", str(run), "--lm-eval", "local_where,local_text", "--include_path", str(tasks_dir), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    mine = json.loads(out.out.strip().splitlines()[-1])["results"]
    assert mine["local_text"]["bits_per_byte"] == pytest.approx(a["local_text"]["bits_per_byte"], rel=1e-5)
    assert mine["local_where"]["acc"] == a["local_where"]["acc"]


def test_include_path_must_be_a_folder(trained_run, tmp_path, capsys):
    from dynaformer.cli import main

    capsys.readouterr()
    rc = main(["eval", str(trained_run), "--lm-eval", "x", "--include_path", str(tmp_path / "nope")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "--include_path" in err[0]


def test_device_falls_back_to_cpu(trained_run):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: nothing to fall back from")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        lm = DynaformerLM(pretrained=str(trained_run), device="cuda:0", batch_size="auto")
    assert lm.device.type == "cpu" and lm.batch_size == 16


def test_lm_eval_command_with_a_missing_run_is_one_line(tmp_path, capsys, lm_eval_in_process):
    """`dynaformer lm-eval` runs lm-eval's CLI in-process; our model's own errors still end as one line, exit 2."""
    from dynaformer.cli import main

    capsys.readouterr()
    rc = main(["lm-eval", "--model_args", f"run={tmp_path / 'missing'}", "--device", "cpu", "--tasks",
               "dynaformer_story_qa"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == f"dynaformer lm-eval: error: '{tmp_path / 'missing'}' does not exist"
