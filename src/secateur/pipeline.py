"""End-to-end jobs shared by the CLI and the demo: load -> calibrate -> prune -> evaluate -> save."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateur import __version__
from secateur.config import CalibConfig, PruneConfig
from secateur.data import (
    calibration_windows,
    evaluation_windows,
    load_text,
    needs_holdout,
    tokenize,
    uses_bos,
)
from secateur.depth import DepthConfig, depth_prune, removed_sublayers
from secateur.evaluate import perplexity
from secateur.io import check_output, content_hash, load_model, resolve_device, save
from secateur.models import adapter_for, read_weight
from secateur.prune import PruneReport, needs_calibration, prune, target_layers
from secateur.width import WidthConfig, width_prune


def _bos(model: nn.Module, tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if uses_bos(tokenizer, adapter_for(model).needs_bos) else None


def calibration_data(model: nn.Module, tokenizer: Any, calib: CalibConfig) -> Tensor:
    """Seeded calibration windows; when the text is the evaluation text, its eval region is skipped."""
    text = load_text(calib.source, "calibration", calib.text_field)
    tokens = tokenize(tokenizer, text)
    bos = _bos(model, tokenizer)
    skip = 0
    if needs_holdout(calib.source):
        skip = calib.holdout_windows * (calib.holdout_seq_len - (bos is not None))
    return calibration_windows(tokens, calib.seq_len, calib.samples, calib.seed, skip=skip, bos=bos)


def evaluation_data(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, field: str = "text") -> Tensor:
    tokens = tokenize(tokenizer, load_text(source, "evaluation", field))
    return evaluation_windows(tokens, seq_len, windows, bos=_bos(model, tokenizer))


def evaluate_model(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, *,
                   field: str = "text", batch_size: int = 4, device: torch.device | str = "cpu") -> dict[str, Any]:
    data = evaluation_data(model, tokenizer, source, seq_len, windows, field)
    result = perplexity(model, data, batch_size=batch_size, device=device)
    return {"source": source, "bos": _bos(model, tokenizer) is not None, **result}


def sparsity_table(model: nn.Module) -> list[tuple[str, tuple[int, int], float]]:
    """(name, shape, fraction of zeros) of every prunable layer, as found in the weights."""
    rows = []
    for name, module in target_layers(model, adapter_for(model)):
        weight = read_weight(module)
        rows.append((name, tuple(weight.shape), float((weight == 0).float().mean())))
    return rows


def _header(model_path: str | Path, dtype: str, device: torch.device | str) -> dict[str, Any]:
    return {
        "secateur_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(Path(model_path).resolve()), "sha256": content_hash(model_path)},
        "dtype": dtype,
        "device": str(device),
    }


def build_manifest(
    model_path: str | Path,
    config: PruneConfig,
    calib: CalibConfig | None,
    report: PruneReport,
    dtype: str,
    device: torch.device | str,
    timings: dict[str, float],
) -> dict[str, Any]:
    """What `secateur.json` records: source and its hash, recipe, calibration, per-layer results."""
    result = report.to_dict()
    return {
        **_header(model_path, dtype, device),
        "recipe": config.to_dict(),
        "calibration": {**asdict(calib), "tokens": report.calibration_tokens} if calib else None,
        "result": {k: v for k, v in result.items() if k != "layers"},
        "layers": result["layers"],
        "timings": timings,
    }


@dataclass(frozen=True)
class RunOptions:
    """How a pruning job loads, evaluates and saves, whatever it prunes."""

    dtype: str = "float32"
    device: str = "auto"
    overwrite: bool = False
    eval_source: str | None = None  # evaluate after pruning and record it in the manifest
    eval_seq_len: int = 512
    eval_windows: int = 64


Work = Callable[[nn.Module, Any, torch.device, dict[str, float]], dict[str, Any]]


def _preflight(model_path: str | Path, out: str | Path, options: RunOptions, calib: CalibConfig | None) -> None:
    """Everything that can be checked before the model is loaded: the output location (not an input,
    not existing unless overwriting, writable) and every text source (exists, is readable text)."""
    sources = [s for s in (calib.source if calib else None, options.eval_source) if s]
    check_output(out, options.overwrite, [model_path, *(s for s in sources if Path(s).exists())])
    for source, purpose in zip(sources, ("calibration", "evaluation") if calib else ("evaluation",)):
        load_text(source, purpose, calib.text_field if calib else "text")


def _run(model_path: str | Path, out: str | Path, options: RunOptions, calib: CalibConfig | None, work: Work) -> dict[str, Any]:
    """Check the output and the data sources before any work, load on CPU, `work` prunes in place and
    returns the manifest, evaluate if asked (its windows are cut before pruning), save atomically."""
    _preflight(model_path, out, options, calib)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    model, tokenizer = load_model(model_path, dtype=options.dtype, device="cpu")
    timings["load"] = time.perf_counter() - clock
    compute = resolve_device(options.device)
    evaluation = (evaluation_data(model, tokenizer, options.eval_source, options.eval_seq_len, options.eval_windows)
                  if options.eval_source else None)  # fmt: skip
    manifest = work(model, tokenizer, compute, timings)
    if evaluation is not None:
        model.to(compute)
        manifest["evaluation"] = {"source": options.eval_source, "bos": _bos(model, tokenizer) is not None,
                                  **perplexity(model, evaluation, device=compute)}  # fmt: skip
        model.to("cpu")
    save(model, tokenizer, out, manifest, overwrite=options.overwrite, inputs=[model_path])
    return manifest


def _timed_calibration(model: nn.Module, tokenizer: Any, calib: CalibConfig, timings: dict[str, float]) -> Tensor:
    clock = time.perf_counter()
    calibration = calibration_data(model, tokenizer, calib)
    timings["calibration_data"] = time.perf_counter() - clock
    return calibration


def run_prune(model_path: str | Path, config: PruneConfig, calib: CalibConfig, out: str | Path,
              options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Prune weights of a model from disk and save it with its manifest; returns the manifest."""

    def work(model: nn.Module, tokenizer: Any, compute: torch.device, timings: dict[str, float]) -> dict[str, Any]:
        needs_data = needs_calibration(config)
        calibration = _timed_calibration(model, tokenizer, calib, timings) if needs_data else None
        report = prune(model, tokenizer, config, calibration, device=compute, batch_size=calib.batch_size)
        timings["prune"] = report.seconds
        return build_manifest(model_path, config, calib if needs_data else None, report, options.dtype, compute, timings)

    return _run(model_path, out, options, calib if needs_calibration(config) else None, work)


