"""Recipes: lists of typed stages run in order on one model in memory.

A stage kind is a plugin: one `StageKind` registered by the kind's own package (`sparsity/stage.py`,
`depth/stage.py`, `width/stage.py`, `train/stage.py`), which carries everything the rest of the
program asks of a kind: its config type and methods, how flat settings (flags, recipe keys, manifest
records) build and flatten its config, how it runs, its console line and report words, and its order
properties. Every stage sees the structure the previous ones left: fewer blocks, removed branches,
per-block widths, existing zeros (a sparsity stage keeps them, so 50% can go on to 70% or to 2:4).
Orders that would undo an earlier stage are refused with the reason before anything runs.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.data.calibration import retokenize
from secateur.errors import ConfigError
from secateur.models.autocast import hold_for_autocast
from secateur.schema import Option, check_finite_options, flag

Settings = dict[str, Any]

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage may need besides the model, its config and its data."""

    device: torch.device
    batch_size: int = 4  # windows per forward call of the calibration passes
    teacher: nn.Module | None = None  # recovery: the model before the first stage, or the one given
    workdir: Path | None = None  # recovery: checkpoints and metrics of this stage
    resume: bool = False  # recovery: go on from the checkpoint in `workdir`
    progress: bool = True
    tokenizer: Any = None  # the model's tokenizer; a stage that changes the vocabulary replaces it here
    domains: list[str] | None = None  # the corpus of each calibration window, when they come from a mixture


@dataclass(frozen=True)
class Structure:
    """What a kind leaves in a model that its stock config cannot express, as the manifest's
    `structure` section holds it. `record` reads the kind's keys of that section from a model at save
    time; `needed` says, from a section, what a loader must rebuild (None: stock `from_pretrained`
    builds the model as it is); `rebuild` applies that to a model built empty from its config, before
    its weights load; `problem` checks the kind's keys in a manifest read from disk; `show` is its line
    in `info` and `prune` (None: nothing to say); `legacy` reads its keys from the manifest layout of
    earlier versions. (Per-block shapes that `from_pretrained(..., trust_remote_code=True)` can build
    are declared in the config by `models.remote`, for every kind.)"""

    record: Callable[[nn.Module], dict[str, Any]]
    needed: Callable[[dict[str, Any]], Any]
    rebuild: Callable[[nn.Module, Any], None]
    problem: Callable[[dict[str, Any]], str | None] = lambda section: None
    show: Callable[[dict[str, Any]], str | None] = lambda section: None
    legacy: Callable[[dict[str, Any]], dict[str, Any]] = lambda manifest: {}


@dataclass(frozen=True)
class Section:
    """A stage's part of the report page: a heading, a sentence, an optional table, an optional curve
    the report plots ((x label, y label, points)), and whether the model's per-layer sparsity heat map
    belongs under it."""

    title: str
    text: str = ""
    head: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    curve: tuple[str, str, tuple[tuple[float, float], ...]] | None = None
    heatmap: bool = False


@dataclass(frozen=True)
class Streaming:
    """How a stage of a kind runs from disk to disk, the model never whole in memory (`--offload disk`,
    offload.py). `why_not(config)`: why this stage cannot (None: it can); `run(input, staging, config,
    windows, dtype, device, batch size, work)` writes the output's weights, index, config and
    tokenizer files into `staging` and returns (the stage's history record, the manifest's structure
    section); with `work`, what it needs to resume after a kill is kept there."""

    why_not: Callable[[Any], str | None]
    run: Callable[[Path, Path, Any, Tensor | None, str, torch.device, int, Path | None],
                  tuple[dict[str, Any], dict[str, Any]]]


