"""transformers integration: save → from_pretrained gives identical logits, HF generate (with and without
cache, greedy and beam) equals our own sampler, for every residual and span kind; export-hf end to end
with AutoModelForCausalLM / AutoTokenizer; bad inputs exit 2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaformer.configtools import to_dict
from dynaformer.data import ByteTokenizer, CharTokenizer
from dynaformer.model import Transformer
from dynaformer.model.generate import generate

from .conftest import MATRIX, MATRIX_SETS, tiny_config, trained_like
from .conftest import assert_user_error as _one_line_error
from .conftest import cli_in_process as _cli

pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'dynaformer[hf]'")
pytest.importorskip("tokenizers", reason="needs the [hf] extra: pip install 'dynaformer[hf]'")

from dynaformer.hf import DynaformerCache, DynaformerForCausalLM  # noqa: E402
from dynaformer.hf.tokenization import to_hf_tokenizer  # noqa: E402


@pytest.mark.parametrize("residual,span", MATRIX)
def test_save_from_pretrained_identical(residual, span, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = trained_like(residual, span)
    DynaformerForCausalLM.from_dynaformer(model).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).dynaformer == to_dict(model.cfg)  # every field round-trips
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DynaformerForCausalLM)
    theirs = loaded.model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, theirs[name]), name
    assert torch.equal(loaded.model.rotary.inv_freq, model.rotary.inv_freq)  # non-persistent, rebuilt on load
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x)[0])
    if model.cfg.tie_embeddings:
        assert loaded.model.head.weight is loaded.model.embed.weight


@pytest.mark.parametrize("residual,span", MATRIX)
def test_generate_cached_uncached_and_ours(residual, span):
    model = trained_like(residual, span)
    hf = DynaformerForCausalLM.from_dynaformer(model).eval()
    prompt = torch.randint(0, 64, (2, 6))
    n = 40  # past context_len=32: the cache is regrown from its tokens on the way
    a = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True)
    b = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=False)
    ours = generate(model, prompt, n, temperature=0.0, max_len=prompt.shape[1] + n)  # no sliding window
    assert a.shape == (2, 6 + n)
    assert torch.equal(a, b) and torch.equal(a, ours)
    beam_a = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=3, use_cache=True)
    beam_b = hf.generate(prompt, max_new_tokens=12, do_sample=False, num_beams=3, use_cache=False)
    assert torch.equal(beam_a, beam_b)


def test_cache_step_by_step_matches_full_forward():
    model = trained_like("prenorm", "none")
    hf = DynaformerForCausalLM.from_dynaformer(model).eval()
    x = torch.randint(0, 64, (1, 50))
    with torch.no_grad():
        full = hf(x, use_cache=False).logits
        out = hf(x[:, :7], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, DynaformerCache) and cache.get_seq_length() == 7
        steps = [out.logits]
        for t in range(7, 50):
            out = hf(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        assert cache.get_seq_length() == 50 and cache.capacity >= 50
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_labels_loss_and_padding():
    model = trained_like("prenorm", "none")
    hf = DynaformerForCausalLM.from_dynaformer(model)
    x = torch.randint(0, 64, (2, 16))
    labels = x.clone()
    labels[0, 10:] = -100
    out = hf(x, labels=labels)
    _, ref = model(x[:, :-1], targets=labels[:, 1:])
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()  # trainable through the wrapper
    assert model.embed.weight.grad is not None
    right = torch.ones(2, 16, dtype=torch.long)
    right[1, 12:] = 0
    with torch.no_grad():
        torch.testing.assert_close(hf(x, attention_mask=right, use_cache=False).logits[1, :12],
                                   model(x[1:, :12])[0][0], rtol=0, atol=2e-5)
        left = right.flip(1)  # row 1 = 4 pads, then x[1, 4:] as if alone
        for use_cache in (False, True):
            got = hf(x, attention_mask=left, use_cache=use_cache).logits[1, 4:]
            torch.testing.assert_close(got, model(x[1:, 4:])[0][0], rtol=0, atol=2e-5)
        holes = torch.ones(2, 16, dtype=torch.long)
        holes[0, 5] = 0
        with pytest.raises(ValueError, match="padding between real tokens"):
            hf(x, attention_mask=holes)
        with pytest.raises(ValueError, match="shape"):
            hf(x, attention_mask=holes[:, :10])
    # labels at padded positions are not scored: the padded batch's loss is the unpadded row's
    left_labels = x.clone()
    loss = hf(x[1:], attention_mask=left[1:], labels=left_labels[1:]).loss
    _, ref = model(x[1:, 4:-1], targets=x[1:, 5:])
    torch.testing.assert_close(loss, ref, rtol=0, atol=2e-5)


def test_hidden_states_and_attentions():
    model = trained_like("dynamic", "dynamic")
    hf = DynaformerForCausalLM.from_dynaformer(model).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        for use_cache in (False, True):
            out = hf(x, output_hidden_states=True, use_cache=use_cache)
            hs = out.hidden_states
            assert len(hs) == model.cfg.n_layer + 1 and all(h.shape == (2, 9, 32) for h in hs)
            assert torch.equal(hs[0], model.embed(x))
            assert torch.equal(model.head(hs[-1]), out.logits)  # the last one is normed: it gives the logits
        assert hf(x).hidden_states is None
        with pytest.raises(ValueError, match="attention weights"):
            hf(x, output_attentions=True)


def test_resize_token_embeddings_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = trained_like("dynamic", "per_head")
    hf = DynaformerForCausalLM.from_dynaformer(model)
    hf.resize_token_embeddings(70)
    assert hf.config.vocab_size == 70 and hf.config.dynaformer["vocab_size"] == 70
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.model.embed.weight.shape == (70, 32) and loaded.model.cfg.vocab_size == 70
    x = torch.randint(0, 70, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, hf.eval()(x).logits)
        assert loaded(x).logits.shape[-1] == 70


def test_no_deprecation_warning_from_our_calls():
    """transformers 5.24 renamed `past_key_values` to `cache`; the wrapper uses each version's own name, so
    generate(), a cached forward and reading its output log no deprecation warning."""
    import logging

    from transformers.utils import logging as hf_logging

    lg = hf_logging.get_logger("transformers")
    for fn in (getattr(logging.Logger, "warning_once", None), getattr(logging.Logger, "info_once", None)):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()  # warnings logged once per process: forget earlier tests' ones
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    lg.addHandler(handler)
    try:
        hf = DynaformerForCausalLM.from_dynaformer(trained_like("prenorm", "fixed")).eval()
        x = torch.randint(0, 64, (1, 5))
        hf.generate(x, max_new_tokens=4, do_sample=False)
        hf.generate(x, max_new_tokens=4, do_sample=False, num_beams=2)
        out = hf(x, use_cache=True)
        hf(x[:, -1:], attention_mask=torch.ones(1, 6, dtype=torch.long), use_cache=True,
           **{"cache" if "cache" in out else "past_key_values": out["cache" if "cache" in out else "past_key_values"]})
    finally:
        lg.removeHandler(handler)
    assert not [r for r in records if "deprecat" in r.lower()], records


def test_init_weights_gives_our_init_not_hfs(tmp_path):
    """A tensor missing from the checkpoint is initialised as our Transformer does (GPT-2 scaled branch
    output, std init_std/√(2·n_layer)), not with HF's generic N(0, 0.02)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(n_layer=8, d_model=64, n_head=2)
    DynaformerForCausalLM.from_dynaformer(Transformer(cfg)).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.blocks.0.attn.proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    std = loaded.model.blocks[0].attn.proj.weight.std().item()
    assert 0.0035 < std < 0.0065, std  # 0.02 / 4 = 0.005; HF's generic init would give 0.02
    assert not hasattr(loaded, "_reference")


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60))
def test_byte_tokenizer_as_hf(text):
    hf = to_hf_tokenizer(ByteTokenizer())
    ids = hf(text)["input_ids"]
    assert ids == ByteTokenizer().encode(text)
    assert hf.decode(ids) == text


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="ab \n\tçé😀.", max_size=60))
def test_char_tokenizer_as_hf(text):
    tok = CharTokenizer.fit("ab \n\tçé😀.")
    hf = to_hf_tokenizer(tok)
    ids = hf(text)["input_ids"]
    assert ids == tok.encode(text)
    assert hf.decode(ids) == text


