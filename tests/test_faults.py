"""A trainer that loses nothing: hard kills at random moments, non-finite steps, malformed input."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaformer.cli import build_configs, load_yaml_config, make_parser
from dynaformer.configtools import field_types, from_dict
from dynaformer.errors import DynaformerError
from dynaformer.model import ModelConfig
from dynaformer.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from dynaformer.train.config import TrainConfig
from dynaformer.train.metrics import read_metrics
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer

from .conftest import ROOT, assert_user_error, cli_in_process, shared_dir

ARGS = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--batch_size", "4",
        "--max_steps", "150", "--log_interval", "1", "--eval_interval", "50", "--eval_tokens", "256",
        "--ckpt_interval", "3", "--keep_last", "2", "--progress_bar", "false", "--threads", "1"]


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynaformer.cli", "train", *ARGS, "--data", str(data), "--out", str(out), *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _train(capsys, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`_cmd`'s training in this process: where no signal is sent, a new interpreter adds only its start-up."""
    return cli_in_process(capsys, "train", *ARGS, "--data", str(data), "--out", str(out), *extra)


@pytest.fixture(scope="module")
def nine_steps(tmp_path_factory) -> tuple[Path, Path]:
    """(text file, a 9-step run on it with checkpoints at steps 6 and 9), built once per session: tests damage
    a copy of the run and resume it on the same file."""

    def build(folder: Path) -> None:
        from dynaformer.cli import main
        from dynaformer.data.corpus import generated_stories

        (folder / "text.txt").write_text(generated_stories(40_000, seed=1))
        assert main(["train", *ARGS, "--data", str(folder / "text.txt"), "--out", str(folder / "run"),
                     "--max_steps", "9"]) == 0

    folder = shared_dir(tmp_path_factory, "faults-nine-steps", build)
    return folder / "text.txt", folder / "run"


def _copy_run(nine_steps: tuple[Path, Path], to: Path) -> tuple[Path, Path]:
    import shutil

    data, run = nine_steps
    shutil.copytree(run, to)
    return data, to


def test_kill_9_ten_times_then_resume_matches(tmp_path, text_file, capsys):
    ref = _train(capsys, text_file, tmp_path / "ref")  # the uninterrupted reference
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(40):
        extra = () if attempt == 0 else ("--resume", "auto")
        proc = subprocess.Popen(_cmd(text_file, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)
        if kills < 10:
            # Wait until training runs (past the interpreter start), then kill at a random moment:
            # mid-step, mid-evaluation or mid-checkpoint (one is written every 3 steps).
            t0 = time.time()
            while time.time() - t0 < 60 and proc.poll() is None and not (out / "metrics.jsonl").exists():
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
        for ckpt in list_checkpoints(out):  # no visible checkpoint is ever half-written
            verify_checkpoint(ckpt)
    assert kills == 10 and proc.returncode == 0
    assert _losses(out) == _losses(tmp_path / "ref")


def _trainer(tmp_path: Path, data: Path, **train) -> Trainer:
    model = ModelConfig(context_len=32, n_layer=1, n_head=2, d_model=32)
    base = dict(data=str(data), out=str(tmp_path / "run"), max_steps=12, batch_size=4, log_interval=1,
                eval_interval=0, eval_tokens=256, progress_bar=False, ckpt_interval=4)
    base.update(train)
    return Trainer(open_run(model, TrainConfig(**base)))


def test_nan_batch_is_skipped_and_logged(tmp_path, text_file):
    trainer = _trainer(tmp_path, text_file)
    real = trainer.compute_loss

    def poisoned(x, y):
        loss = real(x, y)
        return loss * float("nan") if trainer.step == 5 else loss  # the batch of step 6 is bad

    trainer.compute_loss = poisoned
    summary = trainer.fit()
    assert summary["step"] == 12 and not summary["diverged"]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    events = [r for r in records if r.get("event") == "nonfinite_step_skipped"]
    assert len(events) == 1 and events[0]["step"] == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_repeated_nan_reloads_checkpoint_and_lowers_lr(tmp_path, text_file):
    trainer = _trainer(tmp_path, text_file, max_bad_steps=3)
    real = trainer.compute_loss
    poisoned_steps = {5, 6, 7}  # three bad batches in a row after the step-4 checkpoint
    calls = []

    def poisoned(x, y):
        calls.append(trainer.step)
        bad = trainer.step in poisoned_steps and len(calls) < 12
        return real(x, y) * float("nan") if bad else real(x, y)

    trainer.compute_loss = poisoned
    trainer.fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    reload = [r for r in records if r.get("event") == "reloaded_checkpoint"]
    assert len(reload) == 1 and reload[0]["checkpoint"].endswith("step-4") and reload[0]["lr_scale"] == 0.5
    assert trainer.lr_scale == 0.5 and trainer.step == 12


def test_interrupted_setup_starts_again(tmp_path, text_file):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "tokenizer.json").write_text("{")  # a crash before run.json was written
    trainer = _trainer(tmp_path, text_file, max_steps=2)
    assert trainer.fit()["step"] == 2 and latest_checkpoint(run) is not None