@dataclass(frozen=True)
class StageKind:
    """One kind of stage. `options(method)` are the keys a stage of that method takes besides
    `method`; `build` checks and turns them into the config, `settings` is its inverse."""

    name: str
    config_type: type
    methods: Callable[[], tuple[str, ...]]
    options: Callable[[str], dict[str, Option]]
    build: Callable[[str, Settings], Any]
    settings: Callable[[Any], Settings]  # without "method"
    run: Callable[[nn.Module, Any, Tensor | None, StageContext], dict[str, Any]]
    needs_calibration: Callable[[Any], bool]
    calibration: Callable[[Any], CalibConfig]  # the kind's default calibration size for this config
    # defaults that depend on the model and the stages before (kind, settings): the definite config
    # and, where the family's variant differs from what the method does by default, the reason
    resolve: Callable[[nn.Module, Any, Sequence[tuple[str, Settings]]], tuple[Any, str | None]] = (
        lambda model, config, earlier: (config, None))
    calib_fixed: tuple[str, ...] = ()  # calibration keys the kind sets from its own options
    # what a stage of this kind says: the console line of its history record, a few words of it for
    # the report (what it removed or trained)
    summary: Callable[[dict[str, Any]], str] = lambda record: f"{record['kind']}: {record.get('settings')}"
    describe: Callable[[dict[str, Any]], str] = lambda result: ""
    report: Callable[[dict[str, Any]], Section | None] = lambda record: None  # its section of the report page
    # order properties, from a stage's settings: the generic rules in `ORDER_RULES` read only these
    leaves_zeros: Callable[[Settings], bool] = lambda settings: False  # exact zeros in the block layers
    leaves_nm: Callable[[Settings], bool] = lambda settings: False  # N:M groups in the block layers
    removes_columns: Callable[[Settings], bool] = lambda settings: False  # input columns (breaks N:M groups)
    refits_dense: Callable[[Settings], bool] = lambda settings: False  # rewrites weights densely (fills zeros)
    reshapes: Callable[[Settings], bool] = lambda settings: False  # blocks or hidden size (no layer-wise pairing)
    structure: Structure | None = None  # shapes it leaves that the stock config cannot express
    renumbers_tokens: bool = False  # it rewrites the tokenizer (the ids of later stages' texts change)
    # the job around the stage: whether it keeps checkpoints that --resume goes on from; the key that sets
    # its window length (a config field when it is not the calibration's); a check of the teacher
    # against the student before anything loads (teacher config, student config, the name of an earlier
    # stage of the run that reshapes the model, or None); files it leaves beside the weights
    # (record, its number in the whole history, the teacher's path: {name in the output: file}, and
    # the record names them); a command of its own ((name, help): `secateur train` for recovery)
    checkpoints: bool = False
    length_key: str = "calib_seq_len"
    check_teacher: Callable[[Any, Any, Any, str | None], None] = lambda config, teacher, student, reshaped: None
    # the precision a stage runs the teacher in on a device ("bfloat16": under bfloat16 autocast only; None: it
    # does not run the teacher), so that a teacher secateur loads itself is held for autocast where all agree
    teacher_precision: Callable[[Any, torch.device], str | None] = lambda config, device: None
    outputs: Callable[[dict[str, Any], int, Path], dict[str, Path]] = lambda record, number, teacher: {}
    command: tuple[str, str] | None = None
    streaming: Streaming | None = None  # the stage from disk to disk (None: in memory only)


KINDS: dict[str, StageKind] = {}
BUILTIN = ("secateur.sparsity.stage", "secateur.depth.stage", "secateur.width.stage", "secateur.experts.stage",
           "secateur.vocabulary.stage", "secateur.train.stage")


def register(kind: StageKind) -> StageKind:
    KINDS[kind.name] = kind
    return kind


def structures() -> list[Structure]:
    """The structure hooks of every registered kind, in registration order (the order of rebuilding)."""
    return [kind.structure for kind in KINDS.values() if kind.structure is not None]


def kind_of(config: Any) -> StageKind:
    for kind in KINDS.values():
        if isinstance(config, kind.config_type):
            return kind
    raise ConfigError(f"{type(config).__name__} is not a stage; stages are {', '.join(k.config_type.__name__ for k in KINDS.values())}")


