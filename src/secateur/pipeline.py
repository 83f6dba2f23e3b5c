"""The job shared by `secateur prune`, `secateur train` and the demo: claim the output, check the
inputs, load, calibrate, run the stages, evaluate, save with a manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.data import load_text
from secateur.data.calibration import calibration_data, evaluation_data
from secateur.data.mixture import MIXTURES, labels
from secateur.calibrate.processes import agree, barrier, main_process, world
from secateur.errors import ConfigError, SecateurError
from secateur.evaluate import changed_tokens, evaluation_records, evaluation_sets, split_sources
from secateur.io import (MANIFEST, check_finite, check_model, content_hash, load, load_config, load_tokenizer,
                         model_positions, read_manifest, resolve_device, save)
from secateur.manifest import applied, build_manifest, history_of, record_run, run_identity
from secateur.models import adapter_for
from secateur.calibrate.disk import has_state
from secateur.offload import on_disk, run_on_disk
from secateur.output import Output, check_apart, claim
from secateur.models.autocast import hold_for_autocast
from secateur.recipe import KINDS, autocast_teacher, check_order, kind_of, prune, stage_settings
from secateur.schema import flag, flatten
from secateur.settings import PlannedStage, RunOptions

log = logging.getLogger(__name__)


def _text_sources(stages: list[PlannedStage], options: RunOptions) -> list[tuple[str, str, str]]:
    """(source, purpose, text field) of every text the run reads."""
    sources = [(s.calib.source, "calibration", s.calib.text_field) for s in stages if s.calib is not None]
    if options.eval_source:
        sources += [(name, "evaluation", "text") for name in split_sources(options.eval_source)]
    return sources


@contextlib.contextmanager
def _claim(model_path: str | Path, out: str | Path, options: RunOptions, stages: list[PlannedStage],
           inputs: Sequence[str | Path]) -> Iterator[Output | None]:  # fmt: skip
    """The output, claimed before anything else: not an input (the model, texts, recipe, teacher),
    not existing unless overwriting, writable, locked against a second run to it. Of several
    processes (torchrun), the first claims it and the others get None, or its refusal."""
    texts = [s for s, _, _ in _text_sources(stages, options) if Path(s).exists()]
    work = [checkpoints_for(out)]  # recovery checkpoints, or the blocks a streamed run finished
    protected = [model_path, *texts, *inputs, *([options.teacher] if options.teacher else [])]
    if not main_process():
        agree(None)  # process 0's refusal, if it has one, is raised here
        yield None
        return
    try:
        output = claim(out, inputs=protected, overwrite=options.overwrite, marker=MANIFEST, also=work)
    except SecateurError as exc:
        agree(str(exc))
        raise
    agree(None)
    with output:
        yield output


def _preflight(model_path: str | Path, config: Any, options: RunOptions, stages: list[PlannedStage],
               history: list[dict[str, Any]]) -> None:  # fmt: skip
    """Everything that can be checked before the model is loaded: the device, the order of the stages
    after the input's history, every text source (exists, is readable text), and the window lengths
    against the model's positions."""
    sources = _text_sources(stages, options)
    resolve_device(options.device)
    check_order([*applied(history), *((kind_of(s.config).name, stage_settings(s.config)) for s in stages)])
    for source, purpose, text_field in dict.fromkeys(sources):
        load_text(source, purpose, text_field)
    adapter_for(config)  # unsupported architectures fail here, naming the supported ones
    check_model(model_path)  # weight files against the config, before any work
    positions = model_positions(config)
    lengths = [(flag(kind_of(s.config).length_key), s.calib.seq_len) for s in stages if s.calib is not None]
    lengths += [("--eval-seq-len", options.eval_seq_len)] if options.eval_source else []
    for flag_name, length in lengths:
        if positions and length > positions:
            raise ConfigError(f"{flag_name} {length} is longer than the model's {positions} positions; lower it")


