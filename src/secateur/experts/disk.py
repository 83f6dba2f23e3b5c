"""An experts stage from disk to disk, for mixtures of experts larger than memory (`secateur prune
--method experts --offload disk`).

The model stays on disk (`calibrate.disk.DiskBlocks`; the fused experts are read from the per-expert
matrices the checkpoint stores, `calibrate.layout`). The stage runs as in memory: with global
allocation, a read-only pass scores every MoE block first; then one pass measures each MoE block on
the activations of the model pruned so far, removes, merges or slims its experts, and writes it as
soon as it is done (dense blocks are written as they are); a criterion without calibration reads and
writes every block in turn. What lies outside the blocks is copied unchanged, the config holds the new
expert count (per-block counts: `modeling_secateur.py`), the manifest comes last. The same weights,
bit for bit, as the stage run in memory and saved.

With a work directory, finished blocks and the activations entering the next are kept there every
SAVE_EVERY seconds: a run killed at any point goes on from there (`--resume`), redoing the scoring
pass of a global allocation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, write_side_files
from secateur.experts.config import ExpertsConfig
from secateur.experts.engine import prune_experts
from secateur.io import resolve_dtype
from secateur.manifest import structure_of
from secateur.sparsity.prune import streamed_table


def streamed(path: Path, staging: Path, config: ExpertsConfig, calibration: Tensor | None, dtype: str,
             device: torch.device, batch_size: int, work: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The kind's `Streaming.run`: the stage into `staging` with the output's config, module and
    tokenizer files; (history record, manifest structure section)."""
    from secateur.recipe import stage_settings

    store = DiskBlocks.open(path, resolve_dtype(dtype), staging, work)
    try:
        model, adapter = store.model, store.adapter
        before = sum(p.numel() for p in model.parameters())
        report = prune_experts(model, config, calibration, device=device, batch_size=batch_size)
        clock = time.perf_counter()
        store.finish()
    finally:
        store.close()
    write_side_files(path, staging, model, resolve_dtype(dtype))  # per-block expert counts: the module that builds them
    result = {"parameters_before": before, "parameters_after": sum(p.numel() for p in model.parameters()),
              **report.to_dict()}  # fmt: skip
    layers = streamed_table(model, store.table)
    record = {"kind": "experts", "settings": stage_settings(config), "result": result, "seconds": report.seconds,
              "write_seconds": time.perf_counter() - clock, "offload": "disk"}  # fmt: skip
    return record, structure_of(model, layers)