def kind_for_method(method: str) -> StageKind:
    for kind in KINDS.values():
        if method in kind.methods():
            return kind
    raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(all_methods())}")


def all_methods() -> list[str]:
    return [m for kind in KINDS.values() for m in kind.methods()]


# --- building stages from settings --------------------------------------------------------------------


def owners(key: str) -> list[str]:
    """The kinds (and methods) that take `key`, for messages."""
    found = []
    for kind in KINDS.values():
        methods = [m for m in kind.methods() if key in kind.options(m)]
        if methods:
            found.append(kind.name if len(methods) == len(kind.methods()) else f"{kind.name} ({', '.join(methods)})")
    return found


def build_stage(settings: Settings, default_method: str = "wanda") -> Any:
    """One stage config from flat settings; a key that the stage's method does not take is refused,
    naming the kinds it belongs to."""
    method = settings.get("method", default_method)
    if not isinstance(method, str):
        raise ConfigError(f"method must be a string, got {method!r}")
    kind = kind_for_method(method)
    allowed = kind.options(method)
    foreign = sorted(k for k in settings if k != "method" and k not in allowed)
    if foreign:
        where = "; ".join(f"{flag(k)} belongs to {' and '.join(owners(k)) or 'no stage'}" for k in foreign)
        what = method if method == kind.name else f"{method} ({kind.name})"
        raise ConfigError(f"{where}, not to {what}, whose options are "
                          f"{', '.join(flag(k) for k in sorted(allowed))}")
    return kind.build(method, settings)


def stage_settings(config: Any) -> Settings:
    """The flat settings that `build_stage` turns back into `config`."""
    return {"method": config.method_name, **kind_of(config).settings(config)}


# --- order ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderRule:
    later: Callable[[StageKind, Settings], bool]
    earlier: Callable[[StageKind, Settings], bool]
    reason: str


def sparsifies(kind: str, settings: Settings) -> bool:
    """Whether a stage of `kind` with `settings` leaves zeros in the block layers."""
    return KINDS[kind].leaves_zeros(settings) if kind in KINDS else False


ORDER_RULES = (
    OrderRule(lambda kind, s: kind.removes_columns(s), lambda kind, s: kind.leaves_nm(s),
              "it removes input columns, which breaks the N:M groups of an earlier stage; put it before the N:M "
              "sparsity"),
    OrderRule(lambda kind, s: kind.refits_dense(s), lambda kind, s: kind.leaves_zeros(s),
              "it re-fits weights densely (depth compensation), which would fill the zeros of an earlier stage; put "
              "it before the sparsity or drop compensate"),
)


def check_order(stages: Sequence[tuple[str, Settings]]) -> None:
    """Refuse an order in which a stage would undo an earlier one (history first, then the recipe).
    A history entry of a kind this secateur does not know constrains nothing."""
    known = [(KINDS[kind], settings) for kind, settings in stages if kind in KINDS]
    for i, (kind, settings) in enumerate(known):
        for rule in ORDER_RULES:
            if rule.later(kind, settings) and any(rule.earlier(k, s) for k, s in known[:i]):
                raise ConfigError(f"stage {i + 1} ({settings.get('method')}) cannot follow an earlier stage: {rule.reason}")


# --- running ----------------------------------------------------------------------------------------


@dataclass
class RecipeReport:
    stages: list[dict[str, Any]] = field(default_factory=list)  # one record per stage, in order
    seconds: float = 0.0
    tokenizer: Any = None  # the model's tokenizer after the stages (a vocabulary stage's rewrite)


def as_stages(recipe: Any) -> list[Any]:
    """A stage config or a sequence of them, as a list (each checked to be a stage)."""
    stages = list(recipe) if isinstance(recipe, (list, tuple)) else [recipe]
    for stage in stages:
        kind_of(stage)
    return stages


def autocast_teacher(stages: Sequence[Any], device: torch.device) -> bool:
    """Whether every stage config that runs the teacher runs it under bfloat16 autocast on `device`
    (and one does): the teacher can then be held for autocast (`models.autocast.hold_for_autocast`)."""
    wanted = {kind_of(config).teacher_precision(config, device) for config in stages} - {None}
    return wanted == {"bfloat16"}


