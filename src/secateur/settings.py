"""From recipe documents and flags to planned stages and run options: the stages (each with the
calibration it reads), how the job loads, evaluates and saves, and the merged flag table that
`secateur prune` / `train` generate their flags from."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from secateur.config import CalibConfig
from secateur.errors import ConfigError
from secateur.io import Dtype
from secateur.recipe import KINDS, build_stage, kind_of
from secateur.schema import Option, check_applies, fill, flag, flatten, option, options_of


@dataclass(frozen=True)
class RunOptions:
    """How a job loads, evaluates and saves, whatever its stages."""

    dtype: Dtype = option("float32", "load and work precision")
    device: str = option("auto", "auto (cuda when present), cpu or cuda[:N]")
    eval_source: str | None = option(None, "evaluate perplexity on this source after pruning; recorded in the "
                                           "manifest", key="eval")
    eval_windows: int = option(64, "evaluation windows; also the calibration hold-out")
    eval_seq_len: int = option(512, "tokens per evaluation window; also the calibration hold-out")
    eval_tasks: str | None = option(None, "lm-eval tasks to run after pruning, comma-separated (offline: "
                                          "secateur_wordnet, secateur_analogy); results in the manifest's evaluation")
    teacher: str | None = option(None, "recovery: the model to distil from (default: the model before any secateur "
                                       "run, as the input's manifest names it, or the input itself)")
    check_windows: int = option(4, "after every stage, the perplexity on this many held-out windows (of "
                                   "--eval-seq-len tokens from the start of the first calibration text, which no "
                                   "stage calibrates or trains on) against the input's; 0: off")
    offload: Literal["auto", "none", "disk"] = option(
        "auto", "where the weights live: none (in memory), disk (decoder blocks streamed one at a time from the "
                "input's safetensors to the output: one sparsity stage with a uniform or N:M target, or one depth "
                "stage by angular or block-influence; no evaluation), "
                "auto (disk when the weights exceed 0.8 of the memory available and the run can stream; says so)")
    check_ratio: float = option(3.0, "warn, and record it, when a stage leaves that held-out perplexity above this "
                                     "multiple of the input's")
    overwrite: bool = False  # replace an existing output (a command-line choice, never part of a recipe)
    allow_nonfinite: bool = False  # accept NaN / Inf weights in the input (command line only)
    explicit: frozenset[str] = frozenset()  # the keys the user gave (defaults that do not fit may adapt)
    resume: bool = False  # go on from the checkpoints an interrupted recovery left (command line only)


@dataclass(frozen=True)
class PlannedStage:
    """A stage and the calibration it reads (None: it reads none)."""

    config: Any
    calib: CalibConfig | None = None


def plan_stage(config: Any, calib: CalibConfig | None = None) -> PlannedStage:
    """A stage with its kind's default calibration size where `calib` is not given."""
    kind = kind_of(config)
    if not kind.needs_calibration(config):
        return PlannedStage(config, None)
    return PlannedStage(config, calib or kind.calibration(config))


CALIB_OPTIONS = options_of(CalibConfig)


RUN_OPTIONS = options_of(RunOptions)


def flag_options() -> dict[str, tuple[Option, str]]:
    """Every option of every stage kind, of calibration and of the run, once per key: (the option,
    with the choices of all its owners, and a help text naming the owners where they differ)."""
    owned: dict[str, list[tuple[str, Option]]] = {}
    for kind in KINDS.values():
        for method in kind.methods():
            for key, opt in kind.options(method).items():
                owned.setdefault(key, []).append((f"{kind.name}:{method}", opt))
    for label, options in (("calibration", CALIB_OPTIONS), ("run", RUN_OPTIONS)):
        for key, opt in options.items():
            owned.setdefault(key, []).append((label, opt))
    return {key: (_merged(entries), _help(entries)) for key, entries in owned.items()}


def _merged(entries: list[tuple[str, Option]]) -> Option:
    first = entries[0][1]
    literals = [get_args(o.type) for _, o in entries if get_origin(o.type) is Literal]
    if len(literals) == len(entries) and len(entries) > 1:
        return dataclasses.replace(first, type=Literal[tuple(dict.fromkeys(c for cs in literals for c in cs))])
    return first


def _help(entries: list[tuple[str, Option]]) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for owner, opt in entries:
        default = "" if opt.default in (None, ()) else f" (default {_plain(opt.default)})"
        groups.setdefault((opt.help, default), []).append(owner)
    parts = []
    for (text, default), owners_ in groups.items():
        parts.append(f"{_owner_label(owners_)}: {text}{default}")
    return "; ".join(parts)


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _owner_label(owners_: list[str]) -> str:
    kinds = dict.fromkeys(o.split(":")[0] for o in owners_)
    labels = []
    for kind in kinds:
        methods = [o.split(":")[1] for o in owners_ if o.startswith(kind + ":")]
        full = kind not in KINDS or len(methods) == len(KINDS[kind].methods())
        labels.append(kind if full else f"{kind} ({', '.join(methods)})")
    return ", ".join(labels)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe document: a TOML file (flat keys for one stage, or `[[stage]]` tables), or the
    `recipe` section of a secateur.json manifest (which replays that run)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    if path.suffix == ".json":
        try:
            document = json.loads(path.read_text(encoding="utf-8")).get("recipe")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ConfigError(f"recipe {path} is not a secateur manifest ({exc})") from None
        if not isinstance(document, dict) or "stage" not in document:
            raise ConfigError(f"{path} holds no replayable recipe (written by an earlier secateur); write a TOML recipe")
    else:
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    return _normalised(document)


