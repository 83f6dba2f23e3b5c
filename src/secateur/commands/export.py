"""`secateur export`: one GGUF file for llama.cpp / ollama / LM Studio."""

from __future__ import annotations

import argparse

from secateur.commands.flags import generated_flags, nonfinite_argument


def add(sub: argparse._SubParsersAction) -> None:
    from secateur.export import ExportConfig

    p = sub.add_parser("export", help="write a model as one GGUF file for llama.cpp / ollama / LM Studio")
    p.add_argument("model", help="HF model directory or secateur output (never modified)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write (atomically)")
    generated_flags(p, ExportConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    nonfinite_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from secateur.export import ExportConfig, export_gguf
    from secateur.schema import from_flags

    config = from_flags(ExportConfig, vars(args))
    record = export_gguf(args.model, args.gguf, kind=config.type, overwrite=args.overwrite,
                         tokenizer_pre=config.tokenizer_pre, allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    layout = "per-layer widths" if record["arch"] == "deci" else "uniform widths"
    print(f"-> {args.gguf}: {record['arch']} ({layout}), {record['type']}, {record['bytes'] / 2**20:.1f} MiB; "
          f"tokenizer {record['tokenizer']}")
    return 0
