"""A sparsity stage from disk to disk, for models larger than memory (`secateur prune --offload disk`,
or `sparsify_on_disk` in Python).

`sparsify_on_disk(path, out, config, calibration)` reads the input's blocks one at a time from its
safetensors (the next one prefetched while the current one is pruned), writes each pruned block to
the output as soon as it is done, the tensors outside the blocks copied unchanged, and the manifest
last: the same weights, bit for bit, as `sparsify` on the model loaded in memory and saved, at a peak
host memory of about the input embeddings plus two blocks plus the calibration activations.

The output goes through the one output path (`secateur.output`): claimed before any work, written to
a hidden sibling, renamed into place at the end, removed on an error or a signal.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, stored_bytes, stored_shapes
from secateur.config import NM, PruneConfig
from secateur.errors import ConfigError
from secateur.io import MANIFEST, load_config, resolve_device, resolve_dtype
from secateur.output import claim
from secateur.sparsity.prune import PruneReport, sparsify

# what a HF directory holds besides config and weights, copied as they are
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # fmt: skip


def streamable(config: PruneConfig) -> str | None:
    """Why a sparsity stage cannot be streamed block by block (None: it can): what reads the whole
    model before the pass (data-driven allocations, gradients)."""
    from secateur.sparsity.methods import spec_for

    if not isinstance(config.target, NM) and not config.allocation.is_uniform:
        return f"allocation {config.allocation.kind} ranks the layers of the whole model before pruning"
    if spec_for(config.method).prepare is not None:
        return f"{config.method_name} needs gradients of the whole model"
    return None


def stream_sparsity(path: Path, staging: Path, config: PruneConfig, calibration: Tensor | None, dtype: str,
                    device: str | torch.device, batch_size: int,
                    work: Path | None = None) -> tuple[PruneReport, dict[str, Any]]:  # fmt: skip
    """Prune the model at `path` block by block into the directory `staging` (weights, index, config,
    tokenizer and generation files); returns the report and the stage's history record (its seconds:
    the pass; its write_seconds: copying what lies outside the blocks). With `work`, finished blocks
    and the state to resume from are kept there until the end (a run interrupted earlier goes on from
    what it holds)."""
    from secateur.recipe import stage_settings

    why = streamable(config)
    if why is not None:
        raise ConfigError(f"{why}: it cannot be streamed from disk; use a uniform allocation or load it in memory")
    store = DiskBlocks.open(path, resolve_dtype(dtype), staging, work)
    try:
        report = sparsify(store.model, None, config, calibration, device=torch.device(device), batch_size=batch_size,
                          store=store)  # fmt: skip
        clock = time.perf_counter()
        store.finish()
    finally:
        store.close()
    _side_files(path, staging, dtype)
    record = {"kind": "sparsity", "settings": stage_settings(config), "result": report.to_dict(),
              "seconds": report.seconds, "write_seconds": time.perf_counter() - clock, "offload": "disk"}  # fmt: skip
    return report, record


def sparsify_on_disk(path: str | Path, out: str | Path, config: PruneConfig, calibration: Tensor | None, *,
                     dtype: str = "float32", device: str = "cpu", batch_size: int = 4,
                     overwrite: bool = False) -> PruneReport:  # fmt: skip
    """Prune the model at `path` (a HF directory of safetensors) block by block into `out`; see the
    module docstring. `calibration`: (samples, seq_len) token ids, tokenized by the input's tokenizer.
    Tunes the process's allocator
    as the command line does (`runtime.tune_allocator`: freed buffers stay in the heap for the next
    block; without it, glibc's moving mmap threshold lets resident memory creep up by a few MB per
    block on small blocks)."""
    import json

    from secateur.manifest import header
    from secateur.runtime import tune_allocator

    tune_allocator()
    path, start = Path(path), time.perf_counter()
    load_config(path)  # a directory with a readable config, before anything is claimed
    size = stored_bytes(path)
    with claim(out, inputs=[path], overwrite=overwrite, marker=MANIFEST) as output:
        with output.write(size=size) as staging:
            report, record = stream_sparsity(path, staging, config, calibration, dtype, resolve_device(device),
                                             batch_size)  # fmt: skip
            manifest = {**header(path, dtype, device, {}), "recipe": {"dtype": dtype, "stage": [record["settings"]]},
                        "history": [record], "structure": structure_of(path, report),
                        "timings": {"sparsity": time.perf_counter() - start}}  # fmt: skip
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        return report


def _side_files(path: Path, staging: Path, dtype: str) -> None:
    """The config (with the output's dtype) and the tokenizer and generation files there are, as they are."""
    config = load_config(path)
    config.dtype = resolve_dtype(dtype)
    config.save_pretrained(staging)
    for name in SIDE_FILES:
        if (path / name).is_file():
            shutil.copyfile(path / name, staging / name)


def structure_of(path: Path, report: PruneReport) -> dict[str, Any]:
    """The manifest's structure section, from the layer reports and the stored shapes (the model itself
    was never whole in memory)."""
    layers, config = report.layers, load_config(path)
    target = sum(r.shape[0] * r.shape[1] for r in layers)
    return {"blocks": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "parameters": sum(math.prod(shape) for shape in stored_shapes(path).values()), "target_parameters": target,
            "target_sparsity": sum(r.shape[0] * r.shape[1] * r.sparsity for r in layers) / max(target, 1)}  # fmt: skip
