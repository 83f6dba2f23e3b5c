"""A depth stage from disk to disk, for models larger than memory (`secateur prune --method angular
--offload disk`).

The model stays on disk (`calibrate.disk.DiskBlocks`): the search's pass (angular distances, Block
Influence) and the compensation's pass read the blocks one at a time like any streamed pass; the
block that compensation fits (the one before each removed run) stays resident from its turn until
its fit. Then the output's blocks are written one at a time: block j is the input's j-th kept
block, read from the input (the fitted layer's new weights in place of its own) and renumbered.
What lies outside the blocks is copied unchanged, the config loses the removed blocks' entries, the
manifest comes last. The same weights, bit for bit, as the stage run in memory and saved.

With a work directory, the selection and the fitted weights are saved there once the passes are
done, and each written block as soon as it is: a run killed at any point goes on from there
(`--resume`), redoing at most the passes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, write_side_files
from secateur.depth.compensate import compensate, runs
from secateur.depth.config import DepthConfig, GreedyLossConfig
from secateur.depth.methods import REGISTRY, resolve_compensation, select_removals
from secateur.depth.structure import remove_blocks
from secateur.errors import ConfigError
from secateur.io import resolve_dtype
from secateur.manifest import structure_of
from secateur.sparsity.prune import streamed_table
from secateur.output import save_whole

STATE = "depth.pt"  # in the work directory: the selection and the fitted weights


def streamable(config: DepthConfig) -> str | None:
    """Why a depth stage cannot be streamed block by block (None: it can)."""
    spec = REGISTRY[config.method_name]
    if spec.unit != "block":
        return f"{spec.name} skips attention / MLP branches, which a stock config cannot describe on disk yet"
    if spec.name == GreedyLossConfig.name:
        return f"{spec.name} runs the whole model once for every candidate block"
    return None


def _select(store: DiskBlocks, config: DepthConfig, why: str | None, calibration: Tensor, device: torch.device,
            batch_size: int) -> tuple[list[int], dict[int, dict[str, Tensor]], dict[str, Any]]:  # fmt: skip
    """The passes over the model on disk: (blocks removed, fitted weights per block, the result's
    selection part)."""
    model, adapter = store.model, store.adapter
    selection = select_removals(model, config, calibration, device=device, batch_size=batch_size)
    selection.compensated, selection.variant = config.compensate, why
    patches: dict[int, dict[str, Tensor]] = {}
    if config.compensate:
        clock = time.perf_counter()
        fitted = [first - 1 for first, _ in runs(selection.blocks) if first > 0]
        store.pinned = set(fitted)
        try:
            selection.compensation = compensate(model, adapter, selection.blocks, calibration, batch_size, device,
                                                config.compensate_damp)  # fmt: skip
            blocks = adapter.block_list(model)
            for index in fitted:  # the whole block: only its fitted layer differs from the input's
                patches[index] = {n: p.detach().to("cpu").clone() for n, p in blocks[index].named_parameters()}
        finally:
            store.pinned = set()
            for index in fitted:
                adapter.block_list(model)[index].to("meta")
        selection.seconds += time.perf_counter() - clock
    return selection.blocks, patches, selection.to_dict()


def stream_depth(path: Path, staging: Path, config: DepthConfig, calibration: Tensor, dtype: torch.dtype,
                 device: torch.device, batch_size: int, work: Path | None = None) -> tuple[dict[str, Any], DepthConfig,
                                                                                          Any, dict[str, Any]]:  # fmt: skip
    """Remove blocks of the model at `path` into the directory `staging` (weights and index); returns
    the stage's result (as the in-memory stage reports it, and `write_seconds`: the writing), its config with compensation resolved,
    the output's model on the meta device (its config and shapes) and the manifest's structure
    section."""
    why = streamable(config)
    if why is not None:
        raise ConfigError(f"{why}: it cannot be streamed from disk; use angular or block-influence, or load it in memory")
    store = DiskBlocks.open(path, dtype)  # read only: the passes write nothing
    store.trim = False  # forward passes: the same activations every block, nothing to give back
    try:
        model, adapter = store.model, store.adapter
        before = len(adapter.block_list(model))
        parameters_before = sum(p.numel() for p in model.parameters())
        config, why = resolve_compensation(model, config)
        saved = work / STATE if work is not None else None
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
        if saved is not None and saved.is_file():
            state = torch.load(saved, weights_only=True)
        else:
            removed, patches, selection = _select(store, config, why, calibration, device, batch_size)
            state = {"removed": removed, "patches": patches, "selection": selection}
            if saved is not None:
                save_whole(state, saved)
        removed = list(state["removed"])
        store.staging, store.work = staging, work  # the blocks are written now, renumbered
        clock = time.perf_counter()
        table = store.write_blocks(sorted(set(range(before)) - set(removed)), state["patches"])
        remove_blocks(model, adapter, removed)  # on the meta device: the output's config and block count
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # the passes sent head and embeddings to the meta device one by one: counted once
        store.finish()
        written = time.perf_counter() - clock
    finally:
        store.close()
    result = {"blocks_before": before, "blocks_after": model.config.num_hidden_layers,
              "parameters_before": parameters_before, "parameters_after": sum(p.numel() for p in model.parameters()),
              "removed_blocks": removed, "removed_sublayers": [], **state["selection"],
              "write_seconds": written}  # fmt: skip
    if why is not None:
        result["variant"] = why
    layers = streamed_table(model, table)
    return result, config, model, structure_of(model, layers)


def streamed(path: Path, staging: Path, config: DepthConfig, calibration: Tensor | None, dtype: str,
             device: torch.device, batch_size: int, work: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The kind's `Streaming.run`: the stage, the output's config and tokenizer files; (history record,
    manifest structure section)."""
    from secateur.recipe import stage_settings

    clock = time.perf_counter()
    result, config, model, structure = stream_depth(path, staging, config, calibration, resolve_dtype(dtype), device,
                                                    batch_size, work)  # fmt: skip
    write_side_files(path, staging, model, resolve_dtype(dtype))
    written = result.pop("write_seconds")
    record = {"kind": "depth", "settings": stage_settings(config), "result": result,
              "seconds": time.perf_counter() - clock - written, "write_seconds": written, "offload": "disk"}  # fmt: skip
    return record, structure
