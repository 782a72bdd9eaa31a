"""lm-evaluation-harness adapter (optional extra: `pip install 'dynaformer[eval]'`).

`DynaformerLM` is a native `lm_eval` model (a `TemplateLM`): it scores and generates with our own
`Transformer`, tokenizer and KV cache, so no transformers/accelerate stack sits in between.

    dynaformer eval runs/x --lm-eval dynaformer_story_qa,dynaformer_stories_ppl

Bundled tasks (tasks/, generated at run time, fully offline): `dynaformer_story_qa` (multiple choice:
where is a character, the supporting fact 4 sentences before the question), `dynaformer_story_qa_far`
(the same at 24 sentences), `dynaformer_story_qa_gen` (the same, generated answer, exact match) and
`dynaformer_stories_ppl` (rolling log-likelihood: word/byte perplexity, bits per byte); the tag
`dynaformer` runs them all. Other lm-eval tasks work too when their datasets are available.

Contexts longer than the model's `context_len` are cut from the left (as lm-eval's HF model does).
Our tokenizers have no BOS: an empty context is conditioned on `<|endoftext|>` (BPE) or a newline.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DynaformerError
from ..extras import require
from ..model import Transformer
from ..model.generate import sample_next
from ..runs import load_model

require("lm_eval", "eval")

from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

TASKS_DIR = Path(__file__).parent / "tasks"


def resolve_device(device: str | None) -> str:
    """lm-eval's default device is CUDA; on a machine without it, fall back to the CPU with a warning (as
    lm-eval's own HF model does) instead of failing."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"lm-eval: device '{device}' requested but CUDA is not available; running on the CPU",
                      stacklevel=2)
        return "cpu"
    return device


