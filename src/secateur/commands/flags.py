"""Flags shared by the commands, and flags generated from a config's `option(...)` fields."""

from __future__ import annotations

import argparse
from typing import Any


def job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF model directory, .gguf file or secateur output (never modified)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true",
                   help="go on from the checkpoints an interrupted recovery stage left next to --out")
    nonfinite_argument(p)


def nonfinite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="accept NaN / Inf values in the input's weights (refused by default)")


def option_flags(p: argparse.ArgumentParser, options: dict[str, Any]) -> None:
    from secateur.schema import cli_type

    for key, (option, help_text) in options.items():
        kind, extra = cli_type(option)
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=help_text.replace("%", "%%"),
                       **({"type": kind} if kind else {}), **extra)


def generated_flags(p: argparse.ArgumentParser, config_type: type) -> None:
    """A command's flags from its config dataclass, each help with its default."""
    from secateur.schema import options_of

    shown = lambda o: "" if o.default in (None, (), False) else f" (default {o.default})"  # noqa: E731
    option_flags(p, {k: (o, o.help + shown(o)) for k, o in options_of(config_type).items()})