# --- export-hf, end to end ---------------------------------------------------------------------------

TINY = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--batch_size", "2",
        "--eval_tokens", "64", "--progress_bar", "false", "--max_steps", "2", "--warmup_steps", "0"]






def test_export_hf_end_to_end(tmp_path, text_file, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynaformer.runs import load_model

    run = tmp_path / "run"
    res = _cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(run), "--tokenizer", "char")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "hf"
    res = _cli(capsys, "export-hf", str(run), str(out), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(info["files"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ours, our_tok, _ = load_model(run)
    text = "Ada went to the garden."
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == our_tok.encode(text)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids)[0])
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(gen[0]).startswith(text)
    assert torch.equal(gen, generate(ours, ids, 8, temperature=0.0))

    # bad inputs: one line, exit 2
    _one_line_error(_cli(capsys, "export-hf", str(run), str(out)), "not empty")
    (tmp_path / "empty_run").mkdir()
    _one_line_error(_cli(capsys, "export-hf", str(tmp_path / "empty_run"), str(tmp_path / "o2")),
                    "no complete checkpoint")
    other = tmp_path / "other_tok.json"
    other.write_text(json.dumps(CharTokenizer.fit("xyz").to_dict()))
    _one_line_error(_cli(capsys, "export-hf", str(run), str(tmp_path / "o3"), "--tokenizer", str(other)),
                    "vocabulary")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_export_never_deletes_what_it_did_not_write(tmp_path, text_file, capsys):
    """export-hf OUT may not be, contain or lie inside the run; --force replaces only a previous export."""
    run = tmp_path / "sub" / "run"
    res = _cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(run), "--tokenizer", "char")
    assert res.returncode == 0, res.stderr
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    for out in (run, tmp_path / "sub", run / "hf", run / "step-2" / "hf", tmp_path):
        _one_line_error(_cli(capsys, "export-hf", str(run), str(out), "--force"), "run folder")
    _one_line_error(_cli(capsys, "export-hf", str(run / "step-2"), str(run / "x"), "--force"), "run folder")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _one_line_error(_cli(capsys, "export-hf", str(run), str(tmp_path / "mine"), "--force"), "not a previous")
    after = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert after == sorted(before + ["mine", "mine/notes.txt"])
    out = tmp_path / "hf"
    assert _cli(capsys, "export-hf", str(run), str(out)).returncode == 0
    assert (out / ".dynaformer-export").is_file()
    assert _cli(capsys, "export-hf", str(run), str(out), "--force").returncode == 0  # a previous export: replaced
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".hf.*"))


