"""Loading models (HF directory or GGUF), hashing sources, atomic saving with a manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.models import adapter_for
from secateur.width.remote import MODULE as REMOTE_MODULE
from secateur.width.remote import prepare_module

MANIFEST = "secateur.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelPathError(ValueError):
    """The model path does not exist or holds no loadable model."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelPathError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelPathError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def split_model_path(path: Path) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for from_pretrained; checks the path is a model."""
    if not path.exists():
        raise ModelPathError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelPathError(f"{path} is a file but not a .gguf model; give a GGUF file or a HF model directory")
        return str(path.parent), path.name
    if not (path / "config.json").is_file():
        raise ModelPathError(f"{path} is not a Hugging Face model directory (no config.json)")
    return str(path), None


def load_config(path: str | Path):
    from transformers import AutoConfig

    directory, gguf = split_model_path(Path(path))
    return AutoConfig.from_pretrained(directory, gguf_file=gguf)


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a HF directory or a GGUF file (dequantized).

    The architecture is checked against the adapters before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    directory, gguf = split_model_path(path)
    adapter_for(load_config(path))  # unsupported architectures fail fast, naming the supported ones
    kwargs = {"gguf_file": gguf} if gguf else {}
    extra = {"quantization_config": _dequantize_gguf(gguf)} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=resolve_dtype(dtype), **kwargs, **extra)
    if gguf:
        _forget_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    return model.to(resolve_device(device)).eval(), tokenizer


def _dequantize_gguf(gguf_file: str):
    from transformers import GgufConfig

    return GgufConfig(gguf_file=gguf_file, dequantize=True)  # plain float weights, prunable and savable


def _forget_quantizer(model: nn.Module) -> None:
    """A dequantized GGUF model is an ordinary float model: drop the quantizer so it saves normally."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def content_hash(path: str | Path) -> str:
    """sha256 over a GGUF file, or over the (name, bytes) of every file of a model directory."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output path unless asked to overwrite it (checked before any work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory; choose another --out")
    return out


def save(model: nn.Module, tokenizer: Any, out: str | Path, manifest: dict[str, Any], overwrite: bool = False) -> Path:
    """Write a HF directory plus `secateur.json` to a temporary sibling, then rename it into place.

    A crash leaves no half-written model: either the old output (if any) or the new one exists.
    """
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        source = prepare_module(model)  # per-block widths for `trust_remote_code=True`, before the config is written
        model.save_pretrained(staging)
        if source:
            (staging / f"{REMOTE_MODULE}.py").write_text(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if out.exists():
            retired = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(retired)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


def load(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load any secateur output (or any model): `load_model`, then re-apply what the weights and the
    stock config alone cannot express: attention / MLP branches removed from some blocks (depth), and
    per-block widths (adaptive width pruning)."""
    from secateur.depth.structure import remove_sublayers

    manifest = (read_manifest(path) if Path(path).is_dir() else None) or {}
    removed = [tuple(u) for u in (manifest.get("depth") or {}).get("removed_sublayers", [])]
    width = manifest.get("width") or {}
    if width and not width.get("uniform", True):
        return _load_reshaped(Path(path), dtype, device, removed, width["layers"])
    if not removed:
        return load_model(path, dtype=dtype, device=device)
    with _quiet_missing_weights():  # the removed branches' weights are absent on purpose
        model, tokenizer = load_model(path, dtype=dtype, device="cpu")
    remove_sublayers(model, adapter_for(model), removed)
    return model.to(resolve_device(device)), tokenizer


def _load_reshaped(path: Path, dtype: str, device: str, removed: list[tuple], layers: list[dict]) -> tuple[nn.Module, Any]:
    """Build the model empty from its config, shape each block as recorded, then load the weights."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateur.depth.structure import remove_sublayers
    from secateur.width.structure import LayerWidth, apply_widths

    config = load_config(path)
    adapter = adapter_for(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    remove_sublayers(model, adapter, removed)
    apply_widths(model, adapter, [LayerWidth(**layer) for layer in layers])
    state = {k: v for file in sorted(path.glob("*.safetensors")) for k, v in load_file(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ModelPathError(f"{path}: weights do not match the recorded widths (missing {sorted(set(missing) - tied)[:3]}, "
                             f"unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    model = model.to(resolve_dtype(dtype))
    return model.to(resolve_device(device)).eval(), AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def _quiet_missing_weights():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
