"""A sparsity stage from disk to disk, for models larger than memory (Python API; the command line's
`--offload` is not there yet).

`sparsify_on_disk(path, out, config, calibration)` reads the input's blocks one at a time from its
safetensors (the next one prefetched while the current one is pruned), writes each pruned block to
the output as soon as it is done, the tensors outside the blocks copied unchanged, and the manifest
last: the same weights, bit for bit, as `sparsify` on the model loaded in memory and saved, at a peak
host memory of about the input embeddings plus two blocks plus the calibration activations.

The output goes through the one output path (`secateur.output`): claimed before any work, written to
a hidden sibling, renamed into place at the end, removed on an error or a signal.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, weight_map
from secateur.config import PruneConfig
from secateur.io import MANIFEST, load_config, load_tokenizer, resolve_device, resolve_dtype
from secateur.output import claim
from secateur.sparsity.prune import PruneReport, sparsify

# what a HF directory holds besides config and weights, copied as they are
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # fmt: skip


def sparsify_on_disk(path: str | Path, out: str | Path, config: PruneConfig, calibration: Tensor | None, *,
                     dtype: str = "float32", device: str = "cpu", batch_size: int = 4,
                     overwrite: bool = False) -> PruneReport:  # fmt: skip
    """Prune the model at `path` (a HF directory of safetensors) block by block into `out`; see the
    module docstring. `calibration`: (samples, seq_len) token ids, tokenized by the input's tokenizer."""
    path, start = Path(path), time.perf_counter()
    load_config(path)  # a directory with a readable config, before anything is claimed
    files = weight_map(path)
    with claim(out, inputs=[path], overwrite=overwrite, marker=MANIFEST) as output:
        size = sum(f.stat().st_size for f in set(files.values()))
        with output.write(size=size) as staging:
            store = DiskBlocks.open(path, resolve_dtype(dtype), staging)
            try:
                report = sparsify(store.model, None, config, calibration, device=resolve_device(device),
                                  batch_size=batch_size, store=store)  # fmt: skip
                store.finish()
            finally:
                store.close()
            _side_files(path, staging, dtype)
            (staging / MANIFEST).write_text(_manifest(path, config, report, dtype, device, time.perf_counter() - start))
        return report


def _side_files(path: Path, staging: Path, dtype: str) -> None:
    """The config (with the output's dtype) and the tokenizer and generation files, as they are."""
    config = load_config(path)
    config.dtype = resolve_dtype(dtype)
    config.save_pretrained(staging)
    for name in SIDE_FILES:
        if (path / name).is_file():
            shutil.copyfile(path / name, staging / name)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        load_tokenizer(path).save_pretrained(staging)


def _manifest(path: Path, config: PruneConfig, report: PruneReport, dtype: str, device: str, seconds: float) -> str:
    import json

    from secateur.manifest import header
    from secateur.sparsity.stage import _settings

    layers = report.layers
    target = sum(r.shape[0] * r.shape[1] for r in layers)
    model_config = load_config(path)
    parameters = sum(_numel(t) for t in _shapes(path).values())
    manifest: dict[str, Any] = {
        **header(path, dtype, device, {}),
        "recipe": {"dtype": dtype, "stage": [_settings(config)]},
        "history": [{"kind": "sparsity", "settings": _settings(config), "result": report.to_dict(), "seconds": seconds,
                     "offload": "disk"}],
        "structure": {"blocks": model_config.num_hidden_layers, "hidden_size": model_config.hidden_size,
                      "parameters": parameters, "target_parameters": target,
                      "target_sparsity": sum(r.shape[0] * r.shape[1] * r.sparsity for r in layers) / max(target, 1)},
        "timings": {"sparsity": seconds},
    }  # fmt: skip
    return json.dumps(manifest, indent=2, default=str)


def _shapes(path: Path) -> dict[str, list[int]]:
    from secateur.io import safetensors_shapes

    shapes: dict[str, list[int]] = {}
    for file in sorted(set(weight_map(path).values())):
        shapes.update(safetensors_shapes(file))
    return shapes


def _numel(shape: list[int]) -> int:
    return int(torch.Size(shape).numel())