def test_encoder_is_not_a_causal_lm():
    with pytest.raises(ValueError, match="causal=false"):
        DynaformerForCausalLM.from_dynaformer(Transformer(tiny_config(causal=False)))


# --- a self-contained export, loaded where dynaformer is not installed ----------------------------------

_CHILD = r'''
import importlib.util, json, sys
import torch
assert importlib.util.find_spec("dynaformer") is None, "dynaformer is importable in the fresh environment"
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
torch.set_num_threads(1)
job = json.loads(sys.argv[1])
out = {}
for name in job["folders"]:
    model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    ids, mask = torch.tensor(job["ids"]), torch.tensor(job["mask"])
    with torch.no_grad():
        out[name + "/logits"] = model(ids[:, -job["plain"]:]).logits
        out[name + "/padded"] = model(ids, attention_mask=mask).logits
    out[name + "/generate"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                             pad_token_id=job["pad"])
if job.get("text"):
    name = job["text"]
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
    assert tok.pad_token is not None and tok.padding_side == "left"
    gen = pipeline("text-generation", model=name, tokenizer=tok, trust_remote_code=True)
    prompts = ["Ada went to the", "Bo", "Where is Lars? In the"]
    batched = gen(prompts, batch_size=3, max_new_tokens=6, do_sample=False)
    alone = [gen(p, max_new_tokens=6, do_sample=False) for p in prompts]
    assert batched == alone, (batched, alone)
    out["text/ids"] = tok(prompts[0], return_tensors="pt").input_ids
    out["text/pipeline"] = [b[0]["generated_text"] for b in batched]
if job.get("card"):  # the model card's first snippet, as a user pastes it (stdin closed: a prompt would fail)
    import contextlib, io, pathlib
    card = pathlib.Path(job["card"], "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    out["card/printed"] = printed.getvalue()
leaked = sorted(m for m in sys.modules if m == "dynaformer" or m.startswith("dynaformer."))
assert not leaked, leaked
torch.save(out, job["out"])
'''


