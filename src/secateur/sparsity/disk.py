"""A sparsity stage from disk to disk, for models larger than memory (`secateur prune --offload disk`,
or `secateur.offload.prune_on_disk` in Python).

`stream_sparsity` reads the input's blocks one at a time from its
safetensors (the next one prefetched while the current one is pruned), writes each pruned block to
the output as soon as it is done, the tensors outside the blocks copied unchanged, and the manifest
last: the same weights, bit for bit, as `sparsify` on the model loaded in memory and saved, at a peak
host memory of about the input embeddings plus two blocks plus the calibration activations.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, write_side_files
from secateur.config import PruneConfig
from secateur.errors import ConfigError
from secateur.io import resolve_dtype
from secateur.manifest import structure_of
from secateur.sparsity.prune import PruneReport, sparsify, streamed_table


def streamable(config: PruneConfig) -> str | None:
    """Why a sparsity stage cannot be streamed block by block (None: it can): what reads the whole
    model before the pass (data-driven allocations, gradients)."""
    from secateur.sparsity.methods import spec_for

    if spec_for(config.method).prepare is not None:
        return f"{config.method_name} needs gradients of the whole model"
    return None


def stream_sparsity(path: Path, staging: Path, config: PruneConfig, calibration: Tensor | None, dtype: str,
                    device: str | torch.device, batch_size: int,
                    work: Path | None = None) -> tuple[PruneReport, dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Prune the model at `path` block by block into the directory `staging` (weights, index, config,
    tokenizer and generation files); returns the report, the stage's history record (its seconds:
    the pass; its write_seconds: copying what lies outside the blocks) and the manifest's structure
    section. With `work`, finished blocks and the state to resume from are kept there until the end
    (a run interrupted earlier goes on from what it holds)."""
    from secateur.recipe import stage_settings

    why = streamable(config)
    if why is not None:
        raise ConfigError(f"{why}: it cannot be streamed from disk; use a uniform allocation or load it in memory")
    store = DiskBlocks.open(path, resolve_dtype(dtype), staging, work)
    try:
        model, adapter = store.model, store.adapter
        report = sparsify(model, None, config, calibration, device=torch.device(device), batch_size=batch_size)
        clock = time.perf_counter()
        store.finish()
    finally:
        store.close()
    write_side_files(path, staging, model, resolve_dtype(dtype))
    record = {"kind": "sparsity", "settings": stage_settings(config), "result": report.to_dict(),
              "seconds": report.seconds, "write_seconds": time.perf_counter() - clock, "offload": "disk"}  # fmt: skip
    layers = streamed_table(model, store.table)
    return report, record, structure_of(model, layers)


def streamed(path: Path, staging: Path, config: PruneConfig, calibration: Tensor | None, dtype: str,
             device: torch.device, batch_size: int, work: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The kind's `Streaming.run`: (history record, manifest structure section)."""
    _, record, structure = stream_sparsity(path, staging, config, calibration, dtype, device, batch_size, work)
    return record, structure
