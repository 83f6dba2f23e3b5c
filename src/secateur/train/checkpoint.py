"""A recovery run's files in its work directory: accelerate checkpoints written beside and renamed
into place, the metrics file (one JSON line per step, trimmed back to the checkpoint's step on resume),
and the best validated trainable weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateur.errors import OutputError
from secateur.output import disk_error

CHECKPOINT = "checkpoint"
SHAPE = "shape.json"  # incremental width: the shapes of the checkpoint's weights
METRICS = "metrics.jsonl"
BEST = "best.pt"


def write_json_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics of the steps a resumed run has already done (later lines were lost work)."""
    if path.exists():
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def save_checkpoint(acc: Any, checkpoint: Path, shape: dict[str, Any] | None = None) -> None:
    staging = checkpoint.with_name(checkpoint.name + ".partial")
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(staging), safe_serialization=False)
    except (OSError, RuntimeError) as exc:  # torch's writer says only "file write failed"
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(checkpoint.parent).free
        if disk_error(exc, staging) is None and "write failed" not in str(exc):
            raise
        raise OutputError(f"could not write a checkpoint in {checkpoint.parent} ({free / 2**20:.0f} MiB free): "
                          f"{str(exc).splitlines()[-1][:120]}; free some space, then rerun with --resume (the last "
                          "complete checkpoint is kept)") from None
    acc.wait_for_everyone()
    if acc.is_main_process:
        if shape is not None:
            (staging / SHAPE).write_text(json.dumps(shape), encoding="utf-8")
        old = checkpoint.with_name(checkpoint.name + ".old")
        if checkpoint.exists():
            checkpoint.rename(old)
        staging.rename(checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def trainable(model: nn.Module, copy: bool = True) -> dict[str, Tensor]:
    """The trainable parameters by name, on the CPU (`copy`: copies, else the tensors themselves there)."""
    return {n: p.detach().cpu().clone() if copy else p.detach().cpu() for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable(model: nn.Module, values: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