def run_depth(model_path: str | Path, config: DepthConfig, calib: CalibConfig, out: str | Path,
              options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Remove blocks or branches chosen on calibration data; save the model with its manifest."""

    def work(model: nn.Module, tokenizer: Any, compute: torch.device, timings: dict[str, float]) -> dict[str, Any]:
        calibration = _timed_calibration(model, tokenizer, calib, timings)
        blocks_before = model.config.num_hidden_layers
        parameters_before = sum(p.numel() for p in model.parameters())
        selection = depth_prune(model, config, calibration, device=compute, batch_size=calib.batch_size)
        timings["prune"] = selection.seconds
        return {
            **_header(model_path, options.dtype, compute),
            "recipe": config.to_dict(),
            "calibration": {**asdict(calib), "tokens": calibration.numel()},
            "result": {"method": config.method_name, "target": str(config.amount), "seconds": selection.seconds},
            "depth": {
                "blocks_before": blocks_before,
                "blocks_after": model.config.num_hidden_layers,
                "parameters_before": parameters_before,
                "parameters_after": sum(p.numel() for p in model.parameters()),
                "removed_blocks": selection.blocks,  # original numbering
                "removed_sublayers": [list(u) for u in removed_sublayers(model, adapter_for(model))],  # as saved
                **selection.to_dict(),
            },
            "timings": timings,
        }

    return _run(model_path, out, options, calib, work)


def run_width(model_path: str | Path, config: WidthConfig, calib: CalibConfig, out: str | Path,
              options: RunOptions = RunOptions()) -> dict[str, Any]:
    """Remove heads and MLP channels; save the smaller dense model with its manifest."""

    def work(model: nn.Module, tokenizer: Any, compute: torch.device, timings: dict[str, float]) -> dict[str, Any]:
        calibration = _timed_calibration(model, tokenizer, calib, timings) if config.needs_calibration else None
        parameters_before = sum(p.numel() for p in model.parameters())
        report = width_prune(model, config, calibration, device=compute, batch_size=calib.batch_size)
        timings["prune"] = report.seconds
        return {
            **_header(model_path, options.dtype, compute),
            "recipe": config.to_dict(),
            "calibration": {**asdict(calib), "tokens": calibration.numel()} if config.needs_calibration else None,
            "result": {"method": "width", "target": f"{config.fraction:g} of block parameters",
                       "removed_fraction": report.removed_fraction, "seconds": report.seconds},
            "width": {"parameters_before": parameters_before,
                      "parameters_after": sum(p.numel() for p in model.parameters()), **report.to_dict()},
            "timings": timings,
        }  # fmt: skip

    return _run(model_path, out, options, calib if config.needs_calibration else None, work)
