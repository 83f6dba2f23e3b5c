"""Command line: `secateur prune | train | eval | generate | filter-layer | info | bench | export | report | plan |
llama-cpp`. Each command is a module of `secateur.commands` (its parser and handler); this module parses,
dispatches, and turns every failure into one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from secateur.calibrate.processes import several_processes
from secateur.commands import bench, evaluate, export, generate, info, job, llamacpp, plan, report
from secateur.errors import SecateurError
from secateur.output import disk_error, signals_raise
from secateur.runtime import tune_allocator

USER_ERRORS = (SecateurError,)


class _Parser(argparse.ArgumentParser):
    """Bad flags end like every other bad input: one line, exit code 2."""

    def error(self, message: str) -> None:
        command = "" if self.prog == "secateur" else f" {self.prog.split()[-1]}"
        self.exit(2, f"secateur: error: {message} (see secateur{command} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secateur", description="Prune Hugging Face causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (job, evaluate, generate, info, bench, export, report, plan, llamacpp):
        command.add(sub)
    return parser


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command leaves: no output; a recovery stage's checkpoints, for --resume."""
    from secateur.calibrate.disk import has_state
    from secateur.pipeline import STREAM, checkpoints_for

    work = checkpoints_for(args.out) if getattr(args, "keeps_checkpoints", False) else None
    if work is not None and any(work.glob("stage-*/checkpoint")):
        return f"no output was written; the recovery's checkpoints stay in {work} (rerun with --resume)"
    if work is not None and has_state(work / STREAM):
        return f"no output was written; the blocks streamed so far stay in {work} (rerun with --resume)"
    return "no output was written (partial files were removed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # bad flags (one line printed) or --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tune_allocator()
    try:
        if several_processes() and not getattr(args, "joins_processes", False):  # each would do the whole work
            raise SecateurError(f"secateur {args.command} runs in one process: run it without torchrun (prune and "
                              "train share their work over the processes torchrun starts)")
        with signals_raise():  # SIGTERM and SIGHUP end the run as Ctrl-C does: every cleanup runs
            return args.run(args)
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
