"""Command line: `secateur prune | eval | info`. Flags only build the typed configs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError
from secateur.io import load, read_manifest, resolve_device, split_model_path, structure_section, structures
from secateur.output import claim, disk_error, signals_raise
from secateur.runtime import tune_allocator

USER_ERRORS = (SecateurError,)


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    from secateur.settings import flag_options
    from secateur.recipe import all_methods

    p = sub.add_parser("prune", help="prune a model with one or more stages and save it with a manifest")
    _job_arguments(p)
    p.add_argument("--recipe", help="TOML recipe (keys mirror these flags; [[stage]] tables for several stages) or a "
                                    "secateur.json manifest to replay; flags given here win")
    p.add_argument("--method", choices=all_methods(),
                   help="the stage's method (default: wanda): sparsity, depth (blocks or branches), width or recovery")
    _option_flags(p, flag_options())


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from secateur.settings import CALIB_OPTIONS, RUN_OPTIONS, flag_options
    from secateur.recipe import KINDS
    from secateur.schema import flag

    recovery = KINDS["recovery"]
    keys = {*recovery.options("recovery"), *(k for k in CALIB_OPTIONS if k not in recovery.calib_fixed), *RUN_OPTIONS}
    p = sub.add_parser("train", help="recover a pruned model by training (distillation from the original model by "
                                     "default) and save it with a manifest")
    _job_arguments(p)
    _option_flags(p, {k: v for k, v in flag_options().items() if k in keys})
    p.set_defaults(method="recovery", recipe=None)
    p.epilog = f"the same as: secateur prune MODEL --method recovery; data: {flag('calib')} (default enwiki-sample)"


def _job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model directory, .gguf file or secateur output (never modified)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true",
                   help="go on from the checkpoints an interrupted recovery stage left next to --out")
    _nonfinite_argument(p)


def _nonfinite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN / Inf values in the input's weights (refused by default)")


def _option_flags(p: argparse.ArgumentParser, options: dict[str, Any]) -> None:
    from secateur.schema import cli_type

    for key, (option, help_text) in options.items():
        kind, extra = cli_type(option)
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=help_text.replace("%", "%%"),
                       **({"type": kind} if kind else {}), **extra)


def _generated_flags(p: argparse.ArgumentParser, config_type: type) -> None:
    """A command's flags from its config dataclass, each help with its default."""
    from secateur.schema import options_of

    shown = lambda o: "" if o.default in (None, (), False) else f" (default {o.default})"  # noqa: E731
    _option_flags(p, {k: (o, o.help + shown(o)) for k, o in options_of(config_type).items()})


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    from secateur.evalconfig import EvalConfig

    p = sub.add_parser("eval", help="perplexity over non-overlapping windows, lm-eval tasks (--tasks) or samples "
                                    "(--generate)")
    p.add_argument("model", help="HF model directory, .gguf file or secateur output")
    _generated_flags(p, EvalConfig)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _nonfinite_argument(p)


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, parameters, per-layer sparsity, manifest summary")
    p.add_argument("model", help="HF model directory or .gguf file")
    p.add_argument("--json", action="store_true", help="print everything as JSON")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from secateur.bench import BenchConfig

    p = sub.add_parser("bench", help="parameters, file size, prefill latency, decode tokens/s, peak memory")
    p.add_argument("models", nargs="+", help="model directories or .gguf files; ratios are against the first")
    _generated_flags(p, BenchConfig)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _nonfinite_argument(p)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    from secateur.export import TYPES

    p = sub.add_parser("export", help="write a model as one GGUF file for llama.cpp / ollama / LM Studio")
    p.add_argument("model", help="HF model directory or secateur output (never modified)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write (atomically)")
    p.add_argument("--type", default="f16", choices=list(TYPES),
                   help="weight type of 2-D tensors (default f16; norms and biases stay f32)")
    p.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name, for a tokenizer secateur does not "
                                           "recognise (default: copied from the source GGUF or recognised)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    _nonfinite_argument(p)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    from secateur.plan import PlanConfig
    from secateur.schema import options_of

    p = sub.add_parser("plan", help="from a target (decode speedup in an engine, parameters, file size) to the best "
                                    "mix of depth, width and hidden pruning: a recipe, the Pareto front and a plot")
    p.add_argument("model", help="HF model directory, .gguf file or secateur output (never modified)")
    p.add_argument("--out", required=True, help="new directory for plan.toml, front.md, pareto.png and plan.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    _nonfinite_argument(p)
    _option_flags(p, {k: (o, o.help) for k, o in options_of(PlanConfig).items()})


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one HTML page (and Markdown) with plots about one or more models")
    p.add_argument("models", nargs="+", help="secateur outputs or HF model directories")
    p.add_argument("--out", required=True, help="new directory for index.html, report.md and the plots")
    p.add_argument("--tasks-results", action="append", default=[], metavar="FILE",
                   help="a `secateur eval --tasks --results` file (repeatable)")
    p.add_argument("--bench", metavar="FILE", help="`secateur bench --json` output for these models")
    p.add_argument("--samples", action="append", default=[], metavar="FILE",
                   help="`secateur eval --generate --json` output (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


class _Parser(argparse.ArgumentParser):
    """Bad flags end like every other bad input: one line, exit code 2."""

    def error(self, message: str) -> None:
        command = "" if self.prog == "secateur" else f" {self.prog.split()[-1]}"
        self.exit(2, f"secateur: error: {message} (see secateur{command} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secateur", description="Prune Hugging Face causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_prune_parser, _train_parser, _eval_parser, _info_parser, _bench_parser, _export_parser,
                _report_parser, _plan_parser):
        add(sub)
    return parser


COMMAND_ONLY = ("command", "model", "out", "overwrite", "recipe", "verbose", "resume", "allow_nonfinite")


def cmd_prune(args: argparse.Namespace) -> int:
    from secateur.pipeline import run_recipe
    from secateur.settings import plan_recipe, read_recipe

    flags = {k: v for k, v in vars(args).items() if v is not None and k not in COMMAND_ONLY}
    document = read_recipe(args.recipe) if args.recipe else {}
    stages, options = plan_recipe(document, flags, overwrite=args.overwrite, resume=args.resume,
                                  allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    manifest = run_recipe(args.model, stages, args.out, options, inputs=[args.recipe] if args.recipe else [])
    records = manifest["history"][-len(stages):]
    for record in records:
        print(summary(record))
    structure = manifest["structure"]
    print(f"-> {args.out}: {structure['blocks']} blocks, {structure['parameters']:,} parameters, sparsity "
          f"{structure['target_sparsity']:.4f} of the block layers, in {manifest['timings']['prune']:.1f} s")
    _print_structure(structure)
    ev = manifest.get("evaluation") or {}
    if "perplexity" in ev:
        print(f"perplexity {ev['perplexity']:.3f} ({ev['source']}, {ev['windows']} x {ev['seq_len']} tokens)")
    for name, task in (ev.get("tasks") or {}).get("tasks", {}).items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in task["metrics"].items() if isinstance(v, float))
        print(f"{name} v{task['version']}: {metrics} ({task['samples']} documents)")
    return 0


def summary(record: dict[str, Any]) -> str:
    """A history record's console line, as its kind says it (a kind this secateur does not know: its settings)."""
    from secateur.recipe import KINDS

    kind = KINDS.get(record.get("kind"))
    return kind.summary(record) if kind is not None and "seconds" in record else f"{record.get('kind')}: {record.get('settings')}"


def cmd_eval(args: argparse.Namespace) -> int:
    from secateur.evalconfig import EvalConfig
    from secateur.schema import from_flags

    split_model_path(Path(args.model))  # a missing or non-model path fails before anything else
    config = from_flags(EvalConfig, vars(args))
    run = {"tasks": _eval_tasks, "generate": _eval_generate, "perplexity": _eval_perplexity}[config.mode]
    return run(args, config)


def _eval_perplexity(args: argparse.Namespace, config: Any) -> int:
    import dataclasses

    from secateur.evaluate import evaluate_model
    from secateur.io import load_config, model_positions

    positions = model_positions(load_config(args.model))
    if positions and config.seq_len > positions:
        if args.seq_len is not None:
            raise SecateurError(f"--seq-len {config.seq_len} is longer than the model's {positions} positions; lower it")
        print(f"note: --seq-len {positions} (the default {config.seq_len} is longer than the model's {positions} "
              "positions)", file=sys.stderr)
        config = dataclasses.replace(config, seq_len=positions)
    device = resolve_device(config.device)
    model, tokenizer = load(args.model, dtype=config.dtype, device=str(device), allow_nonfinite=args.allow_nonfinite)
    result = evaluate_model(model, tokenizer, config.data, config.seq_len, config.windows, field=config.text_field,
                            batch_size=config.batch_size, device=device)  # fmt: skip
    result["model"] = args.model
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: perplexity {result['perplexity']:.3f} on {config.data} "
              f"({result['windows']} windows x {result['seq_len']} tokens, {result['seconds']:.1f} s)")
        print(f"protocol: {result['protocol']}")
    return 0


def _eval_generate(args: argparse.Namespace, config: Any) -> int:
    from secateur.tasks.generate import PROMPTS, continuations

    new_tokens = config.new_tokens
    reference = config.reference
    if reference is None and Path(args.model).is_dir():
        origin = ((read_manifest(args.model) or {}).get("origin") or {}).get("path")
        reference = origin if origin and Path(origin).exists() and Path(origin).resolve() != Path(args.model).resolve() else None
    if reference is not None:
        split_model_path(Path(reference))
    device = resolve_device(config.device)
    rows: dict[str, list[str]] = {}
    for label, path in (("reference", reference), ("model", args.model)):
        if path is not None:
            model, tokenizer = load(path, dtype=config.dtype, device=str(device), allow_nonfinite=args.allow_nonfinite)
            rows[label] = continuations(model, tokenizer, PROMPTS, new_tokens, device)
            del model
    samples = [{"prompt": p, **{label: texts[i] for label, texts in rows.items()}} for i, p in enumerate(PROMPTS)]
    if args.json:
        print(json.dumps({"model": args.model, "reference": reference, "new_tokens": new_tokens, "samples": samples},
                         indent=2))  # fmt: skip
        return 0
    names = {"reference": f"{reference}", "model": f"{args.model}"}
    for sample in samples:
        print(f"## {sample['prompt']}")
        for label in rows:
            print(f"  [{names[label]}] {sample[label]}")
    print(f"greedy, {new_tokens} new tokens, chat template where the tokenizer has one")
    return 0


def _eval_tasks(args: argparse.Namespace, config: Any) -> int:
    import contextlib
    import time

    from secateur.tasks.harness import check_tasks, run_tasks

    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    include = [Path(d) for d in config.include_path]
    for directory in include:
        if not directory.is_dir():
            raise SecateurError(f"--include-path {directory} is not a directory of task files")
    results = (claim(config.results, inputs=[args.model, *include], overwrite=None, shape="file", flag="--results",
                     suffix=".json") if config.results else contextlib.nullcontext())  # fmt: skip
    with results as output:
        check_tasks(tasks, include)
        device = resolve_device(config.device)
        model, tokenizer = load(args.model, dtype=config.dtype, device=str(device), allow_nonfinite=args.allow_nonfinite)
        clock = time.perf_counter()
        result = run_tasks(model, tokenizer, tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                           batch_size=config.batch_size, device=str(device), include_path=include)  # fmt: skip
        result.update(model=args.model, seconds=time.perf_counter() - clock)
        if output is not None:
            with output.write() as staging:
                staging.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, task in result["tasks"].items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in task["metrics"].items() if isinstance(v, float))
        chance = f" (chance {task['chance']:.2f})" if "chance" in task else ""
        print(f"{args.model}: {name} v{task['version']}: {metrics}{chance}, {task['samples']} documents, "
              f"{task['num_fewshot']}-shot")
    print(f"lm-eval {result['lm_eval_version']}, {result['seconds']:.1f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from secateur.manifest import history_of
    from secateur.sparsity.prune import sparsity_table

    from secateur.io import nonfinite

    model, _ = load(args.model, allow_nonfinite=True)  # info describes the weights, NaN included
    layers = sparsity_table(model)
    bad = nonfinite(model)
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    target = sum(r * c for _, (r, c), _ in layers)
    zeros = sum(r * c * s for _, (r, c), s in layers)
    config = model.config
    info = {
        "architecture": config.architectures[0] if config.architectures else type(model).__name__,
        "model_type": config.model_type,
        "blocks": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "parameters": total,
        "nonzero_parameters": nonzero,
        "target_parameters": target,
        "target_sparsity": zeros / max(target, 1),
        "layers": [{"name": n, "shape": list(s), "sparsity": z} for n, s, z in layers],
        "nonfinite": {name: count for name, count in bad},
        "manifest": read_manifest(args.model) if not str(args.model).endswith(".gguf") else None,
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['architecture']} ({info['model_type']}): {info['blocks']} blocks, hidden {info['hidden_size']}")
    print(f"parameters {total:,} (nonzero {nonzero:,}); prunable {target:,}, sparsity {info['target_sparsity']:.4f}")
    if bad:
        print(f"WARNING: {sum(c for _, c in bad):,} NaN/Inf values in {len(bad)} tensors, first {bad[0][0]}")
    _print_layer_grid(layers)
    manifest = info["manifest"] or {}
    if manifest.get("source"):
        source = manifest["source"]
        print(f"from {source.get('path', '?')} (sha256 {source.get('sha256', '?')[:12]}), "
              f"secateur {manifest.get('secateur_version', '?')}")
    for number, stage in enumerate(history_of(manifest), 1):
        print(f"stage {number}: {summary(stage)}")
    _print_structure(structure_section(manifest))
    return 0


def _print_structure(section: dict[str, Any]) -> None:
    """What each kind's structure hook says of a manifest's structure section (removed branches,
    per-block widths, ...)."""
    for structure in structures():
        if section and (line := structure.show(section)):
            print(line)


def _print_layer_grid(layers: list[tuple[str, tuple[int, int], float]]) -> None:
    """One row per block, one column per layer kind: the fraction of zero weights."""
    grid: dict[str, dict[str, float]] = defaultdict(dict)
    for name, _, sparsity in layers:
        parts = name.split(".")
        index = next(i for i, part in enumerate(parts) if part.isdigit())
        block, kind = ".".join(parts[: index + 1]), ".".join(parts[index + 1 :])
        grid[block][kind] = sparsity
    kinds = list(dict.fromkeys(k for row in grid.values() for k in row))
    short = [k.split(".")[-1] for k in kinds]
    print("block  " + " ".join(f"{k:>10}" for k in short))
    for block, row in grid.items():
        print(f"{block.split('.')[-1]:>5}  " + " ".join(f"{row[k]:>10.4f}" if k in row else f"{'removed':>10}" for k in kinds))


def cmd_bench(args: argparse.Namespace) -> int:
    from secateur.bench import BENCH_PROTOCOL, BenchConfig, bench, llama_bench_binary, measure_llamacpp, table, to_json
    from secateur.schema import from_flags

    for path in args.models:
        split_model_path(Path(path))  # a missing or non-model path fails before any timing
    config = from_flags(BenchConfig, vars(args))
    common = dict(rounds=config.rounds, prompt=config.prompt, new_tokens=config.new_tokens, repeats=config.repeats)
    if config.engine == "llama.cpp":
        if args.allow_nonfinite:
            raise SecateurError("--allow-nonfinite applies only with --engine hf (llama.cpp reads the GGUF as it is)")
        if not all(str(p).lower().endswith(".gguf") for p in args.models):
            raise SecateurError("--engine llama.cpp times .gguf files; write them first with secateur export MODEL "
                                "--gguf OUT.gguf")
        binary = llama_bench_binary(config.llama_cpp)
        results = bench(args.models, measure_one=measure_llamacpp, binary=binary, threads=config.threads, **common)
        where = f"llama.cpp ({binary}), {results[0].threads} threads"
    else:
        device = str(resolve_device(config.device))
        results = bench(args.models, device=device, dtype=config.dtype, allow_nonfinite=args.allow_nonfinite,
                        **common)  # fmt: skip
        where = f"device {device}, {results[0].threads} threads; {BENCH_PROTOCOL}"
    if args.json:
        print(to_json(results))
    else:
        print(table(results))
        print(where)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from secateur.export import export_gguf

    record = export_gguf(args.model, args.gguf, kind=args.type, overwrite=args.overwrite,
                         tokenizer_pre=args.tokenizer_pre, allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    layout = "per-layer widths" if record["arch"] == "deci" else "uniform widths"
    print(f"-> {args.gguf}: {record['arch']} ({layout}), {record['type']}, {record['bytes'] / 2**20:.1f} MiB; "
          f"tokenizer {record['tokenizer']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from secateur.errors import ConfigError
    from secateur.plan import PlanConfig, plan
    from secateur.schema import from_flags

    if args.target is None:
        raise ConfigError("--target is required, e.g. --target decode-speedup=1.6, params=80M or file=200MB")
    record = plan(args.model, from_flags(PlanConfig, vars(args)), args.out, overwrite=args.overwrite,
                  allow_nonfinite=args.allow_nonfinite,
                  explicit=frozenset(k for k, v in vars(args).items() if v is not None))  # fmt: skip
    chosen, costs = record["chosen"], record["costs"]
    print(f"plan for --target {record['target']}: {chosen['key']} ({chosen['kind']}), {chosen['params'] / 1e6:.1f}M "
          f"parameters, KL {chosen['kl']:.4f} on {chosen['windows']} windows")
    if costs.get("engine"):
        errors = [abs(e[k]) for e in costs["errors"] for k in ("decode", "prefill")]
        print(f"  {'timed against dense' if chosen['measured'] else 'predicted'} in {costs['engine']['engine']}: "
              f"decode {chosen['decode_speedup']:.2f}x, prefill {chosen['prefill_speedup']:.2f}x; cost model "
              f"held-out error up to {max(errors, default=0) * 100:.1f}% ({len(costs['errors'])} shapes); "
              f"{len(costs['checks'])} shapes checked in pairs (margin {costs['margin'] * 100:.1f}%)")
    seconds = record["seconds"]
    print(f"  {record['evaluations']} candidate builds over rungs {record['rungs']}"
          f"{'; ' + record['stopped'] if record['stopped'] else ''}; {seconds['total']:.0f} s")
    print(f"-> {args.out}/plan.toml (secateur prune MODEL --recipe {args.out}/plan.toml --out DIR), front.md, "
          "pareto.png, plan.json")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from secateur.report import write_report

    clock = time.perf_counter()
    page = write_report(args.models, args.out, tasks=[Path(p) for p in args.tasks_results],
                        bench=Path(args.bench) if args.bench else None, samples=[Path(p) for p in args.samples],
                        overwrite=args.overwrite)  # fmt: skip
    print(f"-> {page} (and report.md), {len(args.models)} models, {time.perf_counter() - clock:.1f} s")
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: no output; a recovery stage's checkpoints, for --resume."""
    from secateur.pipeline import checkpoints_for

    work = checkpoints_for(args.out) if args.command in ("prune", "train") else None
    if work is not None and any(work.glob("stage-*/checkpoint")):
        return f"no output was written; the recovery's checkpoints stay in {work} (rerun with --resume)"
    return "no output was written (partial files were removed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # bad flags (one line printed) or --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tune_allocator()
    handler = {"prune": cmd_prune, "train": cmd_prune, "eval": cmd_eval, "info": cmd_info, "bench": cmd_bench,
               "export": cmd_export, "report": cmd_report, "plan": cmd_plan}[args.command]
    try:
        with signals_raise():  # SIGTERM and SIGHUP end the run as Ctrl-C does: every cleanup runs
            return handler(args)
    except USER_ERRORS as exc:
        print(f"secateur: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"secateur: interrupted; {_interrupted(args)}", file=sys.stderr)
        return 130
    except OSError as exc:
        error = disk_error(exc, exc.filename or "a file", None)
        if error is None and exc.filename is None:
            raise
        print(f"secateur: error: {error or f'cannot use {exc.filename}: {exc.strerror}'}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
