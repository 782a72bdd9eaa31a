"""The training loop, composed from parts (as torchtitan composes its trainer): the loop owns the optimizer
and its schedule (`optim.lr_at`), clipping, accumulation, autocast, periodic evaluation, step-N checkpoints,
bit-exact resume, a clean stop on SIGINT/SIGTERM, non-finite step skipping and DDP/FSDP2 under torchrun
(applied from outside the model); a `Workload` brings the model, its batches and its evaluation.

Two workloads exist: `LMWorkload` (pretraining on a run folder's tokens: next-token or masked-LM) and the
classifier of `train/finetune.py`. Both therefore share one schedule, one checkpoint format and one resume
path (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..configtools import to_dict
from ..data import BatchSampler, eval_windows
from ..data.dataset import StagedSampler
from ..data.masking import mask_tokens, step_generator
from ..errors import CheckpointError, DynaformerError, Interrupted
from ..eval.diagnostics import layer_grad_norms
from ..eval.perplexity import evaluate_mlm, evaluate_windows
from ..model import Transformer
from ..model.residual import residual_stats
from ..model.span_stats import plot_span_heatmap, span_stats
from .checkpoint import (
    check_fits,
    checkpoint_layout,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    read_model_shapes,
    read_model_tensors,
    remove_stale_temporaries,
    save_checkpoint,
    save_dcp_checkpoint,
    set_aside_checkpoints,
    verify_checkpoint,
)
from .device import Precision, resolve_device, resolve_precision
from .distributed import DistInfo, all_reduce_mean, any_rank, barrier, wrap_model
from .metrics import MetricsLog, format_eval_line, format_train_line, read_metrics
from .optim import hidden_matrix_names, lr_at, make_optimizer, no_decay_names
from .rundir import Run
from .state import (
    load_model_state_dict,
    load_optimizer_state,
    load_sharded_state,
    model_state,
    optimizer_state,
    sharded_state,
)
from .stop import StopOnSignal

Amp = Callable[[], contextlib.AbstractContextManager]  # the loop's autocast context (a no-op in fp32)


class Workload(Protocol):
    """What the loop trains. `sampler` is the stateful batch source (`state_dict` / `load_state_dict`, saved in
    every checkpoint); `model` the module whose parameters are optimised (before any wrapping)."""

    model: nn.Module
    sampler: Any
    tokens_per_step: int  # per rank and micro-batch, for the tok/s column
    # False: no training lines; each evaluation's line carries the loss of its step instead (the classifier's
    # metrics.jsonl: one {step, elapsed_s, loss, val_...} per evaluation)
    train_lines: bool

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...
    def loss(self, forward: nn.Module, amp: Amp, *batch: torch.Tensor) -> torch.Tensor: ...
    def aux_loss(self) -> torch.Tensor | float: ...
    def before_step(self, step: int, max_steps: int) -> None: ...
    def before_clip(self) -> None: ...  # at log steps, with this step's unclipped gradients
    def log_fields(self) -> dict: ...
    def evaluate(self, forward: nn.Module, autocast: torch.dtype | None) -> dict: ...
    def eval_record(self, result: dict) -> dict: ...  # the fields of an evaluation's metrics line
    def eval_line(self, record: dict) -> str: ...
    def config_record(self) -> dict: ...  # config.json of each checkpoint
    def finish(self, metrics_path: Path) -> None: ...


class LMWorkload:
    """Pretraining on a run folder's tokens: next-token (or masked-LM) windows from the stateful sampler;
    validation loss and bits per byte on fixed windows; task runs also score held-out answers."""

    def __init__(self, run: Run, dist: DistInfo, device: torch.device) -> None:
        cfg, mcfg = run.train_cfg, run.model_cfg
        self.run, self.cfg, self.dist, self.device = run, cfg, dist, device
        self.model = Transformer(mcfg).to(device)
        self.sampler = self._sampler(mcfg.context_len, cfg.batch_size)
        self.task_probe = None  # task runs: held-out answers, scored at every evaluation
        if cfg.data.startswith("task:"):
            from ..data.tasks import parse_task_spec
            from ..eval.longrange import TaskProbe

            self.task_probe = TaskProbe(parse_task_spec(cfg.data), self.sampler.length)
        if cfg.short_context:  # staged context: short rows first, as many tokens per step
            short = self._sampler(cfg.short_context, cfg.batch_size * mcfg.context_len // cfg.short_context)
            self.sampler = StagedSampler(short, self.sampler, cfg.short_steps * cfg.grad_accum)
        self.tokens_per_step = cfg.batch_size * mcfg.context_len
        self.train_lines = True
        self.val_windows = eval_windows(run.splits.val, mcfg.context_len, cfg.eval_tokens)
        self.token_bytes = torch.from_numpy(run.tokenizer.token_bytes())
        self.mask_id = run.tokenizer.vocab_size  # masked-LM only: the extra id after the tokenizer's
        self.layer_grad_norm: list[float] | None = None  # per block, at log steps (eval/diagnostics.py)

    def _sampler(self, length: int, batch_size: int):
        """Windows of `length` tokens; for task data, task rows (answer-only targets), mixed with text if asked."""
        cfg, dist = self.cfg, self.dist
        text = BatchSampler(self.run.splits.train, batch_size, length, cfg.seed, rank=dist.rank, world=dist.world)
        if not cfg.data.startswith("task:"):
            return text
        from ..data.tasks import TaskSampler, parse_task_spec

        spec = parse_task_spec(cfg.data)
        return TaskSampler(spec, batch_size, length, cfg.seed, rank=dist.rank, text_sampler=text if spec.text else None)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of one micro-batch: shifted windows, or masked windows for masked-LM."""
        cursor = self.sampler.cursor
        x, y = self.sampler.next()
        if self.cfg.objective == "mlm":
            x, y = mask_tokens(x, self.mask_id, self.mask_id, step_generator(self.cfg.seed, cursor, self.dist.rank))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, forward: nn.Module, amp: Amp, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights = self.sampler.loss_weights(y)  # mixed task/text batches: each source averaged on its own
        with amp():
            if weights is None:
                _, loss = forward(x, y)
                return loss
            logits, _ = forward(x)
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100,
                                               reduction="none")
        return (ce * weights.flatten()).sum()

    def aux_loss(self) -> torch.Tensor:
        return self.model.aux_loss()  # the span penalty, if any

    def before_step(self, step: int, max_steps: int) -> None:
        self.model.progress.fill_(step / max_steps)  # τ of the dynamic residual (docs/design.md §3)

    def before_clip(self) -> None:
        self.layer_grad_norm = layer_grad_norms(self.model)

    def log_fields(self) -> dict:
        return {"progress": float(self.model.progress), "layer_grad_norm": self.layer_grad_norm,
                **residual_stats(self.model), **span_stats(self.model)}

    def evaluate(self, forward: nn.Module, autocast: torch.dtype | None) -> dict:
        # Every rank evaluates the same windows (FSDP needs all ranks in each forward).
        bs = 4 * self.cfg.batch_size
        if self.cfg.objective == "mlm":
            val = evaluate_mlm(forward, self.val_windows, bs, self.mask_id, self.mask_id, self.token_bytes,
                               seed=self.cfg.seed)
        else:
            val = evaluate_windows(forward, self.val_windows, bs, self.token_bytes, autocast)
        out = {"val_loss": val["loss"], "val_bpb": val["bpb"]}
        if self.task_probe is not None:  # the loss over all tokens says little about the answers
            out.update(self.task_probe.evaluate(forward, bs))
        return out

    def eval_record(self, result: dict) -> dict:
        return result

    def eval_line(self, record: dict) -> str:
        return format_eval_line(record)

    def config_record(self) -> dict:
        return {"model": to_dict(self.run.model_cfg), "train": to_dict(self.cfg),
                "tokenizer": self.run.tokenizer.to_dict()}

    def finish(self, metrics_path: Path) -> None:
        plot_span_heatmap(read_metrics(metrics_path), self.run.dir / "spans.png")