# --- property-based: malformed config never escapes as a traceback -----------------------------

_KEYS = sorted({*field_types(ModelConfig), *field_types(TrainConfig)}) + ["n_layers", "lr_", "x"]
_VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12), st.booleans(),
                    st.none(), st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4))
def test_any_config_dict_is_valid_or_a_config_error(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        sections = load_yaml_config(str(path))
        from_dict(ModelConfig, sections["model"], "model")
        from_dict(TrainConfig, sections["train"], "train")
    except DynaformerError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), st.text(max_size=10)), max_size=4))
def test_any_cli_overrides_are_valid_or_exit_2(pairs):
    argv = ["train"] + [tok for k, v in pairs for tok in (f"--{k}", v)]
    try:
        args = make_parser().parse_args(argv)
        build_configs(args)
    except DynaformerError:
        pass
    except SystemExit as e:
        assert e.code == 2


@pytest.mark.parametrize("text", ["model: [1, 2]", "a: b: c", "model:\n  n_layer: {x: 1}", "- 1\n- 2", "\t:"])
def test_malformed_yaml_is_a_user_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(DynaformerError):
        sections = load_yaml_config(str(path))
        from_dict(ModelConfig, sections["model"], "model")


# --- damaged checkpoints heal; nothing is lost when all are damaged -------------------------------

def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_final_checkpoint_is_rewritten_on_resume(tmp_path, nine_steps, capsys):
    data, run = _copy_run(nine_steps, tmp_path / "run")
    final = run / "step-9"
    want = (final / "model.safetensors").read_bytes()
    _flip_byte(final / "model.safetensors")
    res = _train(capsys, data, run, "--max_steps", "9", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert "rewriting" in res.stderr and "step-6" in res.stderr  # resumed from the last good one
    verify_checkpoint(final)  # healed: it verifies again, and holds the same model (bit-exact resume)
    assert (final / "model.safetensors").read_bytes() == want


def test_when_every_checkpoint_is_damaged_nothing_restarts_silently(tmp_path, nine_steps, capsys):
    data, run = _copy_run(nine_steps, tmp_path / "run")
    for c in list_checkpoints(run):
        _flip_byte(c / "trainer.pt")
    names = sorted(p.name for p in run.iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    res = _train(capsys, data, run, "--max_steps", "9", "--resume", "auto")
    assert res.returncode == 2 and "--resume restart" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in run.iterdir()) == names and (run / "metrics.jsonl").read_text() == metrics
    # The explicit flag trains again from step 0; the damaged checkpoints are kept aside, never deleted.
    res = _train(capsys, data, run, "--max_steps", "9", "--resume", "restart")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in run.glob("set-aside-step-*")) == ["set-aside-step-6", "set-aside-step-9"]
    assert [c.name for c in list_checkpoints(run)] == ["step-6", "step-9"]  # the new run's, verified
    assert all(verify_checkpoint(c) for c in list_checkpoints(run))
    assert [s for s, _ in _losses(run)] == list(range(1, 10))  # metrics of the new run only, once each


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    from dynaformer.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    state = {"w": torch.zeros(2)}
    for step in (30, 40):  # left by an earlier run, damaged: higher-numbered than what is written next
        save_checkpoint(run, step, state, {}, {"step": step})
        _flip_byte(run / f"step-{step}" / "trainer.pt")
    for step in (1, 2, 3, 4):
        save_checkpoint(run, step, state, {}, {"step": step}, keep_last=2)
        assert (run / f"step-{step}").is_dir()
    assert [c.name for c in list_checkpoints(run)] == ["step-3", "step-4", "step-30", "step-40"]
    assert latest_checkpoint(run, warn=False).name == "step-4"


