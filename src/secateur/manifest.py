"""What `secateur.json` records: the input and its hash, the model before any secateur run, the run
as a replayable recipe, the whole history of stages, the structure of the result; and the identity
of a training run that `--resume` checks."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur import __version__
from secateur.errors import ConfigError
from secateur.io import content_hash
from secateur.models import adapter_for
from secateur.recipe import kind_for_method, kind_of, stage_settings, structures
from secateur.schema import flag, flatten
from secateur.settings import PlannedStage, RunOptions
from secateur.sparsity.prune import sparsity_table


def header(model_path: str | Path, dtype: str, device: torch.device | str, earlier: dict[str, Any]) -> dict[str, Any]:
    source = {"path": str(Path(model_path).resolve()), "sha256": content_hash(model_path)}
    return {
        "secateur_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "origin": earlier.get("origin") or earlier.get("source") or source,  # the model before any secateur run
        "dtype": dtype,
        "device": str(device),
    }


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


def structure_of(model: nn.Module, layers: list[tuple[str, tuple[int, int], float]] | None = None) -> dict[str, Any]:
    """What the weights and the stock config alone cannot tell a loader, and a summary of the shapes:
    read from the model at save time, so it is right whatever the stages did (each kind that leaves
    shapes the stock config cannot express adds its keys through its structure hook). `layers`:
    the sparsity table, where the weights are not in `model` (a run streamed from disk counts it)."""
    blocks = adapter_for(model).block_list(model)
    layers = sparsity_table(model) if layers is None else layers
    target = sum(r * c for _, (r, c), _ in layers)
    return {
        "blocks": len(blocks),
        "hidden_size": model.config.hidden_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "target_parameters": target,
        "target_sparsity": sum(r * c * z for _, (r, c), z in layers) / max(target, 1),
        **{key: value for s in structures() for key, value in s.record(model).items()},
    }


def recipe_document(stages: list[PlannedStage], options: RunOptions) -> dict[str, Any]:
    """This run as a recipe (the TOML layout, as JSON): `secateur prune MODEL --recipe secateur.json`
    replays it. Every stage lists its calibration in full, so defaults that change cannot change it."""
    run = {k: v for k, v in flatten(options).items() if k != "device"}
    tables = [{**stage_settings(s.config), **{k: v for k, v in (flatten(s.calib) if s.calib else {}).items()
                                             if k not in kind_of(s.config).calib_fixed}} for s in stages]  # fmt: skip
    return {**run, "stage": tables}


def build_manifest(model_path: str | Path, model: nn.Module, stages: list[PlannedStage], records: list[dict[str, Any]],
                   options: RunOptions, device: torch.device | str, earlier: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """What `secateur.json` records: the input and its hash, the model before any secateur run, this
    run as a replayable recipe, the whole history of stages, and the structure of the result."""
    earlier = earlier or {}
    return {**header(model_path, options.dtype, device, earlier), "recipe": recipe_document(stages, options),
            "history": [*history_of(earlier), *records], "structure": structure_of(model),
            "timings": timings or {}}  # fmt: skip


RUN_RECORD = "run.json"  # in the checkpoints directory: the settings that define the interrupted run


NOT_DEFINING = ("eval_tasks",)  # run keys a resumed run may change (they do not change the weights)


def run_identity(model_path: str | Path, teacher: str | None, stages: list[PlannedStage],
                 options: RunOptions) -> dict[str, Any]:  # fmt: skip
    """What defines a training run's weights: the input and teacher (by hash), and the recipe."""
    recipe = {k: v for k, v in recipe_document(stages, options).items() if k not in NOT_DEFINING}
    return {"input": content_hash(model_path), "teacher": content_hash(teacher) if teacher else None, **recipe}


def record_run(work: Path, identity: dict[str, Any], resume: bool) -> None:
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
    key = _first_key(before, now, skip="stage")
    if key is not None:
        return names.get(key) or f"{flag(key)} ({before.get(key)!r} then, {now.get(key)!r} now)"
    old, new = before.get("stage", []), now.get("stage", [])
    if len(old) != len(new):
        return f"the number of stages ({len(old)} then, {len(new)} now)"
    for number, (a, b) in enumerate(zip(old, new), 1):
        key = _first_key(a, b)
        if key is not None:
            where = f"stage {number}: " if len(old) > 1 else ""
            return f"{where}{flag(key)} ({a.get(key)!r} then, {b.get(key)!r} now)"
    return None


def _first_key(a: dict[str, Any], b: dict[str, Any], skip: str | None = None) -> str | None:
    """The first key, in order of appearance, whose value differs between `a` and `b`."""
    return next((k for k in dict.fromkeys([*a, *b]) if k != skip and a.get(k) != b.get(k)), None)