@register_model("dynaformer")
class DynaformerLM(TemplateLM):
    """model_args (lm-eval's `--model_args`): `run=RUN` or `pretrained=RUN` (a run folder or one of its step-N
    checkpoints), `batch_size`, `max_length`, `device` (CUDA falls back to the CPU when absent)."""

    def __init__(self, model: Transformer | None = None, tokenizer: Any = None, run: str | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, device: str | None = "cpu",
                 pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if run is not None and pretrained is not None and str(run) != str(pretrained):
            raise DynaformerError("lm-eval: pass run=RUN or pretrained=RUN, not both")
        run = run if run is not None else pretrained
        if model is None:
            if run is None:
                raise DynaformerError("lm-eval: pass model=... and tokenizer=..., or model_args run=RUN "
                                      "(or pretrained=RUN)")
            model, tokenizer, _ = load_model(run, device=resolve_device(device))
            if not model.cfg.causal:
                raise DynaformerError(f"lm-eval: '{run}' holds a bidirectional encoder (model.causal=false)")
        self.model = model.eval()
        self.tok = tokenizer
        # lm-eval's CLI passes strings; "auto" (its batch-size search) means our default
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or model.cfg.context_len)
        self._device = next(model.parameters()).device
        eot = getattr(tokenizer, "eot_id", None)
        if eot is None:
            nl = tokenizer.encode("\n") if "\n" in getattr(tokenizer, "chars", "\n") else []
            eot = nl[0] if len(nl) == 1 else 0
        self._eot = int(eot)

    # --- TemplateLM plumbing -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"dynaformer-{self.tok.kind}-{self.tok.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    # --- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) → (sum log p(continuation | context), continuation is greedy).
        Inputs are cut to the last max_length tokens; batches are right-padded (attention is causal, so
        padding after a row's end changes none of its logits), longest first."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise DynaformerError("lm-eval: empty continuation")
                whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
                n = min(len(cont), len(whole) - 1)  # a continuation longer than the window: score its tail
                rows.append(whole[:-1])
                conts.append(whole[len(whole) - n:])
            T = max(len(r) for r in rows)
            x = torch.zeros(len(rows), T, dtype=torch.long)
            for b, r in enumerate(rows):
                x[b, : len(r)] = torch.tensor(r)
            logits, _ = self.model(x.to(self._device))
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for b, i in enumerate(idx):
                n, end = len(conts[b]), len(rows[b])
                lp = logp[b, end - n : end]  # (n, V): the positions that predict the continuation
                target = torch.tensor(conts[b], device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        return self._score([(ctx, cont) for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        results = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)]
            results.append(sum(ll for ll, _ in self._score(windows)) if windows else 0.0)
        return results

    # --- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_one(self, ids: list[int], until: list[str], max_new: int, temperature: float,
                      generator: torch.Generator | None) -> str:
        """Greedy (temperature 0) or sampled decoding with our KV cache, stopping at the first `until`
        string; the window slides at max_length as in dynaformer.model.generate."""
        seq = torch.tensor([ids[-self.max_length:]], device=self._device)
        start, cache, text = seq.shape[1], None, ""
        for _ in range(max_new):
            if cache is None or cache.length >= self.max_length:
                cache = self.model.new_cache(1, self.max_length)
                logits, _ = self.model(seq[:, -self.max_length:], cache=cache)
            else:
                logits, _ = self.model(seq[:, -1:], cache=cache)
            nxt = sample_next(logits[:, -1], temperature, None, None, generator)
            seq = torch.cat([seq, nxt], dim=1)
            text = self.tok_decode(seq[0, start:].tolist())
            hit_eot = getattr(self.tok, "eot_id", None) is not None and int(nxt) == self._eot
            if hit_eot or any(u in text for u in until):
                break
        cut = min([text.index(u) for u in until if u in text], default=len(text))
        return text[:cut]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            gen = torch.Generator(device=self._device).manual_seed(int(kw.pop("seed", 1234))) if do_sample else None
            ids = self.tok_encode(context) or [self.prefix_token_id]
            results.append(self._generate_one(ids, until, max_new, temperature, gen))
        return results


def run_lm_eval(run: str, tasks: str, limit: float | None = None, num_fewshot: int | None = None,
                batch_size: int = 16, device: str = "cpu", seed: int = 1234, include_path: str | None = None) -> dict:
    """`dynaformer eval RUN --lm-eval TASKS [--include_path DIR]`: evaluate a run's newest checkpoint on lm-eval
    tasks (comma-separated names or tags; the bundled ones are offline; DIR holds the user's own task YAMLs).
    Returns {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise DynaformerError("eval: --lm-eval needs at least one task name")
    paths = [str(TASKS_DIR)]
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise DynaformerError(f"eval: --include_path '{include_path}' is not a folder (of lm-eval task YAMLs)")
        paths.append(str(include_path))
    # Our tasks (and the user's folder) alone index in about a second; lm-eval's own thousands take tens of
    # seconds, so they are indexed only when a name is not found there.
    tm = TaskManager(include_path=paths, include_defaults=False)
    local = sorted(tm.all_tasks)
    missing = [n for n in names if n not in local]
    if missing and not any(n.startswith("dynaformer") for n in missing):
        tm = TaskManager(include_path=paths)
        missing = [n for n in missing if n not in tm.all_tasks]
    if missing:
        where = "bundled, offline" if include_path is None else f"bundled and in '{include_path}'"
        raise DynaformerError(f"eval: unknown lm-eval task '{missing[0]}' ({where}: {', '.join(local)})")
    model, tokenizer, ckpt = load_model(run, device=device)
    if not model.cfg.causal:
        raise DynaformerError(f"eval: '{ckpt}' holds a bidirectional encoder (model.causal=false); lm-eval "
                              f"scores and generates with causal language models only")
    lm = DynaformerLM(model, tokenizer, batch_size=batch_size)
    try:
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=0)
    except (ConnectionError, OSError, FileNotFoundError) as e:
        offline = " (HF_DATASETS_OFFLINE=1)" if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
        raise DynaformerError(f"eval: lm-eval could not load a task's data{offline}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    results = {task: {k.split(",")[0]: v for k, v in metrics.items()
                      if isinstance(v, int | float) and "_stderr" not in k and k != "sample_len"}
               for task, metrics in res["results"].items()}
    return {"checkpoint": str(ckpt), "tasks": names, "limit": limit, "results": results}


LM_EVAL_SUBCOMMANDS = ("run", "ls", "list", "validate")


def lm_eval_cli(argv: list[str]) -> int:
    """`dynaformer lm-eval ...`: lm-eval's own command line, run in this process with our model registered as
    `dynaformer`. Every flag passes through; `--model dynaformer` is the default, model_args take `run=RUN` or
    `pretrained=RUN`, and without `--include_path` the bundled tasks are on the task path."""
    import sys

    import lm_eval.__main__ as lm_main

    args = list(argv)
    if not args or args[0] in ("-h", "--help") or args[0] in LM_EVAL_SUBCOMMANDS[1:]:
        pass  # help, `ls`, `validate`: exactly as lm-eval has them
    else:
        if args[0] == "run":
            args = args[1:]
        if not any(a == "--model" or a.startswith("--model=") for a in args):
            args = ["--model", "dynaformer", *args]
        if not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
            args += ["--include_path", str(TASKS_DIR)]
        args = ["run", *args]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        lm_main.cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except DynaformerError as e:  # our model's own checks (a run folder that is missing, not causal, ...)
        print(f"dynaformer lm-eval: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0
