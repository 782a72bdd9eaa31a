"""The training loop: AdamW, warm-up + cosine, clipping, accumulation, autocast, periodic evaluation
on a fixed budget, step-N checkpoints, bit-exact resume, clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..configtools import to_dict
from ..data import BatchSampler, eval_windows
from ..errors import DynaformerError, Interrupted
from ..eval.perplexity import evaluate_windows
from ..model import Transformer
from .checkpoint import latest_checkpoint, load_model_state, load_trainer_state, save_checkpoint, verify_checkpoint
from .metrics import MetricsLog, format_eval_line, format_train_line
from .optim import lr_at, make_optimizer
from .rundir import Run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DynaformerError(f"train.device: '{name}' was requested but CUDA is not available")
    return dev


class Trainer:
    def __init__(self, run: Run) -> None:
        self.run_info = run
        self.cfg, self.mcfg = run.train_cfg, run.model_cfg
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.device = resolve_device(self.cfg.device)
        torch.manual_seed(self.cfg.seed)
        self.model = Transformer(self.mcfg).to(self.device)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.sampler = BatchSampler(run.splits.train, self.cfg.batch_size, self.mcfg.context_len, self.cfg.seed)
        if self.cfg.data.startswith("task:"):  # task rows (answer-only targets), optionally mixed with text
            from ..data.tasks import TaskSampler, parse_task_spec

            spec = parse_task_spec(self.cfg.data)
            self.sampler = TaskSampler(spec, self.cfg.batch_size, self.mcfg.context_len, self.cfg.seed,
                                       text_sampler=self.sampler if spec.text else None)
        self.val_windows = eval_windows(run.splits.val, self.mcfg.context_len, self.cfg.eval_tokens)
        self.token_bytes = torch.from_numpy(run.tokenizer.token_bytes())
        self.autocast = torch.bfloat16 if self.cfg.dtype == "bf16" else None
        self.step, self.elapsed_before = 0, 0.0
        self.last_val: dict | None = None
        resume_from = self._resume_checkpoint() if run.resumed else None
        if resume_from is not None:
            self._load(resume_from)
        self.metrics = MetricsLog(run.dir / "metrics.jsonl", resume_step=self.step if run.resumed else None)
        self.forward = torch.compile(self.model) if self.cfg.compile else self.model
        self._stop_signal: int | None = None

    # --- checkpoints -------------------------------------------------------------------------
    def _resume_checkpoint(self) -> Path | None:
        if self.cfg.resume == "auto":
            return latest_checkpoint(self.run_info.dir)
        path = Path(self.cfg.resume)
        verify_checkpoint(path)
        return path

    def _config_record(self) -> dict:
        return {"model": to_dict(self.mcfg), "train": to_dict(self.cfg), "tokenizer": self.run_info.tokenizer.to_dict()}

    def save(self) -> Path:
        state = {"step": self.step, "elapsed_s": self.elapsed(), "optimizer": self.optimizer.state_dict(),
                 "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "last_val": self.last_val or {}}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return save_checkpoint(self.run_info.dir, self.step, self.model, self._config_record(), state,
                               keep_last=self.cfg.keep_last)

    def _load(self, ckpt: Path) -> None:
        load_model_state(ckpt, self.model)
        state = load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.elapsed_before = int(state["step"]), float(state["elapsed_s"])
        self.last_val = state.get("last_val") or None
        print(f"resumed from {ckpt} (step {self.step})", file=sys.stderr)

    # --- loop --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def evaluate(self) -> dict:
        return evaluate_windows(self.forward, self.val_windows, 4 * self.cfg.batch_size, self.token_bytes,
                                self.autocast)

    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.progress.fill_(self.step / cfg.max_steps)
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.grad_accum):
            x, y = self.sampler.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                                enabled=self.autocast is not None):
                _, loss = self.forward(x, y)
            (loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        else:
            grads = [p.grad.norm() for p in self.model.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack(grads))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(total), float(gnorm)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum

    def fit(self) -> dict:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.mcfg.context_len
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False,
                   disable=not (cfg.progress_bar and sys.stderr.isatty()))
        window_t, window_steps = time.perf_counter(), 0
        try:
            while self.step < cfg.max_steps and self._stop_signal is None:
                loss, gnorm = self.train_step()
                window_steps += 1
                bar.update(1)
                last = self.step == cfg.max_steps
                do_log = self.step % cfg.log_interval == 0 or last
                do_eval = bool(cfg.eval_interval and self.step % cfg.eval_interval == 0) or last
                do_save = bool(cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last
                if do_log:
                    dt = (time.perf_counter() - window_t) / window_steps
                    rec = {"step": self.step, "elapsed_s": round(self.elapsed(), 4), "loss": loss,
                           "lr": lr_at(self.step - 1, cfg), "grad_norm": gnorm, "tok_s": tokens_per_step / dt,
                           "ms_step": 1000 * dt, "progress": float(self.model.progress)}
                    self.metrics.write(rec)
                    bar.write(format_train_line(rec, cfg.max_steps))
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tok_s'] / 1000:.1f}k")
                if do_eval:
                    val = self.evaluate()
                    self.last_val = {"val_loss": val["loss"], "val_bpb": val["bpb"]}
                    rec = {"step": self.step, "elapsed_s": round(self.elapsed(), 4), **self.last_val}
                    self.metrics.write(rec)
                    bar.write(format_eval_line(rec))
                if do_save:
                    self.save()
                if do_log or do_eval or do_save:
                    window_t, window_steps = time.perf_counter(), 0  # time training steps only
            if self._stop_signal is not None:
                ckpt = self.save()
                name = signal.Signals(self._stop_signal).name
                raise Interrupted(f"stopped by {name} at step {self.step}; checkpoint saved to {ckpt}; "
                                  f"continue with --resume auto")
        finally:
            bar.close()
            self.metrics.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        return {"run_dir": str(self.run_info.dir), "step": self.step, "elapsed_s": round(self.elapsed(), 3),
                **(self.last_val or {}), "params": self.model.num_params()}
