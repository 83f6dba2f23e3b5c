"""End-to-end jobs shared by the CLI and the demo: load -> calibrate -> prune -> evaluate -> save."""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

import torch
from torch import Tensor, nn

from secateur import __version__
from secateur.config import CalibConfig
from secateur.data import calibration_windows, evaluation_windows, load_text, needs_holdout, tokenize, uses_bos
from secateur.depth import removed_sublayers
from secateur.errors import ConfigError
from secateur.evaluate import perplexity
from secateur.io import MANIFEST, check_finite, check_model, content_hash, load, load_config, read_manifest, resolve_device, save
from secateur.output import Output, check_apart, claim
from secateur.models import adapter_for, read_weight
from secateur.recipe import KINDS, build_stage, check_order, kind_for_method, kind_of, prune, stage_settings
from secateur.schema import Option, check_applies, fill, flag, flatten, option, options_of
from secateur.sparsity.prune import target_layers
from secateur.train.loop import check_layerwise
from secateur.width.structure import head_dim, layer_width


log = logging.getLogger(__name__)


def _bos(model: nn.Module, tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if uses_bos(tokenizer, adapter_for(model).needs_bos) else None


def calibration_data(model: nn.Module, tokenizer: Any, calib: CalibConfig) -> Tensor:
    """Seeded calibration windows; when the text is the evaluation text, its eval region is skipped."""
    text = load_text(calib.source, "calibration", calib.text_field)
    tokens = tokenize(tokenizer, text)
    bos = _bos(model, tokenizer)
    skip = 0
    if needs_holdout(calib.source):
        skip = calib.holdout_windows * (calib.holdout_seq_len - (bos is not None))
    return calibration_windows(tokens, calib.seq_len, calib.samples, calib.seed, skip=skip, bos=bos)


def evaluation_data(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, field: str = "text") -> Tensor:
    tokens = tokenize(tokenizer, load_text(source, "evaluation", field))
    return evaluation_windows(tokens, seq_len, windows, bos=_bos(model, tokenizer))


def evaluate_model(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, *,
                   field: str = "text", batch_size: int = 4, device: torch.device | str = "cpu") -> dict[str, Any]:
    data = evaluation_data(model, tokenizer, source, seq_len, windows, field)
    return _evaluation(model, tokenizer, source, data, batch_size, device)


def _evaluation(model: nn.Module, tokenizer: Any, source: str, data: Tensor, batch_size: int,
                device: torch.device | str) -> dict[str, Any]:  # fmt: skip
    """Perplexity on windows already cut from `source`, as the manifest records it."""
    result = perplexity(model, data, batch_size=batch_size, device=device)
    return {"source": source, "bos": _bos(model, tokenizer) is not None, **result}


def sparsity_table(model: nn.Module) -> list[tuple[str, tuple[int, int], float]]:
    """(name, shape, fraction of zeros) of every prunable layer, as found in the weights."""
    rows = []
    for name, module in target_layers(model, adapter_for(model)):
        weight = read_weight(module)
        rows.append((name, tuple(weight.shape), float((weight == 0).float().mean())))
    return rows


def _header(model_path: str | Path, dtype: str, device: torch.device | str, earlier: dict[str, Any]) -> dict[str, Any]:
    source = {"path": str(Path(model_path).resolve()), "sha256": content_hash(model_path)}
    return {
        "secateur_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "origin": earlier.get("origin") or earlier.get("source") or source,  # the model before any secateur run
        "dtype": dtype,
        "device": str(device),
    }


@dataclass(frozen=True)
class RunOptions:
    """How a job loads, evaluates and saves, whatever its stages."""

    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "load and work precision")
    device: str = option("auto", "auto (cuda when present), cpu or cuda[:N]")
    eval_source: str | None = option(None, "evaluate perplexity on this source after pruning; recorded in the "
                                           "manifest", key="eval")
    eval_windows: int = option(64, "evaluation windows; also the calibration hold-out")
    eval_seq_len: int = option(512, "tokens per evaluation window; also the calibration hold-out")
    eval_tasks: str | None = option(None, "lm-eval tasks to run after pruning, comma-separated (secateur_wordnet: "
                                          "the offline knowledge probe); results in the manifest's evaluation")
    teacher: str | None = option(None, "recovery: the model to distil from (default: the model before any secateur "
                                       "run, as the input's manifest names it, or the input itself)")
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


