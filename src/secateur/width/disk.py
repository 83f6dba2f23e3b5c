"""A width stage from disk to disk, for models larger than memory (`secateur prune --method width
--offload disk`).

The model stays on disk (`calibrate.disk.DiskBlocks`). One read-only pass gathers the input moments
and scores each block's heads and channels while the block is resident (`width.prune.scored_units`);
the allocation needs only those scores. A second pass cuts each block (bias compensation, or the
least-squares refit on the activations of the model as pruned so far with `--reconstruct`) and
writes it as soon as it is done; what lies outside the blocks is copied unchanged (cut, with a
hidden cut), the config describes the new widths (stock where they are uniform,
`modeling_secateur.py` otherwise), the manifest comes last. The same weights, bit for bit, as the
stage run in memory and saved.

With a work directory, the scores and the allocation are saved there after the first pass, and the
second pass keeps each written block and (with the refit) the activations every SAVE_EVERY
seconds: a run killed at any point goes on from there (`--resume`).

With `--hidden-fraction`, the first pass also sums each block's share of the hidden channels' scores;
the hidden cut is decided after it and applied to every tensor as it is read from the input from
then on (`width.hidden.HiddenCut`): the embeddings that feed the refit, each block before its own
cuts, and the embedding, final norm and untied head written at the end.

Not streamed: gradient importance (Taylor: a backward pass through the whole model).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, write_side_files
from secateur.errors import ConfigError
from secateur.io import resolve_dtype
from secateur.manifest import structure_of
from secateur.sparsity.prune import streamed_table
from secateur.width.config import WidthConfig
from secateur.width.hidden import keep_hidden
from secateur.width.prune import (Refit, WidthReport, _apply, allocate, check_calibration, finish_report, hidden_keep,
                                  means_of, new_report, recost, resolve_variant, scored_units, width_of)  # fmt: skip
from secateur.width.scores import IMPORTANCE
from secateur.width.units import Units
from secateur.output import save_whole

STATE = "width.pt"  # in the work directory: the units' scores, the allocation and the compensation means


def streamable(config: WidthConfig) -> str | None:
    """Why a width stage cannot be streamed block by block (None: it can)."""
    if IMPORTANCE[config.importance].gradients:
        return f"{config.importance} importance takes gradients through the whole model"
    return None


def _plan(store: DiskBlocks, config: WidthConfig, report: WidthReport, calibration: Tensor | None,
          device: torch.device, batch_size: int) -> dict[str, Any]:  # fmt: skip
    """The read-only pass and the allocation: what the cuts need, as a state that saves and loads. With
    --hidden-fraction the model (on the meta device) takes the hidden cut here, before the allocation
    re-costs its units."""
    model, adapter = store.model, store.adapter
    statistics, units, scores = scored_units(model, config, calibration, device, batch_size)
    target, keep = config.fraction * report.block_parameters_before, None
    if scores is not None:
        keep, removed = hidden_keep(model, adapter, config, scores, units, target)
        _cut_hidden(store, keep)
        recost(model, adapter, adapter.width, config, units)
        target -= removed
    removals = allocate(config, units, target, report.before)
    width, blocks = adapter.width, adapter.blocks
    consumers = {f"{blocks}.{u.block}.{width.mlp.consumer if u.kind == 'mlp' else width.attention.o}" for u in units}
    return {"units": [asdict(u) for u in units], "removals": [[b, kind, n] for (b, kind), n in removals.items()],
            "means": {name: mean for name, mean in means_of(statistics).items() if name in consumers},
            "hidden": keep}  # fmt: skip


def _cut_hidden(store: DiskBlocks, keep: Tensor) -> None:
    """The model takes the hidden cut in shape (its blocks on the meta device), and every tensor read
    from the input from now on is cut as it arrives (`HiddenCut`); the embeddings read before are
    dropped, to be read again cut."""
    store.reshape = keep_hidden(store.model, store.adapter, keep)
    store.captured()


def stream_width(store: DiskBlocks, staging: Path, config: WidthConfig, calibration: Tensor | None,
                 device: torch.device, batch_size: int, work: Path | None = None) -> WidthReport:  # fmt: skip
    """Prune the widths of the model in `store` (opened read only) into the directory `staging`:
    every block cut and written (`finish` still to come); returns the report. The store's model is
    left on the meta device with the new shapes and config, its `table` lists the matrices written;
    with a hidden cut, the store's `reshape` cuts what `finish` writes outside the blocks."""
    why = streamable(config)
    if why is not None:
        raise ConfigError(f"{why}: it cannot be streamed from disk; use activation or fluctuation importance, "
                          f"or load it in memory")
    model, adapter = store.model, store.adapter
    config, variant = resolve_variant(model, adapter, config)
    width = width_of(model, adapter, config)
    check_calibration(config, calibration)
    start = time.perf_counter()
    report = new_report(model, adapter, config, variant)
    saved = work / STATE if work is not None else None
    if saved is not None and saved.is_file():
        state = torch.load(saved, weights_only=True)
        if state.get("hidden") is not None:  # (a state saved before hidden cuts streamed has no entry)
            _cut_hidden(store, state["hidden"])
    else:
        store.trim = False  # the first pass only runs the blocks: the same activations every block
        state = _plan(store, config, report, calibration, device, batch_size)
        if saved is not None:
            work.mkdir(parents=True, exist_ok=True)
            save_whole(state, saved)
    report.hidden_after = model.config.hidden_size
    units = [Units(**u) for u in state["units"]]
    removals = {(b, kind): n for b, kind, n in state["removals"]}
    store.staging, store.work, store.trim = staging, work, True  # the blocks are cut and written now
    refit = Refit(calibration, config.damp, batch_size, device) if config.reconstruct else None
    report.reconstruction = _apply(model, adapter, width, units, removals, state["means"], config.compensate,
                                   refit=refit, device=device)  # fmt: skip
    return finish_report(model, adapter, report, start)


def streamed(path: Path, staging: Path, config: WidthConfig, calibration: Tensor | None, dtype: str,
             device: torch.device, batch_size: int, work: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The kind's `Streaming.run`: the stage, the output's config, module and tokenizer files;
    (history record, manifest structure section)."""
    from secateur.recipe import stage_settings

    clock = time.perf_counter()
    store = DiskBlocks.open(path, resolve_dtype(dtype))
    try:
        model, adapter = store.model, store.adapter
        outside = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(f"{adapter.blocks}."))
        report = stream_width(store, staging, config, calibration, device, batch_size, work)
        written = time.perf_counter()
        cut = store.reshape
        store.finish(store.reshaped_outside(cut.outside(adapter.blocks)) if cut is not None else None)
    finally:
        store.close()
    write_side_files(path, staging, model, resolve_dtype(dtype))  # per-block widths: the module that builds them
    written = time.perf_counter() - written
    result = {"parameters_before": report.block_parameters_before + outside,
              "parameters_after": sum(p.numel() for p in model.parameters()), **report.to_dict()}  # fmt: skip
    layers = streamed_table(model, store.table)
    record = {"kind": "width", "settings": stage_settings(config), "result": result,
              "seconds": time.perf_counter() - clock - written, "write_seconds": written, "offload": "disk"}  # fmt: skip
    return record, structure_of(model, layers)