def test_one_trainer_per_run_folder(tmp_path, text_file, capsys):
    """A second `train --out X` (new or --resume auto) while X is being trained exits 2 naming the holder,
    and leaves the first run whole: no duplicate metrics, no stale temporaries, the lock released."""
    run = tmp_path / "run"
    long = ("--max_steps", "1000000", "--ckpt_interval", "100")  # runs until it is stopped below
    first = subprocess.Popen(_cmd(text_file, run, *long), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (run / ".lock").read_text().endswith(f":{first.pid}")
        for extra in ((), ("--resume", "auto")):
            res = _train(capsys, text_file, run, *long, *extra)  # (here, a second process: this one)
            assert res.returncode == 2 and "in use by" in res.stderr and str(first.pid) in res.stderr, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)  # saves a checkpoint and exits 130
        rc = first.wait(timeout=120)
    assert rc == 130, first.stderr.read()
    steps = [s for s, _ in _losses(run)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 0  # once each: nobody else wrote
    assert not list(run.glob(".tmp-*")) and not (run / ".lock").exists()


FINETUNE = ["finetune", "--task", "keyword", "--n_train", "64", "--n_val", "16", "--n_layer", "1", "--n_head", "2",
            "--d_model", "32", "--context_len", "64", "--batch_size", "4", "--progress_bar", "false", "--threads", "1"]


def test_one_finetune_per_run_folder(tmp_path, capsys):
    """Fine-tuning takes the run folder's lock too: a second `finetune --out X` (the same command) while X is being
    fine-tuned exits 2 in one line naming the holder and changes nothing in X; the first stops cleanly and
    releases the lock."""
    run = tmp_path / "ft"
    args = [*FINETUNE, "--max_steps", "1000000", "--eval_interval", "5", "--out", str(run)]  # runs until stopped
    first = subprocess.Popen([sys.executable, "-m", "dynaformer.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(run.glob("step-*")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert (run / ".lock").read_text().endswith(f":{first.pid}")
        before = (run / "run.json").read_text()
        res = cli_in_process(capsys, *args)
        assert_user_error(res, "in use by", str(first.pid))
        assert (run / "run.json").read_text() == before
    finally:
        first.send_signal(signal.SIGTERM)  # saves a checkpoint and exits 130
        rc = first.wait(timeout=120)
    assert rc == 130, first.stderr.read()
    assert not (run / ".lock").exists() and verify_checkpoint(latest_checkpoint(run, warn=False))


def test_a_stale_lock_is_taken_over(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(f"{__import__('socket').gethostname()}:999999")  # its process is gone
    res = _train(capsys, text_file, run, "--max_steps", "3")
    assert res.returncode == 0, res.stderr
    assert [s for s, _ in _losses(run)] == [1, 2, 3] and not (run / ".lock").exists()


def test_damaged_token_files_are_refused(tmp_path, nine_steps, capsys):
    text, run = _copy_run(nine_steps, tmp_path / "run")
    val = run / "data" / "val.bin"
    data = bytearray(val.read_bytes())
    data[10] = (data[10] + 1) % 256  # still a plausible byte token: only the checksum can tell
    val.write_bytes(bytes(data))
    for argv in (["eval", str(run)], ["train", *ARGS, "--data", str(text), "--out", str(run), "--max_steps", "9",
                                      "--resume", "auto"]):
        res = cli_in_process(capsys, *argv)
        assert res.returncode == 2 and "does not match the checksum" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_sigterm_during_setup_is_one_line_and_exit_130(tmp_path, capsys):
    big = tmp_path / "big.txt"
    from dynaformer.data.corpus import generated_stories

    big.write_text(generated_stories(1_000_000) * 20)  # 20 MB: tokenizing and writing it takes a while
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(big, run, "--max_steps", "3"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not run.exists() and time.time() < deadline:  # the command is past start-up: setting the run up
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    rc, err = proc.wait(timeout=120), proc.stderr.read()
    if rc == 0:
        pytest.skip("setup finished before the signal arrived")
    assert rc == 130 and "stopped by SIGTERM" in err and "Traceback" not in err, (rc, err)
    assert _train(capsys, big, run, "--max_steps", "3").returncode == 0  # redone


def test_a_refused_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, nine_steps, capsys):
    import json
    import pickle

    from dynaformer.train.checkpoint import _sha256

    data, run = _copy_run(nine_steps, tmp_path / "run")
    ckpt = run / "step-9"
    (ckpt / "trainer.pt").write_bytes(pickle.dumps({"step": 9, "code": print}))  # not plain data
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = _sha256(ckpt / "trainer.pt")  # the checksums still match
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    res = _train(capsys, data, run, "--max_steps", "9", "--resume", "auto")
    assert res.returncode == 0 and "plain-data" in res.stderr and "(step 6)" in res.stderr, res.stderr
    from dynaformer.train.checkpoint import load_trainer_state

    assert load_trainer_state(ckpt)["step"] == 9  # rewritten as plain data when the run reached step 9 again


def _train_args(data: Path, out: Path, steps: int) -> list[str]:
    args = [*ARGS, "--data", str(data), "--out", str(out)]
    args[args.index("--max_steps") + 1] = str(steps)
    args[args.index("--ckpt_interval") + 1] = "4"
    return ["train", *args]


def test_disk_full_while_saving_says_so_and_keeps_the_last_good_checkpoint(tmp_path, text_file, monkeypatch,
                                                                           capsys):
    """ENOSPC from safetensors mid-checkpoint: one line saying the disk is full and which checkpoint is
    intact, exit 2, no partial folder left; freeing space and resuming finishes the run."""
    import errno

    from dynaformer import cli
    from dynaformer.train import checkpoint

    real = checkpoint.save_file

    def full_at_step_8(tensors, path, metadata=None):
        if Path(path).parent.name.startswith(".tmp-step-8-"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_8)
    out = tmp_path / "r"
    assert cli.main(_train_args(text_file, out, 12)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and "step-4 is intact" in err[0], err
    assert [c.name for c in list_checkpoints(out)] == ["step-4"] and not list(out.glob(".tmp-*"))
    verify_checkpoint(out / "step-4")
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed
    assert cli.main([*_train_args(text_file, out, 12), "--resume", "auto"]) == 0
    assert latest_checkpoint(out).name == "step-12"


def test_a_really_full_disk_is_one_line_and_loses_nothing(tmp_path, text_file, capsys):
    """The disk fills up while training runs (a small tmpfs; skipped where mounting is not allowed): one line
    saying so, exit 2, every visible checkpoint verifies; once space is freed, resuming completes the run
    with no step lost or repeated."""
    import shutil

    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "r"
        cmd = _cmd(text_file, out, "--max_steps", "60", "--ckpt_interval", "4", "--keep_last", "0")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        t0 = time.time()
        while not (out / "step-4").exists() and proc.poll() is None and time.time() - t0 < 120:
            time.sleep(0.01)
        with open(mnt / "ballast", "wb", buffering=0) as f:  # fill the disk under the running trainer
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        err = proc.communicate(timeout=300)[1]
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "the disk is full" in lines[0], err
        assert "intact" in lines[0] and "Traceback" not in err
        good = list_checkpoints(out)
        assert good and not list(out.glob(".tmp-*"))
        for c in good:
            verify_checkpoint(c)
        again = cli_in_process(capsys, *cmd[3:], "--resume", "auto")  # the same command, in this process
        assert again.returncode == 2 and "the disk is full" in again.stderr, again.stderr  # still full
        *info, last = again.stderr.strip().splitlines()  # "resumed from …", then the error
        assert "disk is full" in last and all(ln.startswith("resumed from") for ln in info), again.stderr
        assert list_checkpoints(out) == good and "Traceback" not in again.stderr
        (mnt / "ballast").unlink()
        done = cli_in_process(capsys, *cmd[3:], "--resume", "auto")
        assert done.returncode == 0, done.stderr
        assert latest_checkpoint(out).name == "step-60" and [s for s, _ in _losses(out)] == list(range(1, 61))
    finally:
        shutil.rmtree(mnt / "r", ignore_errors=True)
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_non_finite_weights_are_never_written_or_read(tmp_path, text_file, capsys):
    """Weights that turned non-finite stop training with one line naming the step; the last good checkpoint
    stays the newest (no step-N with NaN is published). A checkpoint whose weights are NaN anyway (written by
    something else, checksums fixed) is refused by every reader with one line."""
    trainer = _trainer(tmp_path, text_file, ckpt_interval=4, max_steps=12)
    real = trainer.optimizer.step

    def poisoning_step(*a, **k):
        out = real(*a, **k)
        if trainer.step == 6:  # the update of step 7 leaves an inf in the weights (the loss was finite)
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")
        return out

    trainer.optimizer.step = poisoning_step
    with pytest.raises(DynaformerError, match=r"step 8: the model's weights are not finite .*step-4 stays the newest"):
        trainer.fit()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-4"] and latest_checkpoint(run).name == "step-4"
    # A forged NaN checkpoint: eval refuses it in one line, exit 2.
    import json

    from safetensors.torch import load_file, save_file

    from dynaformer.files import sha256_file

    ckpt = run / "step-4"
    tensors = load_file(ckpt / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "dynaformer"})
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"]["model.safetensors"] = sha256_file(ckpt / "model.safetensors")
    (ckpt / "manifest.json").write_text(json.dumps(m))
    verify_checkpoint(ckpt)  # the checksums hold: only reading the weights can tell
    res = cli_in_process(capsys, "eval", str(run))
    assert res.returncode == 2 and "weights are not finite" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_trainer_state_without_its_optimizer_falls_back(tmp_path, nine_steps, capsys):
    """Plain data, checksums fixed, but no optimizer state: refused like any damaged state (not a KeyError), the
    run resumes from the previous checkpoint, and no torch warning is printed beside the one line."""
    import json

    from dynaformer.train.checkpoint import _sha256, load_trainer_state

    data, run = _copy_run(nine_steps, tmp_path / "run")
    ckpt = run / "step-9"
    state = load_trainer_state(ckpt)
    del state["optimizer"]
    torch.save(state, ckpt / "trainer.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["trainer.pt"] = _sha256(ckpt / "trainer.pt")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    res = _train(capsys, data, run, "--max_steps", "9", "--resume", "auto")
    assert res.returncode == 0 and "lacks optimizer" in res.stderr and "(step 6)" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "UserWarning" not in res.stderr
    assert "optimizer" in load_trainer_state(ckpt)  # rewritten whole when the run reached step 9 again


def _wait_until_catching_sigterm(pid: int, timeout: float = 30.0) -> None:
    """Until the process has a SIGTERM handler (Linux: bit 15 of SigCgt in /proc/PID/status)."""
    import time

    status = Path(f"/proc/{pid}/status")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        caught = next((ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("SigCgt:")), "0")
        if int(caught, 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.002)
    raise AssertionError("the command never set up its SIGTERM handling")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_command_starts_is_one_line_and_exit_130(tmp_path, sig):
    """The `dynaformer` program (entry.py) handles stop signals before torch is imported: one line, exit 130,
    no traceback, nothing created."""
    # As from a terminal: SIGINT at its default (pytest-xdist's workers ignore it, and a child inherits that, in
    # which case Python, as shells expect of background jobs, leaves it ignored).
    proc = subprocess.Popen([sys.executable, "-m", "dynaformer.entry", "train", *ARGS, "--data", "builtin:stories",
                             "--out", str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_until_catching_sigterm(proc.pid)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("gap_s", [0.0, 0.02, 0.1, 0.3])
def test_two_sigterms_while_training_exit_130_without_a_traceback(tmp_path, text_file, gap_s):
    """SIGTERM while training, then a second one `gap_s` later (while the checkpoint is written, or after the
    command has decided its outcome): exit 130, no traceback; the run resumes bit-exact (checked elsewhere)."""
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dynaformer.entry", "train", *ARGS, "--data", str(text_file),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap_s)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