def adapt_lengths(config: Any, stages: list[PlannedStage],
                  options: RunOptions) -> tuple[list[PlannedStage], RunOptions, list[str]]:  # fmt: skip
    """Default window lengths longer than the model's positions (`config`: its config) become its
    positions (said, and recorded as the run's settings); lengths the user gave are left for the
    preflight to refuse."""
    positions = model_positions(config)
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
            kind = kind_of(config)
            if calib.seq_len > positions and kind.length_key not in options.explicit:
                notes.append(f"{config.method_name}: {flag(kind.length_key)} {positions} (the default {calib.seq_len} "
                             f"is longer than the model's {positions} positions)")
                if kind.length_key != "calib_seq_len":  # the stage's own option, from which its windows follow
                    config = dataclasses.replace(config, **{kind.length_key: positions})
                    calib = dataclasses.replace(calib, samples=kind.calibration(config).samples)
                calib = dataclasses.replace(calib, seq_len=positions)
        adapted.append(PlannedStage(config, calib))
    return adapted, options, notes


STREAM = "stream"  # in the checkpoints directory: a streamed run's finished blocks and state


def checkpoints_for(out: str | Path) -> Path:
    """Where recovery stages of a run to `out` keep their checkpoints and metrics (removed once the
    output is saved; an interrupted run leaves them for --resume)."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoints")


def _trains(stages: list[PlannedStage]) -> bool:
    """Whether a stage of the run keeps checkpoints (next to the output, for --resume)."""
    return any(kind_of(s.config).checkpoints for s in stages)


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
        raise ConfigError("--resume goes on from a recovery stage's checkpoints or a streamed run's blocks (--offload "
                          "disk); this run has neither")
    if options.teacher is not None and not distils:
        raise ConfigError("--teacher applies to a recovery stage that distils (--kd-weight or --hidden-weight above 0)")
    if not trains:
        return None
    _check_work(checkpoints_for(out), options)
    if not distils:
        return None
    path = teacher_path(model_path, earlier, options)
    student = load_config(model_path)
    teacher = load_config(path) if path is not None else student  # None: the input as loaded
    reshaped = None  # an earlier stage of this run that changes the blocks or the hidden size
    _check_teacher_vocabulary(model_path, path)
    for stage in stages:
        kind = kind_of(stage.config)
        if getattr(stage.config, "needs_teacher", False):
            kind.check_teacher(stage.config, teacher, student, reshaped)
        reshaped = kind.name if kind.reshapes(stage_settings(stage.config)) else reshaped
    return path


def _check_teacher_vocabulary(model_path: str | Path, teacher_file: str | Path | None) -> None:
    """A teacher of another vocabulary than the student's (whose was pruned) must hold every student
    token (matched by token string), before anything loads."""
    if teacher_file is None or load_config(teacher_file).vocab_size == load_config(model_path).vocab_size:
        return
    from secateur.vocabulary.teacher import teacher_ids

    teacher_ids(load_tokenizer(model_path), load_tokenizer(teacher_file))


def apply_stages(model: nn.Module, tokenizer: Any, stages: list[PlannedStage], device: torch.device,
                 history: list[dict[str, Any]] = (), source: str | Path | None = None, *,
                 teacher: nn.Module | None = None, workdir: Path | None = None, resume: bool = False,
                 options: RunOptions = RunOptions()) -> tuple[list[dict[str, Any]], dict[str, float], Any]:  # fmt: skip
    """Cut each stage's calibration windows (once per distinct setting, before any stage runs), then run
    the stages in order with `secateur.prune`; returns the stage records for the manifest, the timings
    and the tokenizer after the stages (a vocabulary stage rewrites it). Recovery stages distil from
    `teacher` (default: a copy of the model before the first stage)."""
    clock = time.perf_counter()
    windows: dict[CalibConfig, Tensor] = {}
    data = []
    for stage in stages:
        key = dataclasses.replace(stage.calib, batch_size=0) if stage.calib else None  # the batch size does not
        if key is not None and key not in windows:  # change the windows
            windows[key] = calibration_data(model, tokenizer, stage.calib)
        data.append(windows.get(key))
    check = _check_windows(model, tokenizer, stages, options)
    cutting = time.perf_counter() - clock
    domains = [labels(s.calib.source, s.calib.samples) if s.calib and s.calib.source in MIXTURES else None
               for s in stages]  # fmt: skip
    report = prune(model, [s.config for s in stages], data, device=device, history=applied(history), teacher=teacher,
                   workdir=workdir, resume=resume, batch_size=[s.calib.batch_size if s.calib else 4 for s in stages],
                   check=check, check_ratio=options.check_ratio, tokenizer=tokenizer, domains=domains)  # fmt: skip
    for stage, windows_of_stage, record in zip(stages, data, report.stages):
        record["calibration"] = {**flatten(stage.calib), "tokens": windows_of_stage.numel()} if stage.calib else None
        record["input"] = {"path": str(Path(source).resolve())} if source is not None else None
    return report.stages, {"calibration_data": cutting, "prune": sum(r["seconds"] for r in report.stages)}, report.tokenizer


def _check_windows(model: nn.Module, tokenizer: Any, stages: list[PlannedStage], options: RunOptions) -> Tensor | None:
    """The loud check's windows: the first `check_windows` windows of the first calibration text (or the
    evaluation text; a mixture's first corpus), inside the hold-out that no stage calibrates or trains on;
    None when off."""
    calibrated = [s.calib for s in stages if s.calib is not None]
    source, field = ((calibrated[0].source, calibrated[0].text_field) if calibrated else (options.eval_source, "text"))
    source = split_sources(source)[0] if source is not None else None  # a mixture's or a list's first corpus
    if not options.check_windows or source is None:
        return None
    windows = min(options.check_windows, options.eval_windows)  # inside the hold-out of eval_windows windows
    return evaluation_data(model, tokenizer, source, options.eval_seq_len, windows, field)


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
        model_config = load_config(model_path)
        stages, options, notes = adapt_lengths(model_config, stages, options)
        for note in notes:
            log.warning("adapted to the model: %s", note)
        _preflight(model_path, model_config, options, stages, history)
        if on_disk(model_path, stages, options):
            return _run_streamed(model_path, stages, output, options, earlier, notes)
        teacher_file = _check_training(model_path, out, options, stages, earlier)
        check_apart(Path(out), [teacher_file])
        barrier()  # every process has checked the checkpoints directory before process 0 writes into it
        work = checkpoints_for(out) if _trains(stages) else None
        if work is not None and output is not None:
            record_run(work, run_identity(model_path, teacher_file, stages, options), options.resume)
        try:
            manifest = _run(model_path, stages, output, options, earlier, teacher_file, notes, Path(out))
        except BaseException:
            if work is not None and not any(work.glob("stage-*/checkpoint")):
                shutil.rmtree(work, ignore_errors=True)  # nothing to resume from
            raise
    return manifest


def _run_streamed(model_path: str | Path, stages: list[PlannedStage], output: Output, options: RunOptions,
                  earlier: dict[str, Any], notes: list[str]) -> dict[str, Any]:  # fmt: skip
    """The run streamed from disk (`offload`), resumable like recovery: its finished blocks and the
    state to go on from stay in the checkpoints directory when it is interrupted."""
    if options.teacher is not None:
        raise ConfigError("--teacher applies to a recovery stage that distils; this run prunes one stage streamed from disk")
    work = checkpoints_for(output.path)
    _check_work(work, options)
    record_run(work, run_identity(model_path, None, stages, options), options.resume)
    try:
        manifest = run_on_disk(model_path, stages, output, options, earlier, notes, work / STREAM)
    except BaseException:
        if not has_state(work / STREAM):
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from
        raise
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _check_work(work: Path, options: RunOptions) -> None:
    """An interrupted run's checkpoints are gone on from with --resume, never silently replaced."""
    if work.exists() and not options.resume:
        raise ConfigError(f"an interrupted run left checkpoints in {work}: pass --resume to go on from them, or "
                          "remove that directory")
    if options.resume and not work.is_dir():
        raise ConfigError(f"--resume: there is nothing to resume in {work}")


