"""Recipes: lists of typed stages (depth, width, sparsity) run in order on one model in memory.

Each stage kind is one registry entry: its config type, its methods, how flat settings (flags,
recipe keys, manifest records) build and flatten its config, and how it runs. Every stage sees the
structure the previous ones left: fewer blocks, removed branches, per-block widths, existing zeros
(a sparsity stage keeps them, so 50% can go on to 70% or to 2:4). Orders that would undo an earlier
stage are refused with the reason before anything runs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from secateur.config import NM, AllocationConfig, CalibConfig, PruneConfig, RefineConfig, Target, Unstructured
from secateur.depth import REGISTRY as DEPTH_REGISTRY
from secateur.depth import Amount, DepthConfig, depth_prune, removed_sublayers, resolve_compensation
from secateur.errors import ConfigError
from secateur.models import adapter_for
from secateur.schema import Option, check_finite, fill, flag, flatten, options_of
from secateur.sparsity.methods import REGISTRY as SPARSITY_REGISTRY
from secateur.sparsity.prune import needs_calibration, prune as prune_weights
from secateur.train import TrainConfig, train
from secateur.width import WidthConfig, width_prune

Settings = dict[str, Any]


@dataclass
class StageContext:
    """What a stage may need besides the model, its config and its data."""

    device: torch.device
    batch_size: int = 4  # windows per forward call of the calibration passes
    teacher: nn.Module | None = None  # recovery: the model before the first stage, or the one given
    workdir: Path | None = None  # recovery: checkpoints and metrics of this stage
    resume: bool = False  # recovery: go on from the checkpoint in `workdir`
    progress: bool = True


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


KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    KINDS[kind.name] = kind
    return kind


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


# --- sparsity ---------------------------------------------------------------------------------------

TARGET_OPTIONS = {
    "sparsity": Option("sparsity", float, "fraction of the weights to remove, in [0, 1)", 0.5),
    "pattern": Option("pattern", str, "N:M semi-structured sparsity: keep N of every M consecutive inputs, e.g. 2:4",
                      None),
}


def _sparsity_options(method: str) -> dict[str, Option]:
    nested = (SPARSITY_REGISTRY[method].config_type, PruneConfig, AllocationConfig, RefineConfig)
    return {**TARGET_OPTIONS, **{k: o for t in nested for k, o in options_of(t).items()}}


def _target(settings: Settings) -> Target:
    sparsity, pattern = (TARGET_OPTIONS[k].check(settings[k]) if settings.get(k) is not None else None
                         for k in ("sparsity", "pattern"))  # fmt: skip
    if sparsity is not None and pattern is not None:
        raise ConfigError("give either --sparsity (unstructured) or --pattern N:M, not both")
    return NM.parse(pattern) if pattern is not None else Unstructured(0.5 if sparsity is None else sparsity)


def _build_sparsity(method: str, settings: Settings) -> PruneConfig:
    spec = SPARSITY_REGISTRY[method]
    return fill(PruneConfig, settings, method=fill(spec.config_type, settings), target=_target(settings),
                allocation=fill(AllocationConfig, settings), refine=fill(RefineConfig, settings))  # fmt: skip


def _sparsity_settings(config: PruneConfig) -> Settings:
    target = {"pattern": str(config.target)} if isinstance(config.target, NM) else {"sparsity": config.target.sparsity}
    return {**target, **flatten(config.method), **flatten(config), **flatten(config.allocation), **flatten(config.refine)}


def _run_sparsity(model: nn.Module, config: PruneConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    report = prune_weights(model, None, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return report.to_dict()


register(StageKind(
    "sparsity", PruneConfig, lambda: tuple(SPARSITY_REGISTRY), _sparsity_options, _build_sparsity, _sparsity_settings,
    _run_sparsity, needs_calibration, lambda config: CalibConfig(),
))  # fmt: skip


# --- depth ------------------------------------------------------------------------------------------

AMOUNT_OPTIONS = {
    "remove_blocks": Option("remove_blocks", int, "number of decoder blocks to remove", None),
    "remove_sublayers": Option("remove_sublayers", int, "finercut: number of attention / MLP branches to remove", None),
    "remove_fraction": Option("remove_fraction", float, "fraction of the blocks to remove (finercut: of the blocks' "
                                                        "parameters)", None),
}


def _depth_options(method: str) -> dict[str, Option]:
    spec = DEPTH_REGISTRY[method]
    count = "remove_blocks" if spec.unit == "block" else "remove_sublayers"
    amount = {k: o for k, o in AMOUNT_OPTIONS.items() if k in (count, "remove_fraction")}
    options = {**amount, **options_of(spec.config_type), **options_of(DepthConfig)}
    if spec.unit != "block":  # compensation re-fits the block before a removed run of whole blocks
        options = {k: o for k, o in options.items() if not k.startswith("compensate")}
    return options


def _build_depth(method: str, settings: Settings) -> DepthConfig:
    spec = DEPTH_REGISTRY[method]
    given = {k: AMOUNT_OPTIONS[k].check(settings[k]) for k in AMOUNT_OPTIONS if settings.get(k) is not None}
    count = given.get("remove_blocks", given.get("remove_sublayers"))
    amount = Amount(count=count, fraction=given.get("remove_fraction"))
    if settings.get("compensate_damp") is not None and settings.get("compensate") is False:
        raise ConfigError("--compensate-damp sets the compensation, which --no-compensate turns off")
    return fill(DepthConfig, settings, method=fill(spec.config_type, settings), amount=amount)


def _depth_settings(config: DepthConfig) -> Settings:
    unit = DEPTH_REGISTRY[config.method_name].unit
    amount = ({"remove_fraction": config.amount.fraction} if config.amount.fraction is not None
              else {f"remove_{unit}s": config.amount.count})  # fmt: skip
    rest = flatten(config)
    if unit != "block":
        rest = {k: v for k, v in rest.items() if not k.startswith("compensate")}
    return {**amount, **flatten(config.method), **rest}


def _run_depth(model: nn.Module, config: DepthConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    blocks_before = model.config.num_hidden_layers
    parameters_before = sum(p.numel() for p in model.parameters())
    selection = depth_prune(model, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return {
        "blocks_before": blocks_before,
        "blocks_after": model.config.num_hidden_layers,
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "removed_blocks": selection.blocks,  # numbered as in this stage's input
        "removed_sublayers": [list(u) for u in removed_sublayers(model, adapter_for(model))],  # as saved
        **selection.to_dict(),
    }


def _resolve_depth(model: nn.Module, config: DepthConfig, earlier: Sequence[tuple[str, Settings]]) -> tuple[DepthConfig, str | None]:
    return resolve_compensation(model, config, after_sparsity=any(sparsifies(kind, s) for kind, s in earlier))


register(StageKind(
    "depth", DepthConfig, lambda: tuple(DEPTH_REGISTRY), _depth_options, _build_depth, _depth_settings, _run_depth,
    lambda config: True,
    lambda config: CalibConfig(samples=DEPTH_REGISTRY[config.method_name].calib_samples,
                               seq_len=DEPTH_REGISTRY[config.method_name].calib_seq_len),
    _resolve_depth,
))  # fmt: skip


# --- width ------------------------------------------------------------------------------------------


def _build_width(method: str, settings: Settings) -> WidthConfig:
    if settings.get("remove_fraction") is None:
        raise ConfigError("width pruning needs --remove-fraction: the fraction of decoder-block parameters to remove")
    return fill(WidthConfig, settings)


def _run_width(model: nn.Module, config: WidthConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    parameters_before = sum(p.numel() for p in model.parameters())
    report = width_prune(model, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return {"parameters_before": parameters_before, "parameters_after": sum(p.numel() for p in model.parameters()),
            **report.to_dict()}  # fmt: skip


register(StageKind(
    "width", WidthConfig, lambda: ("width",), lambda method: options_of(WidthConfig), _build_width,
    flatten, _run_width,
    lambda config: config.needs_calibration, lambda config: CalibConfig(),
))  # fmt: skip


# --- recovery -------------------------------------------------------------------------------------


def _recovery_calibration(config: TrainConfig) -> CalibConfig:
    """Training and validation windows, drawn together (disjoint, outside the evaluation region)."""
    return CalibConfig(samples=config.windows + config.val_windows, seq_len=config.train_seq_len)


def _run_recovery(model: nn.Module, config: TrainConfig, data: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    need = config.windows + config.val_windows
    if data is None or len(data) < need or data.shape[1] != config.train_seq_len:
        raise ConfigError(f"recovery needs {need} windows of {config.train_seq_len} tokens (training and validation)")
    parameters = sum(p.numel() for p in model.parameters())
    result = train(model, config, data[: config.windows], data[config.windows : need], teacher=ctx.teacher,
                   device=ctx.device, workdir=ctx.workdir, resume=ctx.resume, progress=ctx.progress)  # fmt: skip
    if config.prune_width is None and sum(p.numel() for p in model.parameters()) != parameters:
        raise RuntimeError("recovery changed the parameter count")  # LoRA must be merged away
    return {**result.record, "metrics": str(result.metrics) if result.metrics else None}


register(StageKind(
    "recovery", TrainConfig, lambda: ("recovery",), lambda method: options_of(TrainConfig),
    lambda method, settings: fill(TrainConfig, settings), flatten, _run_recovery,
    lambda config: True, _recovery_calibration, calib_fixed=("calib_samples", "calib_seq_len"),
))  # fmt: skip


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
    later: Callable[[str, Settings], bool]
    earlier: Callable[[str, Settings], bool]
    reason: str


def sparsifies(kind: str, settings: Settings) -> bool:
    """Whether a stage leaves zeros in the block layers: sparsity, or recovery with gradual pruning."""
    return kind == "sparsity" or (kind == "recovery" and bool(settings.get("prune_to") or settings.get("prune_pattern")))


def _nm(kind: str, settings: Settings) -> bool:
    return (kind == "sparsity" and "pattern" in settings) or (kind == "recovery" and bool(settings.get("prune_pattern")))


def _narrows(kind: str, settings: Settings) -> bool:
    """Whether a stage removes heads and MLP channels: width, or recovery with incremental width."""
    return kind == "width" or (kind == "recovery" and settings.get("prune_width") is not None)


ORDER_RULES = (
    OrderRule(_narrows, _nm,
              "width pruning removes input columns, which breaks the N:M groups of an earlier sparsity stage; "
              "put width before N:M sparsity"),
    OrderRule(lambda kind, s: kind == "depth" and bool(s.get("compensate")), sparsifies,
              "depth compensation re-fits an MLP output projection densely, which would fill the zeros of an earlier "
              "sparsity stage; put depth before sparsity or drop compensate"),
)


def check_order(stages: Sequence[tuple[str, Settings]]) -> None:
    """Refuse an order in which a stage would undo an earlier one (history first, then the recipe)."""
    for i, (kind, settings) in enumerate(stages):
        for rule in ORDER_RULES:
            if rule.later(kind, settings) and any(rule.earlier(k, s) for k, s in stages[:i]):
                raise ConfigError(f"stage {i + 1} ({settings.get('method')}) cannot follow an earlier stage: {rule.reason}")


# --- running ----------------------------------------------------------------------------------------


@dataclass
class RecipeReport:
    stages: list[dict[str, Any]] = field(default_factory=list)  # one record per stage, in order
    seconds: float = 0.0


def as_stages(recipe: Any) -> list[Any]:
    """A stage config or a sequence of them, as a list (each checked to be a stage)."""
    stages = list(recipe) if isinstance(recipe, (list, tuple)) else [recipe]
    for stage in stages:
        kind_of(stage)
    return stages


def prune(model: nn.Module, recipe: Any, calibration: Tensor | Sequence[Tensor | None] | None = None, *,
          device: str | torch.device | None = None, batch_size: int = 4,
          history: Sequence[tuple[str, Settings]] = (), teacher: nn.Module | None = None,
          workdir: str | Path | None = None, resume: bool = False, progress: bool = True) -> RecipeReport:  # fmt: skip
    """Run the stages of `recipe` (one stage config or a sequence) on `model` in place, in order.

    `calibration` is one (samples, seq_len) tensor of token ids for every stage, or one per stage
    (None for stages that need none; a recovery stage reads its training and validation windows
    here). `history` lists (kind, settings) of stages already applied to the model (a secateur
    output's manifest), so the order check sees them too. Recovery distils from `teacher`, by
    default a copy of `model` as it is given (the model before the first stage); its checkpoints go
    to `workdir`/stage-N, from which `resume` goes on.
    """
    stages = as_stages(recipe)
    for stage in stages:
        check_finite(stage)
    check_order([*history, *((kind_of(s).name, stage_settings(s)) for s in stages)])
    per_stage = list(calibration) if isinstance(calibration, (list, tuple)) else [calibration] * len(stages)
    if len(per_stage) != len(stages):
        raise ConfigError(f"{len(per_stage)} calibration tensors for {len(stages)} stages")
    device = torch.device(device or "cpu")
    if teacher is None and any(getattr(s, "needs_teacher", False) for s in stages):
        teacher = copy.deepcopy(model)
    report = RecipeReport()
    start = time.perf_counter()
    earlier = list(history)
    for config, data in zip(stages, per_stage):
        kind = kind_of(config)
        clock = time.perf_counter()
        config, why = kind.resolve(model, config, earlier)
        stage_dir = Path(workdir) / f"stage-{len(earlier) + 1}" if workdir else None  # numbered in the whole history
        ctx = StageContext(device, batch_size, teacher, stage_dir,
                           resume and stage_dir is not None and (stage_dir / "checkpoint").is_dir(), progress)  # fmt: skip
        result = kind.run(model, config, data if kind.needs_calibration(config) else None, ctx)
        if why is not None:
            result["variant"] = why
        report.stages.append({"kind": kind.name, "settings": stage_settings(config), "result": result,
                              "seconds": time.perf_counter() - clock})  # fmt: skip
        earlier.append((kind.name, report.stages[-1]["settings"]))
    report.seconds = time.perf_counter() - start
    return report
