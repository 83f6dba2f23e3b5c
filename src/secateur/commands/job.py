"""`secateur prune` (and the commands kinds add, e.g. `secateur train`): run stages, save with a manifest."""

from __future__ import annotations

import argparse
from typing import Any

from secateur.commands.flags import job_arguments, option_flags
from secateur.io import structures


def add(sub: argparse._SubParsersAction) -> None:
    """`prune`, then the command each kind that declares one adds (`train` for recovery)."""
    from secateur.settings import flag_options
    from secateur.recipe import all_methods

    p = sub.add_parser("prune", help="prune a model with one or more stages and save it with a manifest")
    job_arguments(p)
    p.add_argument("--recipe", help="TOML recipe (keys mirror these flags; [[stage]] tables for several stages) or a "
                                    "secateur.json manifest to replay; flags given here win")
    p.add_argument("--method", choices=all_methods(),
                   help="the stage's method (default: wanda): sparsity, depth (blocks or branches), width or recovery")
    option_flags(p, flag_options())
    p.set_defaults(run=run, keeps_checkpoints=True, joins_processes=True)
    _kind_commands(sub)


def _kind_commands(sub: argparse._SubParsersAction) -> None:
    """A command per kind that declares one: `secateur prune --method M` with only that kind's flags."""
    from secateur.recipe import KINDS
    from secateur.schema import flag
    from secateur.settings import CALIB_OPTIONS, RUN_OPTIONS, flag_options

    for kind in KINDS.values():
        if kind.command is None:
            continue
        name, help_text = kind.command
        method = kind.methods()[0]
        keys = {*(k for m in kind.methods() for k in kind.options(m)), *RUN_OPTIONS,
                *(k for k in CALIB_OPTIONS if k not in kind.calib_fixed)}  # fmt: skip
        p = sub.add_parser(name, help=help_text)
        job_arguments(p)
        options = {k: v for k, v in flag_options().items() if k in keys}
        source = kind.calibration(kind.build(method, {})).source  # the kind's own default text
        if "calib" in options:
            option = options["calib"][0]
            options["calib"] = (option, f"calibration: {option.help} (default {source})")
        option_flags(p, options)
        if len(kind.methods()) > 1:
            p.add_argument("--method", choices=kind.methods(), help=f"the stage's method (default: {method})")
        p.set_defaults(method=method, recipe=None, run=run, keeps_checkpoints=True, joins_processes=True)
        p.epilog = f"the same as: secateur prune MODEL --method {method}; data: {flag('calib')} (default {source})"


COMMAND_ONLY = ("command", "model", "out", "overwrite", "recipe", "verbose", "resume", "allow_nonfinite", "run",
                "keeps_checkpoints", "joins_processes")


def run(args: argparse.Namespace) -> int:
    from secateur.calibrate.processes import main_process, start, stop
    from secateur.pipeline import run_recipe
    from secateur.settings import plan_recipe, read_recipe

    flags = {k: v for k, v in vars(args).items() if v is not None and k not in COMMAND_ONLY}
    document = read_recipe(args.recipe) if args.recipe else {}
    stages, options = plan_recipe(document, flags, overwrite=args.overwrite, resume=args.resume,
                                  allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    start(options.device)  # one of several processes (torchrun): join them; process 0 writes
    try:
        manifest = run_recipe(args.model, stages, args.out, options, inputs=[args.recipe] if args.recipe else [])
        main = main_process()
    finally:
        stop()
    if not main:
        return 0  # of several processes (torchrun), the first reports
    records = manifest["history"][-len(stages):]
    for record in records:
        print(summary(record))
        if record.get("check"):
            print(check_line(record["check"]))
    structure = manifest["structure"]
    print(f"-> {args.out}: {structure['blocks']} blocks, {structure['parameters']:,} parameters, sparsity "
          f"{structure['target_sparsity']:.4f} of the block layers, in {manifest['timings']['prune']:.1f} s")
    print_structure(structure)
    ev = manifest.get("evaluation") or {}
    for name, one in (ev.get("domains") or {}).items():
        per_byte = f", {one['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in one else ""
        print(f"perplexity {one['perplexity']:.3f}{per_byte} ({name}, {one['windows']} x {one['seq_len']} tokens)")
    if "perplexity" in ev:
        per_byte = f", {ev['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in ev else ""
        what = f"mean over {len(ev['domains'])} domains" if "domains" in ev else ev["source"]
        print(f"perplexity {ev['perplexity']:.3f}{per_byte} ({what}, {ev['windows']} x {ev['seq_len']} tokens)")
    for name, task in (ev.get("tasks") or {}).get("tasks", {}).items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in task["metrics"].items() if isinstance(v, float))
        print(f"{name} v{task['version']}: {metrics} ({task['samples']} documents)")
    return 0


def summary(record: dict[str, Any]) -> str:
    """A history record's console line, as its kind says it (a kind this secateur does not know: its settings)."""
    from secateur.recipe import KINDS

    kind = KINDS.get(record.get("kind"))
    return kind.summary(record) if kind is not None and "seconds" in record else f"{record.get('kind')}: {record.get('settings')}"


def print_structure(section: dict[str, Any]) -> None:
    """What each kind's structure hook says of a manifest's structure section (removed branches,
    per-block widths, ...)."""
    for structure in structures():
        if section and (line := structure.show(section)):
            print(line)


def check_line(check: dict[str, Any]) -> str:
    """The loud check's console line: the held-out perplexity after the stage against the input's."""
    line = (f"held-out check: perplexity {check['input']:.2f} -> {check['output']:.2f} ({check['ratio']:.2f}x the "
            f"input's, {check['windows']} windows of {check['seq_len']} tokens)")
    if check["flagged"]:
        line += (f"\nWARNING: above {check['threshold']:g}x the input's perplexity: the output is likely broken. "
                 "Remedies: remove less, try another method, or add a recovery stage after it")
    return line
