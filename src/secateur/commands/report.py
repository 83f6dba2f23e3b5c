"""`secateur report`: one page about one or more models."""

from __future__ import annotations

import argparse

from secateur.commands.flags import generated_flags


def add(sub: argparse._SubParsersAction) -> None:
    from secateur.report import ReportConfig

    p = sub.add_parser("report", help="one HTML page (and Markdown) with plots about one or more models")
    p.add_argument("models", nargs="+", help="secateur outputs or HF model directories")
    p.add_argument("--out", required=True, help="new directory for index.html, report.md and the plots")
    generated_flags(p, ReportConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import time

    from secateur.report import ReportConfig, write_report
    from secateur.schema import from_flags

    clock = time.perf_counter()
    page = write_report(args.models, args.out, from_flags(ReportConfig, vars(args)), overwrite=args.overwrite)
    print(f"-> {page} (and report.md), {len(args.models)} models, {time.perf_counter() - clock:.1f} s")
    return 0
