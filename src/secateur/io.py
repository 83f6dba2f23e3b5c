"""Loading models (HF directory or GGUF), hashing sources, atomic saving with a manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.errors import ConfigError, OutputError, SecateurError
from secateur.models import adapter_for
from secateur.width.remote import MODULE as REMOTE_MODULE
from secateur.width.remote import prepare_module

MANIFEST = "secateur.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelPathError(SecateurError):
    """The model path does not exist or holds no loadable model."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device!r} is not a device secateur runs on; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelPathError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ModelPathError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    return resolved


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
    try:
        return AutoConfig.from_pretrained(directory, gguf_file=gguf)
    except Exception as exc:  # broken JSON, no model_type, a truncated or foreign GGUF: all end the same way
        what = "GGUF file" if gguf else "config.json"
        raise ModelPathError(f"{path}: cannot read the model's {what} ({str(exc).splitlines()[0][:200]}); "
                             "give a valid HF model directory or GGUF file") from None


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a HF directory or a GGUF file (dequantized).

    The architecture is checked against the adapters before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    directory, gguf = split_model_path(path)
    config = load_config(path)
    adapter_for(config)  # unsupported architectures fail fast, naming the supported ones
    kwargs = {"gguf_file": gguf} if gguf else {}
    extra = {"quantization_config": _dequantize_gguf(gguf), "config": _complete_gguf_config(path, config)} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=resolve_dtype(dtype), **kwargs, **extra)
    if gguf:
        _forget_quantizer(model)
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    return model.to(resolve_device(device)).eval(), tokenizer


def _complete_gguf_config(path: Path, config):
    """What transformers' GGUF reader leaves out of the config: the explicit head size (which
    pruned heads need, and which it reads for no Qwen) and the biases a Llama file holds (bias
    compensation adds them; without the flags the stock model has nowhere to load them)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length.contents())
    names = [t.name for t in reader.tensors]
    if config.model_type == "llama":
        config.attention_bias = any(n.endswith(".attn_output.bias") or n.endswith(".attn_q.bias") for n in names)
        config.mlp_bias = any(n.endswith(".ffn_down.bias") for n in names)
    return config


def _dequantize_gguf(gguf_file: str):
    from transformers import GgufConfig

    return GgufConfig(gguf_file=gguf_file, dequantize=True)  # plain float weights, prunable and savable


def _forget_quantizer(model: nn.Module) -> None:
    """A dequantized GGUF model is an ordinary float model: drop the quantizer so it saves normally."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


_HASHES: dict[tuple, str] = {}  # by (path, every file's name, size and mtime): a run hashes a model once


def content_hash(path: str | Path) -> str:
    """sha256 over a GGUF file, or over the (name, bytes) of every file of a model directory."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = (path, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _HASHES:
        _HASHES[stamp] = _sha256(path, files)
    return _HASHES[stamp]


def _sha256(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_output(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output path before any work: one that exists (unless asked to overwrite), one that
    is, contains or lies inside any of the run's `inputs` (overwriting it would delete them), and one
    that cannot be written. Leftovers of earlier interrupted saves to `out` are cleared first."""
    out = Path(out)
    target = out.resolve()
    for source in inputs:
        resolved = Path(source).resolve()
        if target == resolved or target in resolved.parents or resolved in target.parents:
            relation = ("is" if target == resolved else "contains" if target in resolved.parents else "lies inside")
            raise OutputError(f"--out {out} {relation} the input {source}; choose an output outside the inputs")
    clear_stale(out)
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; choose another --out")
    parent = next(p for p in (target.parent, *target.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {parent} is not a writable directory; choose another --out")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(out: Path) -> None:
    """Remove what interrupted saves of `out` by processes that no longer run left behind: staging
    directories, and a retired old output (put back in place when the new one never arrived)."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        if kind == "old" and not out.exists():
            path.rename(out)  # the crash came between retiring the old output and renaming the new one
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While saving, SIGTERM and SIGHUP raise like Ctrl-C does, so the cleanup below runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum} during save")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def manifest_inputs(manifest: dict[str, Any]) -> list[str]:
    """Paths a manifest names as the run's inputs (model sources, text files), protected by `save`."""
    paths = [(manifest.get("source") or {}).get("path")]
    calibration = manifest.get("calibration") or {}
    paths += [calibration.get("source"), (manifest.get("evaluation") or {}).get("source")]
    return [p for p in paths if isinstance(p, str) and Path(p).exists()]


def save(model: nn.Module, tokenizer: Any, out: str | Path, manifest: dict[str, Any], overwrite: bool = False,
         inputs: Sequence[str | Path] = (), extras: dict[str, Path] | None = None) -> Path:
    """Write a HF directory plus `secateur.json` to a temporary sibling, then rename it into place.

    A crash or a signal leaves no half-written model: either the old output (if any) or the new one
    exists, and the staging directory is removed (or, after SIGKILL, at the next save to `out`).
    `out` is refused when it is, holds or lies inside an input (`inputs`, and those the manifest names).
    `extras` are files copied into the output under the given names (training metrics, plots).
    """
    out = check_output(out, overwrite, [*inputs, *manifest_inputs(manifest)])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    with _signals_raise():
        try:
            source = prepare_module(model)  # per-block widths for `trust_remote_code=True`, before the config is written
            model.save_pretrained(staging)
            if source:
                (staging / f"{REMOTE_MODULE}.py").write_text(source)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for name, path in (extras or {}).items():
                shutil.copyfile(path, staging / name)
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
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelPathError(f"{file} is not valid JSON ({exc}); restore it or remove it to load the model as is") from None
    if not isinstance(manifest, dict):
        raise ModelPathError(f"{file} is not a secateur manifest; restore it or remove it to load the model as is")
    return manifest


def load(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load any secateur output (or any model): `load_model`, then re-apply what the weights and the
    stock config alone cannot express: attention / MLP branches removed from some blocks (depth), and
    per-block widths (adaptive width pruning)."""
    from secateur.depth.structure import remove_sublayers

    manifest = (read_manifest(path) if Path(path).is_dir() else None) or {}
    removed, widths = _recorded_structure(manifest)
    if widths is not None:
        return _load_reshaped(Path(path), dtype, device, removed, widths)
    if not removed:
        return load_model(path, dtype=dtype, device=device)
    with _quiet_missing_weights():  # the removed branches' weights are absent on purpose
        model, tokenizer = load_model(path, dtype=dtype, device="cpu")
    remove_sublayers(model, adapter_for(model), removed)
    return model.to(resolve_device(device)), tokenizer


def _recorded_structure(manifest: dict[str, Any]) -> tuple[list[tuple], list[dict] | None]:
    """(removed branches, per-block widths or None when the stock config describes them) from a
    manifest's structure section, or from the depth / width sections of earlier versions."""
    structure = manifest.get("structure")
    if structure is not None:
        widths = None if structure.get("uniform_widths", True) else structure["widths"]
        return [tuple(u) for u in structure.get("removed_sublayers", [])], widths
    width = manifest.get("width") or {}
    removed = [tuple(u) for u in (manifest.get("depth") or {}).get("removed_sublayers", [])]
    return removed, (width["layers"] if width and not width.get("uniform", True) else None)


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
