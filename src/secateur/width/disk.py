"""A width stage from disk to disk, for models larger than memory (`secateur prune --method width
--offload disk`).

The model stays on disk (`calibrate.disk.DiskBlocks`). One read-only pass gathers the input moments
and scores each block's heads and channels while the block is resident (`width.prune.scored_units`);
the allocation needs only those scores. A second pass cuts each block (bias compensation, or the
least-squares refit on the activations of the model as pruned so far with `--reconstruct`) and
writes it as soon as it is done; what lies outside the blocks is copied unchanged, the config
describes the new widths (stock where they are uniform, `modeling_secateur.py` otherwise), the
manifest comes last. The same weights, bit for bit, as the stage run in memory and saved.

With a work directory, the scores and the allocation are saved there after the first pass, and the
second pass keeps each written block and (with the refit) the activations every SAVE_EVERY
seconds: a run killed at any point goes on from there (`--resume`).

Not streamed: gradient importance (Taylor: a backward pass through the whole model) and
`--hidden-fraction` (it cuts the embeddings and every block's residual width from scores over all
blocks).
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
from secateur.width.prune import (Refit, WidthReport, _apply, allocate, check_calibration, finish_report, means_of,
                                  new_report, resolve_variant, scored_units, width_of)  # fmt: skip
from secateur.width.scores import IMPORTANCE
from secateur.width.units import Units
from secateur.output import save_whole

STATE = "width.pt"  # in the work directory: the units' scores, the allocation and the compensation means


def streamable(config: WidthConfig) -> str | None:
    """Why a width stage cannot be streamed block by block (None: it can)."""
    if IMPORTANCE[config.importance].gradients:
        return f"{config.importance} importance takes gradients through the whole model"
    if config.hidden_fraction:
        return "--hidden-fraction cuts the embeddings and every block's residual width from scores over all blocks"
    return None


def _plan(store: DiskBlocks, config: WidthConfig, report: WidthReport, calibration: Tensor | None,
          device: torch.device, batch_size: int) -> dict[str, Any]:  # fmt: skip
    """The read-only pass and the allocation: what the cuts need, as a state that saves and loads."""
    statistics, units = scored_units(store.model, config, calibration, device, batch_size)
    removals = allocate(config, units, config.fraction * report.block_parameters_before, report.before)
    width, blocks = store.adapter.width, store.adapter.blocks
    consumers = {f"{blocks}.{u.block}.{width.mlp.consumer if u.kind == 'mlp' else width.attention.o}" for u in units}
    return {"units": [asdict(u) for u in units], "removals": [[b, kind, n] for (b, kind), n in removals.items()],
            "means": {name: mean for name, mean in means_of(statistics).items() if name in consumers}}  # fmt: skip


def stream_width(store: DiskBlocks, staging: Path, config: WidthConfig, calibration: Tensor | None,
                 device: torch.device, batch_size: int, work: Path | None = None) -> WidthReport:  # fmt: skip
    """Prune the widths of the model in `store` (opened read only) into the directory `staging`:
    every block cut and written (`finish` still to come); returns the report. The store's model is
    left on the meta device with the new shapes and config, its `table` lists the matrices written."""
    why = streamable(config)
    if why is not None:
        raise ConfigError(f"{why}: it cannot be streamed from disk; use activation or fluctuation importance "
                          f"without --hidden-fraction, or load it in memory")
    model, adapter = store.model, store.adapter
    config, variant = resolve_variant(model, adapter, config)
    width = width_of(model, adapter, config)
    check_calibration(config, calibration)
    start = time.perf_counter()
    report = new_report(model, adapter, config, variant)
    saved = work / STATE if work is not None else None
    if saved is not None and saved.is_file():
        state = torch.load(saved, weights_only=True)
    else:
        store.trim = False  # the first pass only runs the blocks: the same activations every block
        state = _plan(store, config, report, calibration, device, batch_size)
        if saved is not None:
            work.mkdir(parents=True, exist_ok=True)
            save_whole(state, saved)
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
        store.finish()
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