def prune(model: nn.Module, recipe: Any, calibration: Tensor | Sequence[Tensor | None] | None = None, *,
          device: str | torch.device | None = None, batch_size: int | Sequence[int] = 4,
          history: Sequence[tuple[str, Settings]] = (), teacher: nn.Module | None = None,
          workdir: str | Path | None = None, resume: bool = False, progress: bool = True,
          check: Tensor | None = None, check_ratio: float = 3.0, tokenizer: Any = None,
          domains: Sequence[list[str] | None] | None = None) -> RecipeReport:  # fmt: skip
    """Run the stages of `recipe` (one stage config or a sequence) on `model` in place, in order.

    `calibration` is one (samples, seq_len) tensor of token ids for every stage, or one per stage
    (None for stages that need none; a recovery stage reads its training and validation windows
    here); `batch_size` likewise, the windows per forward call. `history` lists (kind, settings) of
    stages already applied to the model (a secateur output's manifest), so the order check sees
    them too. Recovery distils from `teacher`, by
    default a copy of `model` as it is given (the model before the first stage); its checkpoints go
    to `workdir`/stage-N, from which `resume` goes on. With `check` (held-out windows no stage
    reads), every stage's record gets the perplexity there against the input's, and a stage that
    leaves it above `check_ratio` times the input's is warned about (`Check`). `tokenizer` is the
    model's: a vocabulary stage needs it and leaves its rewrite in the report's `tokenizer`; the
    windows of the stages after it (and the check's) are the same texts tokenized anew. `domains`
    names, per stage, the corpus of each of its windows (a mixture; recovery validates per corpus).
    """
    stages = as_stages(recipe)
    for stage in stages:
        check_finite_options(stage)
    check_order([*history, *((kind_of(s).name, stage_settings(s)) for s in stages)])
    per_stage = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration] * len(stages)
    batches = list(batch_size) if isinstance(batch_size, (list, tuple)) else [batch_size] * len(stages)
    per_domains = list(domains) if domains is not None else [None] * len(stages)
    if len(per_stage) != len(stages) or len(batches) != len(stages):
        raise ConfigError(f"{len(per_stage)} calibration tensors and {len(batches)} batch sizes for {len(stages)} "
                          "stages")
    device = torch.device(device or "cpu")
    if teacher is None and any(getattr(s, "needs_teacher", False) for s in stages):
        teacher = copy.deepcopy(model)
        if autocast_teacher(stages, device):  # a copy of our own: held as the stages run it
            hold_for_autocast(teacher)
    report = RecipeReport()
    start = time.perf_counter()
    earlier = list(history)
    checker = Check(check, check_ratio, device, model, tokenizer) if check is not None else None
    for number, (config, batch) in enumerate(zip(stages, batches)):
        data = per_stage[number]
        kind = kind_of(config)
        clock = time.perf_counter()
        config, why = kind.resolve(model, config, earlier)
        stage_dir = Path(workdir) / f"stage-{len(earlier) + 1}" if workdir else None  # numbered in the whole history
        ctx = StageContext(device, batch, teacher, stage_dir,
                           resume and stage_dir is not None and (stage_dir / "checkpoint").is_dir(), progress,
                           tokenizer, per_domains[number])  # fmt: skip
        result = kind.run(model, config, data if kind.needs_calibration(config) else None, ctx)
        if ctx.tokenizer is not tokenizer:  # the vocabulary changed: later windows are the same texts, new ids
            per_stage[number + 1:] = [retokenize(w, tokenizer, ctx.tokenizer, model) if w is not None else None
                                      for w in per_stage[number + 1:]]  # fmt: skip
            per_domains[number + 1:] = [None] * (len(stages) - number - 1)  # windows rejoined: corpora mixed
            if checker is not None:
                checker.retokenize(tokenizer, ctx.tokenizer, model)
            if teacher is not None:  # recovery later reads the teacher in the new ids
                from secateur.vocabulary.teacher import KeptVocabulary

                teacher = KeptVocabulary(teacher, tokenizer, ctx.tokenizer)
            tokenizer = ctx.tokenizer
        if why is not None:
            result["variant"] = why
        report.stages.append({"kind": kind.name, "settings": stage_settings(config), "result": result,
                              "seconds": time.perf_counter() - clock})  # fmt: skip
        if checker is not None:
            report.stages[-1]["check"] = checker.after(model, len(earlier) + 1, config.method_name)
        earlier.append((kind.name, report.stages[-1]["settings"]))
    report.seconds = time.perf_counter() - start
    report.tokenizer = tokenizer
    return report