class Trainer:
    """The loop over `run` (its folder and `TrainConfig`) for a workload: by default `LMWorkload` on the
    run's tokens; `finetune` passes its classifier."""

    def __init__(self, run: Run, dist: DistInfo | None = None, workload: Workload | None = None) -> None:
        self.run_info = run
        self.cfg, self.mcfg = run.train_cfg, run.model_cfg
        self.dist = dist or DistInfo()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.device = self.dist.device if self.dist.enabled else resolve_device(self.cfg.device)
        torch.manual_seed(self.cfg.seed)
        self.workload = workload or LMWorkload(run, self.dist, self.device)
        self.model = self.workload.model
        self.sharded = self.dist.enabled and self.cfg.parallel == "fsdp"
        # Names before sharding: FSDP2 drops the parameters' tags; the optimizer after: it swaps in DTensors.
        no_decay, matrices = no_decay_names(self.model), hidden_matrix_names(self.model)
        self.wrapped = wrap_model(self.model, self.cfg.parallel, self.dist, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg, no_decay, matrices)
        self.precision: Precision = run.precision or resolve_precision(self.cfg.dtype, self.device)
        self.autocast = self.precision.autocast
        self.step, self.elapsed_before, self.lr_scale, self.bad_steps = 0, 0.0, 1.0, 0
        self.last_val: dict | None = None
        self.stop = StopOnSignal()
        if self.dist.is_main:
            remove_stale_temporaries(run.dir)
        if run.resumed:
            self._resume()
        self.metrics = MetricsLog(run.dir / "metrics.jsonl", resume_step=self.step if run.resumed else None,
                                  tensorboard_dir=run.dir / "tensorboard" if self.cfg.tensorboard else None) \
            if self.dist.is_main else None
        self.forward = torch.compile(self.wrapped) if self.cfg.compile else self.wrapped

    @property
    def sampler(self) -> Any:
        return self.workload.sampler

    @property
    def _stop_signal(self) -> int | None:  # tests stand in for a signal by setting it
        return self.stop.signum

    @_stop_signal.setter
    def _stop_signal(self, signum: int | None) -> None:
        self.stop.signum = signum

    # --- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> None:
        """Load the checkpoint to continue from: the one named, or (auto) the newest that verifies and loads;
        one whose trainer state is refused is skipped for the previous one."""
        run_dir = self.run_info.dir
        if self.cfg.resume == "restart":  # train this run again from step 0; old checkpoints are kept aside
            if self.dist.is_main:
                set_aside_checkpoints(run_dir)
            barrier(self.dist)
            return
        if self.cfg.resume != "auto":
            verify_checkpoint(Path(self.cfg.resume))
            self._load(Path(self.cfg.resume))
            return
        found = list_checkpoints(run_dir)
        for ckpt in reversed(found):
            try:
                verify_checkpoint(ckpt)
                self._load(ckpt)
                return
            except CheckpointError as e:
                if self.dist.is_main:
                    print(f"warning: skipping {e}", file=sys.stderr)
        if found:
            raise CheckpointError(f"no checkpoint in '{run_dir}' verifies, so there is nothing to resume and "
                                  f"nothing was changed; pass --resume restart to train this run again from "
                                  f"step 0 (its checkpoints are kept as set-aside-step-N)")

    def _trainer_state(self) -> dict:
        state = {"step": self.step, "elapsed_s": self.elapsed(), "lr_scale": self.lr_scale,
                 "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "last_val": self.last_val or {}, "world": self.dist.world}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save(self) -> Path:
        """Every rank takes part. Under torchrun each rank writes its own shards (DCP); otherwise, or with
        ckpt_format=full, the full state is gathered (FSDP) and rank 0 writes safetensors."""
        bad = self._nonfinite_weight()
        if bad is not None:  # never publish weights no reader could use; the last good step stays the newest
            good = latest_checkpoint(self.run_info.dir, warn=False)
            kept = f"{good.name} stays the newest checkpoint" if good else "no checkpoint was written before"
            raise DynaformerError(f"step {self.step}: the model's weights are not finite ({bad}); step-{self.step} "
                                  f"was not written and {kept}. Lower --lr or raise --warmup_steps and resume "
                                  f"with --resume auto")
        config = self.workload.config_record()
        if self.dist.enabled and self.cfg.ckpt_format == "auto":
            tensors, param_groups = sharded_state(self.model, self.optimizer)
            return save_dcp_checkpoint(self.run_info.dir, self.step, tensors, config,
                                       {**self._trainer_state(), "param_groups": param_groups},
                                       keep_last=self.cfg.keep_last)
        weights = model_state(self.model, self.sharded)
        optim = optimizer_state(self.model, self.optimizer, self.sharded)
        path = self.run_info.dir / f"step-{self.step}"
        if self.dist.is_main:
            state = {**self._trainer_state(), "optimizer": optim}
            path = save_checkpoint(self.run_info.dir, self.step, weights, config, state, keep_last=self.cfg.keep_last)
        barrier(self.dist)
        return path

    def _nonfinite_weight(self) -> str | None:
        """The name of a parameter holding NaN or ±inf on any rank (the same answer on every rank), else None."""
        bad = next((n for n, p in self.model.named_parameters()
                    if not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())), None)
        ok = torch.tensor(0.0 if bad else 1.0, device=next(self.model.parameters()).device)
        if float(all_reduce_mean(ok, self.dist)) < 1.0:
            return bad or "on another rank"
        return None

    def _load(self, ckpt: Path) -> None:
        if checkpoint_layout(ckpt) == "dcp":  # resharded by DCP to this world size (1 included)
            check_fits(ckpt, self.model, read_model_shapes(ckpt))
            state = load_trainer_state(ckpt)
            load_sharded_state(ckpt, self.model, self.optimizer, state.get("param_groups"))
        else:
            tensors = read_model_tensors(ckpt)
            check_fits(ckpt, self.model, tensors)
            load_model_state_dict(self.model, tensors, self.sharded)
            state = load_trainer_state(ckpt)
            load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.sharded)
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.elapsed_before = int(state["step"]), float(state["elapsed_s"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.last_val = state.get("last_val") or None
        if self.dist.is_main:
            print(f"resumed from {ckpt} (step {self.step})", file=sys.stderr)

    # --- one step ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self._t0)

    def amp(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast or torch.bfloat16  # any dtype when disabled
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast is not None)

    def evaluate(self) -> dict:
        # Every rank evaluates the same windows (FSDP needs all ranks in each forward).
        return self.workload.evaluate(self.forward if not self.dist.enabled else self.wrapped, self.autocast)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self.workload.next_batch()

    def compute_loss(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.workload.loss(self.forward, self.amp, *batch)

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over grad_accum micro-batches → (loss, grad norm, applied?)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's group may run at a multiple (train/optim.py)
        self.workload.before_step(self.step, cfg.max_steps)
        total = torch.zeros((), device=self.device)
        for i in range(cfg.grad_accum):
            batch = self.next_batch()
            # DDP: all-reduce gradients only on the last micro-batch.
            skip_sync = self.dist.enabled and not self.sharded and i < cfg.grad_accum - 1
            with self.wrapped.no_sync() if skip_sync else contextlib.nullcontext():
                loss = self.compute_loss(*batch)
                ((loss + self.workload.aux_loss()) / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
        if (self.step + 1) % cfg.log_interval == 0 or self.step + 1 == cfg.max_steps:
            self.workload.before_clip()  # logged with this step
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        total = all_reduce_mean(total, self.dist)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(gnorm))  # same on every rank
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(total), float(gnorm), finite

    def _log(self, record: dict, line: str, bar: tqdm) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            bar.write(line)

    def _handle_bad_step(self, loss: float, gnorm: float, bar: tqdm) -> None:
        """A non-finite loss or gradient: the update was skipped. After max_bad_steps in a row,
        reload the last good checkpoint and halve the learning rate."""
        self.bad_steps += 1
        event = {"step": self.step, "elapsed_s": round(self.elapsed(), 4), "event": "nonfinite_step_skipped",
                 "loss": loss, "grad_norm": gnorm, "in_a_row": self.bad_steps}
        self._log(event, f"warning: step {self.step}: non-finite loss/gradient, update skipped", bar)
        if self.bad_steps < self.cfg.max_bad_steps:
            return
        ckpt = latest_checkpoint(self.run_info.dir, warn=self.dist.is_main)
        scale = self.lr_scale * 0.5
        if ckpt is not None:
            self._load(ckpt)
        self.lr_scale, self.bad_steps = scale, 0
        self._log({"step": self.step, "elapsed_s": round(self.elapsed(), 4), "event": "reloaded_checkpoint",
                   "checkpoint": str(ckpt), "lr_scale": scale},
                  f"warning: {self.cfg.max_bad_steps} bad steps in a row: reloaded {ckpt}, lr × {scale}", bar)

    # --- the loop ----------------------------------------------------------------------------
    def _after_step(self, loss: float, gnorm: float, window_dt: float, bar: tqdm) -> bool:
        """Log, evaluate and checkpoint as the intervals ask; True when any of them ran (its time is not
        a training step's)."""
        cfg = self.cfg
        last = self.step == cfg.max_steps
        do_log = self.step % cfg.log_interval == 0 or last
        do_eval = bool(cfg.eval_interval and self.step % cfg.eval_interval == 0) or last
        do_save = bool(cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last
        if do_log and self.workload.train_lines:
            tokens_per_step = self.workload.tokens_per_step * cfg.grad_accum * self.dist.world
            rec = {"step": self.step, "elapsed_s": round(self.elapsed(), 4), "loss": loss,
                   "lr": lr_at(self.step - 1, cfg) * self.lr_scale, "grad_norm": gnorm,
                   "tok_s": tokens_per_step / window_dt, "ms_step": 1000 * window_dt, **self.workload.log_fields()}
            self._log(rec, format_train_line(rec, cfg.max_steps), bar)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rec['tok_s'] / 1000:.1f}k")
        if do_eval:
            self.last_val = self.evaluate()
            rec = {"step": self.step, "elapsed_s": round(self.elapsed(), 4),
                   **({} if self.workload.train_lines else {"loss": loss}), **self.workload.eval_record(self.last_val)}
            self._log(rec, self.workload.eval_line(rec), bar)
        if do_save:
            self.save()
        return do_log or do_eval or do_save

    def fit(self) -> dict:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False,
                   disable=not (cfg.progress_bar and sys.stderr.isatty() and self.dist.is_main))
        window_t, window_steps = time.perf_counter(), 0
        try:
            with self.stop:
                while self.step < cfg.max_steps and not any_rank(self.stop.requested, self.dist):
                    loss, gnorm, ok = self.train_step()
                    window_steps += 1
                    bar.update(1)
                    if ok:
                        self.bad_steps = 0
                    else:
                        self._handle_bad_step(loss, gnorm, bar)
                    if self._after_step(loss, gnorm, (time.perf_counter() - window_t) / window_steps, bar):
                        window_t, window_steps = time.perf_counter(), 0  # time training steps only
                if self.step < cfg.max_steps:  # stopped by a signal (on this rank or another)
                    ckpt = self.save()
                    raise Interrupted(f"stopped by {self.stop.describe()} at step {self.step}; checkpoint saved to "
                                      f"{ckpt}; continue with --resume auto")
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
                self.workload.finish(self.metrics.path)
        val_loss = (self.last_val or {}).get("val_loss")
        return {"run_dir": str(self.run_info.dir), "step": self.step, "elapsed_s": round(self.elapsed(), 3),
                **(self.last_val or {}), "params": sum(p.numel() for p in self.model.parameters()),
                "diverged": val_loss is not None and not math.isfinite(val_loss)}