def _python_without_dynaformer(tmp_path: Path) -> str:
    """A new virtual environment that sees this one's packages (torch, transformers, safetensors, ...) through
    symlinks, all but dynaformer itself: no dynaformer folder, no editable-install hook, no source path."""
    import site
    import venv

    shared = tmp_path / "shared-site"
    shared.mkdir()
    for d in site.getsitepackages():
        for entry in sorted(Path(d).iterdir()):
            name = entry.name.lower()
            skip = name.startswith(("dynaformer", "__editable__")) or name.endswith(".pth")
            if not skip and not (shared / entry.name).exists():
                (shared / entry.name).symlink_to(entry)
    env_dir = tmp_path / "fresh-venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "shared.pth").write_text(str(shared) + "\n")
    return python


@pytest.mark.parametrize("pairs", MATRIX_SETS)
def test_export_loads_without_dynaformer(tmp_path, text_file, capsys, pairs):
    """The exported folder carries its model code: a fresh environment with transformers, torch and safetensors
    but no dynaformer loads it with trust_remote_code=True and gets our logits bit for bit, for every residual ×
    span kind (the relatives' other pairs where slow tests run); its tokenizer pads and the text-generation
    pipeline batches."""
    from dynaformer.hf.export import save_self_contained
    from dynaformer.runs import load_model

    run = tmp_path / "run"
    res = _cli(capsys, "train", *TINY, "--data", str(text_file), "--out", str(run), "--tokenizer", "char",
               "--residual", "dynamic", "--span", "dynamic", "--span_max", "16", "--span_init", "4")
    assert res.returncode == 0, res.stderr
    assert _cli(capsys, "export-hf", str(run), str(tmp_path / "cli-export")).returncode == 0
    exported = json.loads((tmp_path / "cli-export" / "config.json").read_text())
    assert exported["auto_map"]["AutoModelForCausalLM"] == "modeling_dynaformer.DynaformerForCausalLM"
    assert (tmp_path / "cli-export" / "modeling_dynaformer.py").is_file()
    models = {"cli-export": load_model(run)[0]}
    for residual, span in pairs:
        models[f"{residual}-{span}"] = m = trained_like(residual, span)
        save_self_contained(DynaformerForCausalLM.from_dynaformer(m), tmp_path / f"{residual}-{span}")
    ids = torch.randint(0, 40, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    job = {"folders": list(models), "ids": ids.tolist(), "mask": mask.tolist(), "plain": 11, "pad": 0,
           "text": "cli-export", "card": "cli-export", "out": str(tmp_path / "child.pt")}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf-modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([_python_without_dynaformer(tmp_path), "-c", _CHILD, json.dumps(job)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, "\n".join(ln for ln in res.stderr.splitlines() if "it/s]" not in ln)[-3000:]
    theirs = torch.load(tmp_path / "child.pt", weights_only=True)
    for name, model in models.items():
        with torch.no_grad():
            assert torch.equal(theirs[name + "/logits"], model(ids)[0]), name  # bit-identical
            assert torch.equal(theirs[name + "/padded"], model(ids, key_padding_mask=mask)[0]), name
        ours = DynaformerForCausalLM.from_dynaformer(model).eval().generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(theirs[name + "/generate"], ours), name
    _, our_tok, _ = load_model(run)
    assert theirs["text/ids"][0].tolist() == our_tok.encode("Ada went to the")
    assert theirs["card/printed"].strip()  # the card's snippet ran unattended and printed its generation
    card = (tmp_path / "cli-export" / "README.md").read_text()
    assert "tags: [dynaformer, custom_code, residual-dynamic, span-dynamic]" in card and "val_bpb" in card
    assert "license: not set by the export" in card and str(text_file) in card