# --- manifests: history and structure -----------------------------------------------------------------


def history_of(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every stage a secateur output went through, oldest first (outputs of earlier versions, whose
    manifest held one run's recipe and result, give one entry)."""
    if not manifest:
        return []
    if "history" in manifest:
        return list(manifest["history"])
    recipe = manifest.get("recipe") or {}
    if "method" not in recipe:
        return []
    kind = kind_for_method(recipe["method"]).name
    result = manifest.get(kind) or {**(manifest.get("result") or {}), "layers": manifest.get("layers", [])}
    return [{"kind": kind, "settings": recipe, "result": result, "input": manifest.get("source")}]


def applied(history: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, settings) of each stage in a history, as the order check reads them."""
    return [(h["kind"], h.get("settings", {})) for h in history]


def structure_of(model: nn.Module) -> dict[str, Any]:
    """What the weights and the stock config alone cannot tell a loader, and a summary of the shapes:
    read from the model at save time, so it is right whatever the stages did."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    widths = [layer_width(b, adapter.width, head_dim(model.config)).to_dict() for b in blocks] if adapter.width else []
    uniform = all(len({w[k] for w in widths if w[k] is not None}) <= 1 for k in ("attention_heads", "channels"))
    layers = sparsity_table(model)
    target = sum(r * c for _, (r, c), _ in layers)
    return {
        "blocks": len(blocks),
        "hidden_size": model.config.hidden_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_parameters": target,
        "target_sparsity": sum(r * c * z for _, (r, c), z in layers) / max(target, 1),
        "removed_sublayers": [list(u) for u in removed_sublayers(model, adapter)],
        "uniform_widths": uniform,  # False: `secateur.load` shapes each block to `widths`
        "widths": widths,
    }


def recipe_document(stages: list[PlannedStage], options: RunOptions) -> dict[str, Any]:
    """This run as a recipe (the TOML layout, as JSON): `secateur prune MODEL --recipe secateur.json`
    replays it. Every stage lists its calibration in full, so defaults that change cannot change it."""
    run = {k: v for k, v in flatten(options).items() if k != "device"}
    tables = [{**stage_settings(s.config), **{k: v for k, v in (flatten(s.calib) if s.calib else {}).items()
                                             if k not in kind_of(s.config).calib_fixed}} for s in stages]  # fmt: skip
    return {**run, "stage": tables}


# --- the job ------------------------------------------------------------------------------------------


def _text_sources(stages: list[PlannedStage], options: RunOptions) -> list[tuple[str, str, str]]:
    """(source, purpose, text field) of every text the run reads."""
    sources = [(s.calib.source, "calibration", s.calib.text_field) for s in stages if s.calib is not None]
    if options.eval_source:
        sources.append((options.eval_source, "evaluation", "text"))
    return sources


def _claim(model_path: str | Path, out: str | Path, options: RunOptions, stages: list[PlannedStage],
           inputs: Sequence[str | Path]) -> Output:  # fmt: skip
    """The output, claimed before anything else: not an input (the model, texts, recipe, teacher),
    not existing unless overwriting, writable, locked against a second run to it."""
    texts = [s for s, _, _ in _text_sources(stages, options) if Path(s).exists()]
    work = [checkpoints_for(out)] if _trains(stages) else []
    protected = [model_path, *texts, *inputs, *([options.teacher] if options.teacher else [])]
    return claim(out, inputs=protected, overwrite=options.overwrite, marker=MANIFEST, also=work)


def _preflight(model_path: str | Path, options: RunOptions, stages: list[PlannedStage],
               history: list[dict[str, Any]]) -> None:  # fmt: skip
    """Everything that can be checked before the model is loaded: the device, the order of the stages
    after the input's history, every text source (exists, is readable text), and the window lengths
    against the model's positions."""
    sources = _text_sources(stages, options)
    resolve_device(options.device)
    check_order([*applied(history), *((kind_of(s.config).name, stage_settings(s.config)) for s in stages)])
    for source, purpose, text_field in dict.fromkeys(sources):
        load_text(source, purpose, text_field)
    config = load_config(model_path)
    adapter_for(config)  # unsupported architectures fail here, naming the supported ones
    check_model(model_path)  # weight files against the config, before any work
    positions = model_positions(config)
    lengths = [(flag(_length_key(s.config)), s.calib.seq_len) for s in stages if s.calib is not None]
    lengths += [("--eval-seq-len", options.eval_seq_len)] if options.eval_source else []
    for flag_name, length in lengths:
        if positions and length > positions:
            raise ConfigError(f"{flag_name} {length} is longer than the model's {positions} positions; lower it")


def _length_key(config: Any) -> str:
    """The key that sets a stage's window length: its own (recovery's --train-seq-len) or calibration's."""
    return "train_seq_len" if "calib_seq_len" in kind_of(config).calib_fixed else "calib_seq_len"


def model_positions(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def adapt_lengths(model_path: str | Path, stages: list[PlannedStage],
                  options: RunOptions) -> tuple[list[PlannedStage], RunOptions, list[str]]:  # fmt: skip
    """Default window lengths longer than the model's positions become its positions (said, and
    recorded as the run's settings); lengths the user gave are left for the preflight to refuse."""
    positions = model_positions(load_config(model_path))
    notes: list[str] = []
    if not positions:
        return stages, options, notes
    reads_it = options.eval_source or any(s.calib is not None for s in stages)  # evaluation or the hold-out
    if reads_it and options.eval_seq_len > positions and "eval_seq_len" not in options.explicit:
        notes.append(f"--eval-seq-len {positions} (the default {options.eval_seq_len} is longer than the model's "
                     f"{positions} positions)")
        options = dataclasses.replace(options, eval_seq_len=positions)
    adapted = []
    for stage in stages:
        calib, config = stage.calib, stage.config
        if calib is not None:
            calib = dataclasses.replace(calib, holdout_seq_len=options.eval_seq_len)
            key = _length_key(config)
            if calib.seq_len > positions and key not in options.explicit:
                notes.append(f"{config.method_name}: {flag(key)} {positions} (the default {calib.seq_len} is longer "
                             f"than the model's {positions} positions)")
                if key == "train_seq_len":
                    config = dataclasses.replace(config, train_seq_len=positions)
                    calib = dataclasses.replace(calib, samples=kind_of(config).calibration(config).samples)
                calib = dataclasses.replace(calib, seq_len=positions)
        adapted.append(PlannedStage(config, calib))
    return adapted, options, notes


def checkpoints_for(out: str | Path) -> Path:
    """Where recovery stages of a run to `out` keep their checkpoints and metrics (removed once the
    output is saved; an interrupted run leaves them for --resume)."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def _trains(stages: list[PlannedStage]) -> bool:
    return any(kind_of(s.config).name == "recovery" for s in stages)


def teacher_path(model_path: str | Path, earlier: dict[str, Any], options: RunOptions) -> str | None:
    """The teacher's path: --teacher, else the model before any secateur run when the input is a
    secateur output (it must still be there, unchanged), else None: the input itself, as loaded."""
    if options.teacher is not None:
        return options.teacher
    origin = earlier.get("origin")
    if not earlier or not origin:
        return None
    path = origin.get("path")
    if not path or not Path(path).exists():
        raise ConfigError(f"recovery distils from the model before any secateur run, {path}, which is gone: "
                          "pass --teacher PATH (or --kd-weight 0 to train without one)")
    if origin.get("sha256") and content_hash(path) != origin["sha256"]:
        raise ConfigError(f"the teacher {path} changed since {model_path} was made from it (its hash differs): pass "
                          f"--teacher {path} to distil from it anyway")
    return str(path)


def _check_training(model_path: str | Path, out: str | Path, options: RunOptions, stages: list[PlannedStage],
                    earlier: dict[str, Any]) -> str | None:  # fmt: skip
    """Check what recovery stages need before anything loads; returns the teacher's path (None: the
    input as loaded, or no teacher)."""
    trains = _trains(stages)
    distils = any(getattr(s.config, "needs_teacher", False) for s in stages)
    if options.resume and not trains:
        raise ConfigError("--resume goes on from a recovery stage's checkpoints; this run has no recovery stage")
    if options.teacher is not None and not distils:
        raise ConfigError("--teacher applies to a recovery stage that distils (--kd-weight or --hidden-weight above 0)")
    if not trains:
        return None
    work = checkpoints_for(out)
    if work.exists() and not options.resume:
        raise ConfigError(f"an interrupted run left checkpoints in {work}: pass --resume to go on from them, or "
                          "remove that directory")
    if options.resume and not work.is_dir():
        raise ConfigError(f"--resume: there is nothing to resume in {work}")
    if not distils:
        return None
    path = teacher_path(model_path, earlier, options)
    student = load_config(model_path)
    teacher = load_config(path) if path is not None else student  # None: the input as loaded
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"the teacher {path} has {teacher.vocab_size} tokens in its vocabulary and the "
                          f"student {student.vocab_size}: distillation needs the same vocabulary")
    _check_layerwise(teacher, student, stages)
    return path


def _check_layerwise(teacher: Any, student: Any, stages: list[PlannedStage]) -> None:
    """Layer-wise distillation (--hidden-weight) needs the teacher's blocks and hidden size in the
    student it trains: the input's, and no depth or hidden-dimension stage before it in this run."""
    reshaped = None
    for stage in stages:
        if getattr(stage.config, "hidden_weight", 0) > 0:
            if reshaped is not None:
                raise ConfigError(f"--hidden-weight pairs the student's blocks with the teacher's, and the {reshaped} "
                                  "stage before it can change them: distil from the logits only (--hidden-weight 0)")
            check_layerwise(teacher, student)
        if kind_of(stage.config).reshapes(stage_settings(stage.config)):
            reshaped = kind_of(stage.config).name


def apply_stages(model: nn.Module, tokenizer: Any, stages: list[PlannedStage], device: torch.device,
                 history: list[dict[str, Any]] = (), source: str | Path | None = None, *,
                 teacher: nn.Module | None = None, workdir: Path | None = None,
                 resume: bool = False) -> tuple[list[dict[str, Any]], dict[str, float]]:  # fmt: skip
    """Run planned stages in order on a loaded model, each on its own calibration windows (cut once per
    distinct calibration setting); returns the stage records for the manifest and the timings.
    Recovery stages distil from `teacher` (default: a copy of the model before the first stage)."""
    if teacher is None and any(getattr(s.config, "needs_teacher", False) for s in stages):
        teacher = copy.deepcopy(model)
    done = applied(history)
    windows: dict[CalibConfig, Tensor] = {}
    timings = {"calibration_data": 0.0, "prune": 0.0}
    records = []
    for stage in stages:
        data = None
        if stage.calib is not None:
            key = dataclasses.replace(stage.calib, batch_size=0)  # the batch size does not change the windows
            if key not in windows:
                clock = time.perf_counter()
                windows[key] = calibration_data(model, tokenizer, stage.calib)
                timings["calibration_data"] += time.perf_counter() - clock
            data = windows[key]
        report = prune(model, [stage.config], data, device=device, history=done, teacher=teacher, workdir=workdir,
                       resume=resume, batch_size=stage.calib.batch_size if stage.calib else 4)  # fmt: skip
        [record] = report.stages
        record["calibration"] = {**flatten(stage.calib), "tokens": data.numel()} if stage.calib else None
        record["input"] = {"path": str(Path(source).resolve())} if source is not None else None
        records.append(record)
        done.append((record["kind"], record["settings"]))
        timings["prune"] += record["seconds"]
    return records, timings


def build_manifest(model_path: str | Path, model: nn.Module, stages: list[PlannedStage], records: list[dict[str, Any]],
                   options: RunOptions, device: torch.device | str, earlier: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """What `secateur.json` records: the input and its hash, the model before any secateur run, this
    run as a replayable recipe, the whole history of stages, and the structure of the result."""
    earlier = earlier or {}
    return {**_header(model_path, options.dtype, device, earlier), "recipe": recipe_document(stages, options),
            "history": [*history_of(earlier), *records], "structure": structure_of(model),
            "timings": timings or {}}  # fmt: skip


def run_recipe(model_path: str | Path, stages: list[PlannedStage], out: str | Path,
               options: RunOptions = RunOptions(), inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Load any model or secateur output (its structure restored), run the stages in order, evaluate if
    asked, save atomically with a manifest of the whole history; returns the manifest.
    Nothing is loaded before the output is claimed (`inputs`: further files it must stay apart from,
    such as the recipe) and the text sources and the stage order are checked."""
    if not stages:
        raise ConfigError("the recipe has no stages")
    earlier = (read_manifest(model_path) if Path(model_path).is_dir() else None) or {}
    history = history_of(earlier)
    with _claim(model_path, out, options, stages, inputs) as output:
        stages, options, notes = adapt_lengths(model_path, stages, options)
        for note in notes:
            log.warning("adapted to the model: %s", note)
        _preflight(model_path, options, stages, history)
        teacher_file = _check_training(model_path, out, options, stages, earlier)
        check_apart(output.path, [teacher_file])
        work = checkpoints_for(out) if _trains(stages) else None
        if work is not None:
            _record_run(work, run_identity(model_path, teacher_file, stages, options), options.resume)
        try:
            manifest = _run(model_path, stages, output, options, earlier, teacher_file, notes)
        except BaseException:
            if work is not None and not any(work.glob("stage-*/checkpoint")):
                shutil.rmtree(work, ignore_errors=True)  # nothing to resume from
            raise
    return manifest


RUN_RECORD = "run.json"  # in the checkpoints directory: the settings that define the interrupted run
NOT_DEFINING = ("eval_tasks",)  # run keys a resumed run may change (they do not change the weights)


def run_identity(model_path: str | Path, teacher: str | None, stages: list[PlannedStage],
                 options: RunOptions) -> dict[str, Any]:  # fmt: skip
    """What defines a training run's weights: the input and teacher (by hash), and the recipe."""
    recipe = {k: v for k, v in recipe_document(stages, options).items() if k not in NOT_DEFINING}
    return {"input": content_hash(model_path), "teacher": content_hash(teacher) if teacher else None, **recipe}


def _record_run(work: Path, identity: dict[str, Any], resume: bool) -> None:
    """Write the run's identity next to its checkpoints; with --resume, refuse a run that differs
    from the interrupted one, naming the first difference."""
    record = work / RUN_RECORD
    if not resume:
        work.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(identity, indent=2, default=str))
        return
    try:
        before = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"--resume: {work} holds no readable record of the interrupted run's settings, so it cannot "
                          "be checked; remove that directory and start over") from None
    difference = first_difference(before, json.loads(json.dumps(identity, default=str)))
    if difference is not None:
        raise ConfigError(f"--resume: {difference} differs from the interrupted run; resume with its settings, or "
                          f"remove {work} to start over")


def first_difference(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first setting that differs between two run identities, as the user would name it."""
    names = {"input": "the input model (its content)", "teacher": "the teacher (its content)"}
    for key in dict.fromkeys([*before, *now]):
        if key == "stage":
            continue
        if before.get(key) != now.get(key):
            return names.get(key) or f"{flag(key)} ({before.get(key)!r} then, {now.get(key)!r} now)"
    old, new = before.get("stage", []), now.get("stage", [])
    if len(old) != len(new):
        return f"the number of stages ({len(old)} then, {len(new)} now)"
    for number, (a, b) in enumerate(zip(old, new), 1):
        for key in dict.fromkeys([*a, *b]):
            if a.get(key) != b.get(key):
                where = f"stage {number}: " if len(old) > 1 else ""
                return f"{where}{flag(key)} ({a.get(key)!r} then, {b.get(key)!r} now)"
    return None


def _run(model_path: str | Path, stages: list[PlannedStage], output: Output, options: RunOptions,
         earlier: dict[str, Any], teacher_file: str | None, notes: list[str]) -> dict[str, Any]:  # fmt: skip
    history = history_of(earlier)
    tasks = [t.strip() for t in (options.eval_tasks or "").split(",") if t.strip()]
    if tasks:
        from secateur.tasks.harness import check_tasks

        check_tasks(tasks)  # lm-eval present and every name known, before any work
    clock = time.perf_counter()
    model, tokenizer = load(model_path, dtype=options.dtype, device="cpu", allow_nonfinite=options.allow_nonfinite)
    teacher = (load(teacher_file, dtype=options.dtype, device="cpu", allow_nonfinite=options.allow_nonfinite)[0]
               if teacher_file is not None else None)  # fmt: skip
    timings = {"load": time.perf_counter() - clock}
    compute = resolve_device(options.device)
    evaluation = (evaluation_data(model, tokenizer, options.eval_source, options.eval_seq_len, options.eval_windows)
                  if options.eval_source else None)  # windows cut before pruning: a short text fails early
    work = checkpoints_for(output.path) if _trains(stages) else None
    records, stage_timings = apply_stages(model, tokenizer, stages, compute, history, model_path, teacher=teacher,
                                          workdir=work, resume=options.resume)  # fmt: skip
    check_finite(model, "the pruned model", allow=options.allow_nonfinite,
                 advice="nothing was saved: a stage diverged (for recovery, lower --lr), or pass --allow-nonfinite "
                        "to save it anyway")  # fmt: skip
    extras = _training_outputs(records, len(history), teacher_file or model_path)
    manifest = build_manifest(model_path, model, stages, records, options, compute, earlier,
                              {**timings, **stage_timings})  # fmt: skip
    if notes:
        manifest["adapted"] = notes
    if evaluation is not None:
        model.to(compute)
        manifest["evaluation"] = _evaluation(model, tokenizer, options.eval_source, evaluation, 4, compute)
        model.to("cpu")
    if tasks:
        from secateur.tasks.harness import run_tasks

        manifest.setdefault("evaluation", {})["tasks"] = run_tasks(model, tokenizer, tasks, device=str(compute))
        model.to("cpu")
    inputs = [model_path, *([teacher_file] if teacher_file else [])]
    save(model, tokenizer, output.path, manifest, inputs=inputs, extras=extras, output=output)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _training_outputs(records: list[dict[str, Any]], earlier: int, teacher: str | Path) -> dict[str, Path]:
    """Each recovery record's metrics file and curve, as files for the output (named by the stage's
    place in the whole history), and the teacher it distilled from."""
    from secateur.train.plot import plot_metrics

    extras = {}
    for number, record in enumerate(records, earlier + 1):
        if record["kind"] != "recovery":
            continue
        result = record["result"]
        if record["settings"].get("kd_weight", 1.0) > 0:
            result["teacher"] = {"path": str(Path(teacher).resolve()), "sha256": content_hash(teacher)}
        metrics = result.get("metrics")
        if metrics and Path(metrics).exists():
            curve = Path(metrics).with_suffix(".png")
            plot_metrics(metrics, curve, f"recovery ({record['settings'].get('mode', 'full')})")
            result["metrics"], result["curve"] = f"train-metrics-{number}.jsonl", f"train-curve-{number}.png"
            extras[result["metrics"]], extras[result["curve"]] = Path(metrics), curve
    return extras


# --- recipes from flags, TOML files and manifests -------------------------------------------------------

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