def _run(model_path: str | Path, stages: list[PlannedStage], output: Output | None, options: RunOptions,
         earlier: dict[str, Any], teacher_file: str | None, notes: list[str], out: Path) -> dict[str, Any]:  # fmt: skip
    """The stages in memory, then (the only process, or the first of several: `output` is None in the
    others) the evaluation and the saved output."""
    history = history_of(earlier)
    tasks = [t.strip() for t in (options.eval_tasks or "").split(",") if t.strip()]
    if tasks:
        from secateur.tasks.harness import check_tasks

        check_tasks(tasks)  # lm-eval present and every name known, before any work
    clock = time.perf_counter()
    model, tokenizer = load(model_path, dtype=options.dtype, device="cpu", allow_nonfinite=options.allow_nonfinite)
    teacher = (load(teacher_file, dtype=options.dtype, device="cpu", allow_nonfinite=options.allow_nonfinite)[0]
               if teacher_file is not None else None)  # fmt: skip
    compute = resolve_device(options.device)
    if teacher is not None and autocast_teacher([s.config for s in stages], compute):
        hold_for_autocast(teacher)  # loaded for this run alone: held as the stages run it
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        from secateur.vocabulary.teacher import KeptVocabulary  # the input's vocabulary was pruned: the teacher

        teacher = KeptVocabulary(teacher, load_tokenizer(teacher_file), tokenizer)  # reads and predicts its tokens
    timings = {"load": time.perf_counter() - clock}
    evaluation = (evaluation_sets(model, tokenizer, options.eval_source, options.eval_seq_len, options.eval_windows)
                  if options.eval_source else None)  # windows cut before pruning: a short text fails early
    work = checkpoints_for(out) if _trains(stages) else None
    records, stage_timings, pruned = apply_stages(model, tokenizer, stages, compute, history, model_path,
                                                  teacher=teacher, workdir=work, resume=options.resume,
                                                  options=options)  # fmt: skip
    if pruned is not tokenizer and evaluation is not None:  # the same text in the new vocabulary's ids
        evaluation = evaluation_sets(model, pruned, options.eval_source, options.eval_seq_len, options.eval_windows)
    original, tokenizer = tokenizer, pruned
    check_finite(model, "the pruned model", allow=options.allow_nonfinite,
                 advice="nothing was saved: a stage diverged (for recovery, lower --lr), or pass --allow-nonfinite "
                        "to save it anyway")  # fmt: skip
    # the stages' files (a recovery's curve, drawn here): process 0's, which alone writes
    extras = _stage_outputs(records, len(history), teacher_file or model_path) if output is not None else {}
    manifest = build_manifest(model_path, model, stages, records, options, compute, earlier,
                              {**timings, **stage_timings})  # fmt: skip
    if notes:
        manifest["adapted"] = notes
    processes = world()[1]
    if processes > 1:
        manifest["processes"] = processes  # the calibration windows were split over them
    if output is None:
        return manifest  # process 0 evaluates and writes
    if evaluation is not None:
        model.to(compute)
        manifest["evaluation"] = evaluation_records(model, tokenizer, evaluation, 4, compute)
        model.to("cpu")
        if original is not tokenizer:
            domains = manifest["evaluation"].get("domains") or dict.fromkeys(evaluation, manifest["evaluation"])
            for name, record in domains.items():
                record["changed_tokens"] = changed_tokens(original, tokenizer, name, options.eval_seq_len,
                                                          options.eval_windows)  # fmt: skip
    if tasks:
        from secateur.tasks.harness import run_tasks

        manifest.setdefault("evaluation", {})["tasks"] = run_tasks(model, tokenizer, tasks, device=str(compute))
        model.to("cpu")
    inputs = [model_path, *([teacher_file] if teacher_file else [])]
    save(model, tokenizer, output.path, manifest, inputs=inputs, extras=extras, output=output)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _stage_outputs(records: list[dict[str, Any]], earlier: int, teacher: str | Path) -> dict[str, Path]:
    """The files each stage leaves beside the weights (a recovery's metrics and curve), named by its
    kind from the stage's place in the whole history."""
    return {name: file for number, record in enumerate(records, earlier + 1)
            for name, file in KINDS[record["kind"]].outputs(record, number, Path(teacher)).items()}  # fmt: skip
