"""The `dynaformer` command line. Options of `train` are generated from the typed fields of
`ModelConfig` and `TrainConfig`; `--config FILE.yaml` gives a base that `--key value` overrides.

Every user error is one line on stderr and exit code 2; an interrupted training run exits 130.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from .configtools import field_defaults, field_types, from_dict
from .errors import DynaformerError, Interrupted, is_disk_full
from .model import ModelConfig
from .presets import load_yaml_config
from .train.config import TrainConfig

SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2. A value such as `-1e-3` or `-inf` is a
    negative number, not an option (argparse alone reads only `-3` and `-0.5` so)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$", re.I)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _help_for(default: Any, tp: Any) -> str:
    tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return f"{tname} (default: {default})"


def add_fields(parser: argparse.ArgumentParser, cls: type, section: str, defaults: dict[str, Any] | None = None,
               alias: str | None = None) -> None:
    """--name and --section.name for each field of `cls` (those in `defaults`, at those defaults, when given);
    `alias`: a second section prefix that also names them."""
    defaults = defaults if defaults is not None else field_defaults(cls)
    group = parser.add_argument_group(f"{section} options ({cls.__name__})")
    for name, tp in field_types(cls).items():
        if name not in defaults:
            continue
        flags = [f"--{name}", f"--{section}.{name}"] + ([f"--{alias}.{name}"] if alias else [])
        group.add_argument(*flags, dest=f"{section}.{name}", default=argparse.SUPPRESS, metavar="V",
                           nargs="?" if tp is bool else None, const="true" if tp is bool else None,
                           help=_help_for(defaults[name], tp))


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    values = load_yaml_config(args.config) if getattr(args, "config", None) else {s: {} for s in SECTIONS}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            values[section][name] = value
    return from_dict(ModelConfig, values["model"], "model"), from_dict(TrainConfig, values["train"], "train")


# --- verbs -------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .train import distributed
    from .train.config import check_train_memory
    from .train.rundir import locked_run
    from .train.trainer import Trainer, resolve_device

    model_cfg, train_cfg = build_configs(args)
    check_train_memory(model_cfg, train_cfg)
    dist = distributed.init_distributed(resolve_device(train_cfg.device))
    try:
        with locked_run(model_cfg, train_cfg, dist) as run:
            trainer = Trainer(run, dist)
            if dist.is_main:
                meta = run.splits.meta
                print(f"run folder: {run.dir} | {trainer.model.num_params():,} parameters | data: "
                      f"{meta['source']} ({meta['n_train']:,} train / {meta['n_val']:,} val tokens) | "
                      f"{trainer.precision.dtype} ({trainer.precision.reason})"
                      + (f" | {dist.world} ranks ({train_cfg.parallel})" if dist.enabled else ""))
            summary = trainer.fit()
    finally:
        trainer = None  # released before the process group goes (distributed.shutdown)
        distributed.shutdown(dist)
    if dist.is_main:
        print(json.dumps(summary) if args.json else
              f"done: step {summary['step']} | val_loss {summary.get('val_loss', float('nan')):.4f} | "
              f"{summary['elapsed_s']:.1f}s | outputs in {run.dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .runs import evaluate_run

    if args.lm_eval:
        from .extras import require

        require("lm_eval", "eval")
        from .lmeval.adapter import run_lm_eval

        out = run_lm_eval(args.run, args.lm_eval, limit=args.limit, num_fewshot=args.num_fewshot,
                          batch_size=args.batch_size, include_path=args.include_path)
        print(json.dumps(out) if args.json else "\n".join(
            f"{task}: " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            for task, metrics in out["results"].items()))
        return 0
    result = evaluate_run(args.run, data=args.data, max_tokens=args.tokens, batch_size=args.batch_size)
    if args.diagnostics:
        from .runs import diagnose_run

        result["diagnostics"] = diagnose_run(args.run, max_tokens=min(args.tokens, 16_384))
    print(json.dumps(result) if args.json else
          f"{result['checkpoint']}: loss {result['loss']:.4f} | ppl {result['ppl']:.3f} | "
          f"bpb {result['bpb']:.4f} | {result['tokens']:,} tokens of {result['data']}")
    if args.diagnostics and not args.json:
        d = result["diagnostics"]
        print(f"diagnostics: grad norm first/last layer {d['grad_ratio_first_last']:.3g} | attention ablation "
              f"{' '.join(f'{v:+.3f}' for v in d['attn_ablation_increase'])} | "
              f"{Path(d['checkpoint']).parent / 'diagnostics.json'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .runs import generate_from_run

    text = generate_from_run(args.run, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             use_cache=not args.no_cache, max_len=args.max_len)
    print(text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.config import ServeConfig
    from .serve.server import serve

    values = {dest.split(".", 1)[1]: v for dest, v in vars(args).items() if dest.startswith("serve.")}
    return serve(args.source, from_dict(ServeConfig, values, "serve"))


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .deploy import export_onnx

    out = export_onnx(args.run, args.out, max_len=args.max_len, force=args.force)
    print(json.dumps(out) if args.json else
          f"exported {out['checkpoint']} → {out['out']} ({out['bytes'] / 2**20:.1f} MiB; input idx (batch, T ≤ "
          f"{out['max_len']}) int64, output logits (batch, T, {out['vocab_size']}); {out['tokenizer']} tokenizer)")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from .extras import require

    require("transformers", "hf")
    from .hf.export import export_hf

    out = export_hf(args.run, args.out, tokenizer_file=args.tokenizer, force=args.force)
    print(json.dumps(out) if args.json else
          f"exported {out['checkpoint']} → {out['out']} ({out['params']:,} parameters, {out['tokenizer']} tokenizer "
          f"with {out['vocab_size']} tokens); load with AutoModelForCausalLM.from_pretrained('{out['out']}', "
          f"trust_remote_code=True), or after `import dynaformer.hf` without it")
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from .data import read_text
    from .data.bpe import train_bpe

    out = Path(args.out)
    if out.exists() and not args.force:
        raise DynaformerError(f"data tokenizer: '{out}' exists; choose another --out or pass --force")
    texts = [read_text(src)[0] for src in args.sources]
    tok = train_bpe(texts, args.vocab, min_frequency=args.min_frequency)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tok.hf.to_str(pretty=False), encoding="utf-8")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    rec = {"out": str(out), "vocab_size": tok.vocab_size, "bytes": n_bytes, "tokens": n_tokens,
           "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}
    print(json.dumps(rec) if args.json else
          f"wrote {out}: {tok.vocab_size} tokens | {rec['bytes_per_token']} bytes/token on the training text; "
          f"use it with `dynaformer train --tokenizer bpe --tokenizer_file {out}`")
    return 0


def build_finetune_configs(args: argparse.Namespace):
    """(FinetuneConfig, ModelConfig) of `finetune`'s flags: the train and task sections, and a from-scratch model
    (an encoder unless --causal true; --config's model: section, then model flags)."""
    from .train.finetune import FinetuneConfig

    values: dict[str, dict] = {"model": {"causal": False}, "train": {}, "task": {}}
    if args.config:
        values["model"].update(load_yaml_config(args.config)["model"])
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            values[section][name] = value
    return (from_dict(FinetuneConfig, {"train": values["train"], "task": values["task"]}),
            from_dict(ModelConfig, values["model"], "model"))


def cmd_finetune(args: argparse.Namespace) -> int:
    from .runs import load_backbone
    from .train.finetune import finetune

    cfg, model_cfg = build_finetune_configs(args)
    result = finetune(cfg, model_cfg, load_backbone)
    print(json.dumps(result) if args.json else
          f"done: val accuracy {result['accuracy']:.3f} (chance {result['chance']:.3f}) | macro-F1 "
          f"{result['macro_f1']:.3f} | by distance {result['accuracy_by_distance']} | outputs in {result['run_dir']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import BENCHMARKS

    if args.threads:
        torch.set_num_threads(args.threads)
    for record in BENCHMARKS[args.what].run(args):
        print(json.dumps(record) if args.json else "  ".join(f"{k}={v}" for k, v in record.items()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .study.compare import run_grid
    from .study.grid import load_grid

    if args.status:
        return _compare_status(Path(args.out or args.grid), args.json)
    grid = load_grid(args.grid, variants=args.variants.split(",") if args.variants else None, seeds=args.seeds)
    out = args.out or f"runs/compare-{grid.name}"
    if args.launcher == "slurm":
        return _compare_slurm(args, grid, Path(out))
    status = run_grid(grid, Path(out), workers=args.workers, skip_invalid=args.skip_invalid,
                      progress=not args.no_progress, devices=args.devices, nproc_per_cell=args.nproc_per_cell)
    print(json.dumps(status) if args.json else
          f"compare {grid.name}: {len(status['done'])} cells done, {len(status['failed'])} failed, "
          f"{len(status['busy'])} busy elsewhere, {len(status['skipped'])} skipped | {out}")
    for f in status["failed"]:
        print(f"  failed: {f}", file=sys.stderr)
    if args.report:
        from .study.report import write_report

        rep = write_report([out], Path(out) / "report")
        print(f"report: {rep['markdown']} and {rep['html']}")
    return 1 if status["failed"] else 0


def _compare_slurm(args: argparse.Namespace, grid, out: Path) -> int:
    from .study.slurm import SlurmOptions, submit_grid

    opts = SlurmOptions(partition=args.partition, account=args.account, time=args.time,
                        cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell,
                        mem_per_cell=args.mem_per_cell, max_parallel=args.max_parallel, signal_s=args.signal_s,
                        extra=args.sbatch_line or [])
    rep = submit_grid(grid, out, opts, skip_invalid=args.skip_invalid, nproc_per_cell=args.nproc_per_cell)
    jobs = sorted({j.rsplit("_", 1)[0] for j in rep["submitted"].values()}, key=int)
    print(json.dumps(rep) if args.json else
          f"compare {grid.name}: {len(rep['submitted'])} cells submitted to SLURM"
          f"{' (jobs ' + ', '.join(jobs) + ')' if jobs else ''}, {len(rep['queued'])} still queued, "
          f"{len(rep['done'])} done, {len(rep['skipped'])} skipped | {out}; follow with "
          f"`dynaformer compare {out} --status`")
    for key in rep["held"]:
        print(f"  held: {key} (its input cell is neither done nor submitted)", file=sys.stderr)
    return 0


def _compare_status(out: Path, as_json: bool) -> int:
    from .study.progress import folder_status

    st = folder_status(out)
    if as_json:
        print(json.dumps(st))
        return 0
    width = max((len(r["cell"]) for r in st["cells"]), default=4)
    for r in st["cells"]:
        job = f"  slurm {r['job']}" if "job" in r else ""
        print(f"{r['cell']:<{width}}  {r['state']:<8} {r['step']:>6}/{r['steps']} steps{job}")
    print(f"{out}: " + ", ".join(f"{n} {s}" for s, n in st["counts"].items()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .study.report import write_report

    out = args.out or (str(Path(args.paths[0]) / "report"))
    lengths = None
    if args.cost_lengths:
        try:
            lengths = [int(x) for x in args.cost_lengths.split(",")]
        except ValueError:
            raise DynaformerError(f"report: --cost_lengths takes comma-separated integers, got "
                                  f"'{args.cost_lengths}'") from None
        if any(T <= 0 for T in lengths):
            raise DynaformerError(f"report: --cost_lengths must be positive, got '{args.cost_lengths}'")
    rep = write_report(args.paths, out, cost=not args.no_cost, cost_lengths=lengths)
    print(json.dumps(rep) if args.json else
          f"report: {rep['markdown']} and {rep['html']} ({rep['runs']} runs, {rep['skipped']} skipped)")
    return 0


INTRO = """\
dynaformer trains, evaluates and serves transformer language models with two mechanisms: a residual
weighted by training progress, token position and content, and an attention span that each head learns
per token, so that short spans save time and memory. `compare` and `report` measure both against strong
baselines and controls and answer the study's two questions with verdicts and evidence. Options of `train`
are generated from the typed fields of ModelConfig and TrainConfig (`dynaformer train --help`); a user error
is one line on stderr and exit code 2."""

EXAMPLES = """\
examples:
  dynaformer train --config configs/tiny-cpu.yaml --out runs/x --span dynamic --residual dynamic
  dynaformer compare configs/grid-cpu.yaml --out runs/grid && dynaformer report runs/grid"""


def version_line() -> str:
    import platform

    import torch

    from . import __version__

    return f"dynaformer {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def make_parser() -> Parser:
    parser = Parser(prog="dynaformer", description=INTRO, epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model into a run folder",
                       description="Train a model. Options come from --config FILE.yaml, then --key value.")
    p.add_argument("--config", metavar="FILE",
                   help="YAML file with model: and train: sections (e.g. configs/tiny-cpu.yaml)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    for section, cls in SECTIONS.items():
        add_fields(p, cls, section)
    p.set_defaults(func=cmd_train)

    from .train.finetune import TRAIN_DEFAULTS, TaskConfig

    p = sub.add_parser("finetune", help="fine-tune a classifier (encoder by default) on a classification task",
                       description="Fine-tune a sequence classifier on a generated task (entail, keyword, listops) "
                       "or JSONL files, from a pretrained run (--init RUN) or from scratch (model flags). The "
                       "training options are train's, at fine-tuning's defaults.")
    p.add_argument("--config", metavar="FILE", help="YAML whose model: section sets a from-scratch model")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_fields(p, TaskConfig, "task", alias="finetune")
    add_fields(p, TrainConfig, "train", defaults=TRAIN_DEFAULTS, alias="finetune")
    add_fields(p, ModelConfig, "model")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="evaluate a run's newest checkpoint (loss, perplexity, bits per byte)")
    p.add_argument("run", help="run folder or one of its step-N folders")
    p.add_argument("--data", help="text file to evaluate on (default: the run's validation split)")
    p.add_argument("--tokens", type=int, default=262_144, help="token budget (default: 262144)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--diagnostics", action="store_true",
                   help="also per-layer gradient norms, branch/stream ratios, attention ablation and residual "
                        "coefficients on the validation split; writes diagnostics.json and plots into the run folder")
    p.add_argument("--lm-eval", "--lm_eval", dest="lm_eval", metavar="TASKS",
                   help="run lm-evaluation-harness tasks instead (comma-separated; bundled offline tasks: "
                        "dynaformer_story_qa, dynaformer_story_qa_far, dynaformer_story_qa_gen, "
                        "dynaformer_stories_ppl, or the tag dynaformer; needs the [eval] extra)")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task (or a fraction)")
    p.add_argument("--num_fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--include_path", metavar="DIR", default=None,
                   help="lm-eval: a folder of your own task YAMLs (used with --lm-eval). lm-eval runs the Python "
                        "that a task's `!function` names from this folder: pass only folders you trust")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-hf", help="export a run's newest checkpoint as a transformers model folder",
                       description="Write OUT with config.json, model.safetensors, tokenizer files and the model "
                                   "code, so that AutoModelForCausalLM loads it with trust_remote_code=True on a "
                                   "machine without dynaformer (needs the [hf] extra).")
    p.add_argument("run", help="run folder or one of its step-N folders")
    p.add_argument("out", help="output folder (must be empty or absent)")
    p.add_argument("--tokenizer", metavar="FILE", help="tokenizer to ship instead of the run's own (a tokenizers "
                   "JSON or a run's tokenizer.json); its vocabulary must match the checkpoint's")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("export-onnx", help="export a run's newest checkpoint as an ONNX file (logits of token ids)",
                       description="Write OUT, an ONNX graph from token ids (int64, batch × T) to logits, for every "
                                   "residual and span kind, without a KV cache (needs the [onnx] extra).")
    p.add_argument("run", help="run folder or one of its step-N folders")
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--max_len", type=int, default=None, help="longest sequence the graph takes (default: the "
                   "model's context_len)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("data", help="data tools (tokenizer training)")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    dp = data_sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (HF tokenizers; [hf] extra)",
                             description="Train a byte-level BPE tokenizer on text files, folders or builtin: "
                                         "sources; use it with `train --tokenizer bpe --tokenizer_file OUT`.")
    dp.add_argument("sources", nargs="+", metavar="SOURCE", help="text file, folder or builtin:stories")
    dp.add_argument("--vocab", type=int, default=8192, help="vocabulary size, ≥ 257 (default: 8192)")
    dp.add_argument("--min_frequency", type=int, default=2, help="least count of a pair to merge (default: 2)")
    dp.add_argument("--out", required=True, help="output JSON file")
    dp.add_argument("--force", action="store_true", help="overwrite --out")
    dp.add_argument("--json", action="store_true", help="print one JSON object")
    dp.set_defaults(func=cmd_data_tokenizer)

    p = sub.add_parser("generate", help="sample text from a run's newest checkpoint")
    p.add_argument("run", help="run folder or one of its step-N folders")
    p.add_argument("--prompt", default="\n", help="prompt text (default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_len", type=int, default=None, help="longest context to condition on (default: context_len)")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole window every token")
    p.set_defaults(func=cmd_generate)

    from .serve.config import ServeConfig

    p = sub.add_parser("serve", help="serve a run over HTTP: OpenAI-compatible completions, continuous batching",
                       description="Serve SOURCE's newest checkpoint: POST /v1/completions (streaming with "
                                   "server-sent events), GET /v1/models, /health and /metrics (Prometheus). "
                                   "Sequences are admitted by KV-cache memory (--kv_budget_mb) and decoded together; "
                                   "SIGTERM drains. The API key may come from $DYNAFORMER_API_KEY (needs the "
                                   "[serve] extra).")
    p.add_argument("source", help="run folder, one of its step-N folders, or a folder written by export-hf "
                                  "(that needs the [hf] extra)")
    add_fields(p, ServeConfig, "serve")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compare", help="train and evaluate a grid of variants × seeds (resumable)",
                       description="Train every (variant, seed) cell of a grid YAML (configs/grid-cpu.yaml) into "
                                   "OUT/cells/VARIANT/seedS; rerun the same command to resume a killed grid.")
    p.add_argument("grid", help="grid YAML: model/train base, variants, seeds, eval, questions")
    p.add_argument("--out", help="output folder (default: runs/compare-GRIDNAME)")
    p.add_argument("--variants", help="comma-separated subset of the grid's variants")
    p.add_argument("--seeds", type=int, help="number of seeds (default: the grid's, else 3)")
    p.add_argument("--workers", type=int, default=1, help="cells trained at once, each its own process "
                                                          "(0: in this process)")
    p.add_argument("--devices", help="GPU indices for the workers, e.g. 0,1,2,3 (default: every visible GPU); "
                                     "worker i runs on GPU i mod their number")
    p.add_argument("--nproc_per_cell", type=int, default=1,
                   help="ranks per cell: each cell is a torchrun job on this many GPUs (CPU: gloo processes)")
    p.add_argument("--skip_invalid", action="store_true",
                   help="skip (and report) variants whose config this build does not accept, instead of failing")
    p.add_argument("--report", action="store_true", help="write OUT/report when the grid is done")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.add_argument("--status", action="store_true",
                   help="show each cell's state and steps, read from the folder alone: compare DIR --status")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: train here (--workers, --devices); slurm: submit the pending cells as job arrays "
                        "and return (README, 'Running a grid')")
    g = p.add_argument_group("SLURM options (--launcher slurm; each task runs one cell)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--time", help="time limit of one cell's task (sbatch --time)")
    g.add_argument("--cpus_per_cell", type=int)
    g.add_argument("--gpus_per_cell", type=int, help="GPUs per task (--gres=gpu:N)")
    g.add_argument("--mem_per_cell", help="memory per task (sbatch --mem, e.g. 16G)")
    g.add_argument("--max_parallel", type=int, help="tasks of one array running at once (--array=...%%N)")
    g.add_argument("--signal_s", type=int, default=120,
                   help="seconds before the time limit at which a cell checkpoints and requeues (0: never)")
    g.add_argument("--sbatch_line", action="append", metavar="LINE",
                   help="an extra #SBATCH line, e.g. --sbatch_line=--qos=high (repeatable)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="Markdown + HTML report with verdicts from compare folders",
                       description="Build report.md and a self-contained report.html from compare folders.")
    p.add_argument("paths", nargs="+", help="compare output folders (or cell folders)")
    p.add_argument("--out", help="report folder (default: FIRST_PATH/report)")
    p.add_argument("--cost_lengths", metavar="T1,T2,...",
                   help="lengths at which to time each trained model (default: the grid's eval.cost_lengths)")
    p.add_argument("--no_cost", action="store_true", help="skip the interleaved long-length cost measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    sub.add_parser("lm-eval", help="lm-evaluation-harness's own command line with the dynaformer model registered",
                   description="Runs `lm_eval` with every flag passed through and --model dynaformer by default: "
                               "dynaformer lm-eval --model_args run=RUN --tasks TASKS [--include_path DIR] ... "
                               "(pretrained=RUN works too; needs the [eval] extra).")

    from .bench import BENCHMARKS

    p = sub.add_parser("bench", help="benchmarks, side by side (results: benchmarks/RESULTS.md)")
    bench_sub = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    for name, module in BENCHMARKS.items():
        bp = bench_sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0],
                                  description=(module.__doc__ or "").strip())
        module.add_arguments(bp)
        bp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        bp.add_argument("--json", action="store_true", help="one JSON object per line")
        bp.set_defaults(func=cmd_bench)
    return parser


def _stop_on_sigterm(signum, frame) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def cmd_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line with our model registered (flags are lm-eval's, so argparse here never sees them)."""
    from .extras import require

    try:
        require("lm_eval", "eval")
        from .lmeval.adapter import lm_eval_cli
    except DynaformerError as e:
        print(f"dynaformer lm-eval: error: {e}", file=sys.stderr)
        return 2
    return lm_eval_cli(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "lm-eval":
        return cmd_lm_eval(argv[1:])
    parser = make_parser()
    args = parser.parse_args(argv)
    # SIGTERM before a command installs its own handling (the trainer saves a checkpoint on it) ends the
    # command like Ctrl-C does: one line, exit 130, and whatever was being set up is redone on a rerun.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"dynaformer {args.command}: {e}", file=sys.stderr)
        return 130
    except DynaformerError as e:
        print(f"dynaformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynaformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = f" writing '{e.filename}'" if getattr(e, "filename", None) else ""
        resume = " (training continues with --resume auto)" if args.command in ("train", "finetune") else ""
        print(f"dynaformer {args.command}: error: the disk is full{where}; files written before are intact. "
              f"Free space and run the command again{resume}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