def _normalised(table: dict[str, Any]) -> dict[str, Any]:
    out = {key.replace("-", "_"): value for key, value in table.items()}
    if isinstance(out.get("stage"), list):
        out["stage"] = [_normalised(t) if isinstance(t, dict) else t for t in out["stage"]]
    return out


def _split(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(stage, calibration, run) settings."""
    calib = {k: v for k, v in settings.items() if k in CALIB_OPTIONS}
    run = {k: v for k, v in settings.items() if k in RUN_OPTIONS}
    return {k: v for k, v in settings.items() if k not in calib and k not in run}, calib, run


def plan_recipe(document: dict[str, Any], flags: dict[str, Any], overwrite: bool = False, resume: bool = False,
                allow_nonfinite: bool = False) -> tuple[list[PlannedStage], RunOptions]:  # fmt: skip
    """Stages (with their calibration) and run options from a recipe document and flags; precedence,
    lowest first: the stage kind's defaults, the recipe's top level, a stage table, the flags."""
    top = {k: v for k, v in document.items() if k != "stage"}
    tables = document.get("stage")
    top_stage, top_calib, top_run = _split(top)
    flag_stage, flag_calib, flag_run = _split(flags)
    if tables is None:
        tables = [{**top_stage, **flag_stage}]
    else:
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise ConfigError("a recipe's stages are [[stage]] tables, at least one")
        if top_stage:
            raise ConfigError(f"{sorted(top_stage)} are stage options: with [[stage]] tables they go inside a table")
        if flag_stage:
            flagged = ", ".join("--" + k.replace("_", "-") for k in sorted(flag_stage))
            raise ConfigError(f"{flagged}: with a multi-stage recipe, stage options belong in its [[stage]] tables; "
                              "flags set calibration and run options only")
    explicit = frozenset({*top, *flags, *(k for t in tables if isinstance(t, dict) for k in t)})
    run = fill(RunOptions, {**top_run, **flag_run}, overwrite=overwrite, resume=resume,
               allow_nonfinite=allow_nonfinite, explicit=explicit)  # fmt: skip
    stages = []
    for number, table in enumerate(tables, 1):
        where = f"stage {number}: " if len(tables) > 1 else ""
        stage, calib, extra = _split(table)
        if extra and len(tables) > 1:
            raise ConfigError(f"{where}{sorted(extra)} are run options; put them at the top of the recipe")
        try:
            config = build_stage(stage)
            fixed = [k for k in kind_of(config).calib_fixed if k in (calib if len(tables) > 1 else
                                                                     {**top_calib, **calib, **flag_calib})]  # fmt: skip
            if fixed:
                raise ConfigError(f"{', '.join(flag(k) for k in fixed)} do not apply to {config.method_name}: its "
                                  "windows come from its own options (--tokens, --train-seq-len, --val-windows)")
            settings = {k: v for k, v in {**top_calib, **calib, **flag_calib}.items()
                        if k not in kind_of(config).calib_fixed}  # fmt: skip
            planned = _with_calibration(config, settings, run)
            check_applies(config, flag_stage)  # a flag of another variant is refused even at its default value
            if planned.calib is not None:
                check_applies(planned.calib, flag_calib)
            stages.append(planned)
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None
    given = {**top_calib, **flag_calib, **{k: v for t in tables for k, v in _split(t)[1].items()}}
    if given and all(s.calib is None for s in stages):
        raise ConfigError(f"{sorted(given)} do not apply: no stage reads calibration data "
                          f"({', '.join(s.config.method_name for s in stages)})")
    unused = sorted(k for k in ("eval_windows", "eval_seq_len")  # a replayed manifest lists them at their defaults
                    if k in flag_run or (k in top_run and top_run[k] != RUN_OPTIONS[k].default))
    if unused and run.eval_source is None and all(s.calib is None for s in stages):
        raise ConfigError(f"{unused} apply to --eval (and to the calibration hold-out); no stage calibrates and "
                          "no --eval is given")
    return stages, run


def _with_calibration(config: Any, settings: dict[str, Any], run: RunOptions) -> PlannedStage:
    kind = kind_of(config)
    if not kind.needs_calibration(config):
        return PlannedStage(config, None)
    calib = fill(CalibConfig, {**flatten(kind.calibration(config)), **settings},
                 holdout_windows=run.eval_windows, holdout_seq_len=run.eval_seq_len)  # fmt: skip
    return PlannedStage(config, calib)