class Check:
    """The loud check after every stage: perplexity on held-out windows against the input's. A stage
    whose output is above `ratio` times the input's is warned about with the usual remedies, and its
    record says so; the console line is in the stage's record (`check`). The ratio is taken per byte of
    text and put back in the input's tokens (exp of the change in loss per byte times the input's bytes
    per token), so it is the ratio of perplexities when the tokenizer is unchanged and stays fair
    after a vocabulary stage; without a tokenizer (or on text of unknown tokens only, which stand for no
    bytes we can count) every token counts as one byte."""

    def __init__(self, windows: Tensor, ratio: float, device: torch.device, model: nn.Module,
                 tokenizer: Any = None) -> None:  # fmt: skip
        self.windows, self.ratio, self.device = windows, ratio, device
        self._read(tokenizer, model)
        self.input = self._measure(model)
        self.previous = self.input

    def _read(self, tokenizer: Any, model: nn.Module) -> None:
        """The bytes each id stands for, once per tokenizer (not per stage)."""
        from secateur.data.bytes import token_bytes

        rows = model.get_input_embeddings().num_embeddings
        self.sizes = token_bytes(tokenizer, rows) if tokenizer is not None else torch.ones(rows, dtype=torch.long)

    def _measure(self, model: nn.Module) -> dict[str, float]:
        from secateur.evaluate import perplexity

        home = next(model.parameters()).device
        model.to(self.device)
        try:
            result = perplexity(model, self.windows, batch_size=1, device=self.device, token_bytes=self.sizes)
        finally:
            model.to(home)
        nll, size = result["mean_nll"] * result["predicted_tokens"], result.get("bytes") or result["predicted_tokens"]
        return {"perplexity": result["perplexity"], "per_byte": nll / size, "bytes_per_token": size / result["predicted_tokens"]}

    def retokenize(self, old: Any, new: Any, model: nn.Module) -> None:
        """The same held-out texts in a new vocabulary's ids (after a vocabulary stage)."""
        self.windows = retokenize(self.windows, old, new, model)
        self._read(new, model)

    def after(self, model: nn.Module, number: int, method: str) -> dict[str, Any]:
        value = self._measure(model)
        ratio = math.exp((value["per_byte"] - self.input["per_byte"]) * self.input["bytes_per_token"])
        record = {"windows": len(self.windows), "seq_len": self.windows.shape[1], "input": self.input["perplexity"],
                  "stage_input": self.previous["perplexity"], "output": value["perplexity"], "ratio": ratio,
                  "threshold": self.ratio, "flagged": ratio > self.ratio}  # fmt: skip
        self.previous = value
        if record["flagged"]:
            log.warning("stage %d (%s) left the held-out perplexity at %.2f, %.1fx the input's %.2f (above %gx): the "
                        "output is likely broken. Remedies: remove less, try another method, or add a recovery "
                        "stage after it", number, method, value["perplexity"], ratio, self.input["perplexity"],
                        self.ratio)
        return record


def load_builtin_kinds() -> None:
    """Register the kinds secateur ships (each package registers its own; importing is idempotent)."""
    for module in BUILTIN:
        importlib.import_module(module)


load_builtin_kinds()
