"""Loading models (HF directory or GGUF), hashing sources, atomic saving with a manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from secateur.errors import ConfigError, SecateurError
from secateur.models import adapter_for, remote
from secateur.output import Output, check_apart, claim

MANIFEST = "secateur.json"
Dtype = Literal["float32", "bfloat16", "float16"]  # the precisions a model loads and works in
DTYPES = dict(zip(get_args(Dtype), (torch.float32, torch.bfloat16, torch.float16)))


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


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a HF directory or a GGUF file, without the model."""
    from transformers import AutoTokenizer

    directory, gguf = split_model_path(Path(path))
    return AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))


def model_positions(config: Any) -> int | None:
    """The longest window a model's config allows (None: it does not say)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a HF directory or a GGUF file (dequantized).

    The architecture is checked against the adapters before any weight is read.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    directory, gguf = split_model_path(path)
    config = load_config(path)
    adapter_for(config)  # unsupported architectures fail fast, naming the supported ones
    kwargs = {"gguf_file": gguf} if gguf else {}
    extra = {"quantization_config": _dequantize_gguf(gguf), "config": _complete_gguf_config(path, config)} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=resolve_dtype(dtype), **kwargs, **extra)
    if gguf:
        _forget_quantizer(model)
    return model.to(resolve_device(device)).eval(), load_tokenizer(path)


def _complete_gguf_config(path: Path, config):
    """What transformers' GGUF reader leaves out of the config: the explicit head size (which
    pruned heads need, and which it reads for no Qwen) and the biases a Llama file holds (bias
    compensation adds them; without the flags the stock model has nowhere to load them), and the
    Gemma 3 settings llama.cpp reads that it does not."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    key_length = reader.fields.get(f"{arch}.attention.key_length")
    if key_length is not None:
        config.head_dim = int(key_length.contents())
    names = [t.name for t in reader.tensors]
    if arch == "gemma3":
        _complete_gemma3(reader, config)
    if config.model_type == "llama":
        config.attention_bias = any(n.endswith(".attn_output.bias") or n.endswith(".attn_q.bias") for n in names)
        config.mlp_bias = any(n.endswith(".ffn_down.bias") for n in names)
    return config


def _complete_gemma3(reader, config) -> None:
    """Gemma 3 as llama.cpp reads the file: which layers slide (an explicit per-layer array, or a
    period, default 6, the last of each period global), the sliding layers' rotary base (default
    10,000), and queries scaled by 1/sqrt(head size)."""
    field = lambda key: reader.fields[key].contents() if key in reader.fields else None  # noqa: E731
    layers = int(field("gemma3.block_count"))
    pattern = field("gemma3.attention.sliding_window_pattern")
    slides = [False] * layers  # no window: every layer global
    if field("gemma3.attention.sliding_window"):
        slides = ([bool(x) for x in pattern] if isinstance(pattern, list)
                  else [bool((i + 1) % int(pattern or 6)) for i in range(layers)])  # fmt: skip
    config.layer_types = ["sliding_attention" if s else "full_attention" for s in slides]
    full = float(field("gemma3.rope.freq_base") or 1_000_000.0)
    local = float(field("gemma3.rope.freq_base_swa") or 10_000.0)
    config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": full},
                              "sliding_attention": {"rope_type": "default", "rope_theta": local}}  # fmt: skip
    config.query_pre_attn_scalar = config.head_dim


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


def manifest_inputs(manifest: dict[str, Any]) -> list[str]:
    """Paths a manifest names as the run's inputs (model sources, text files), protected by `save`."""
    paths = [(manifest.get("source") or {}).get("path")]
    calibration = manifest.get("calibration") or {}
    evaluation = manifest.get("evaluation") or {}
    paths += [calibration.get("source"), evaluation.get("source"), *(evaluation.get("domains") or {})]
    return [p for p in paths if isinstance(p, str) and Path(p).exists()]


def model_bytes(model: nn.Module) -> int:
    """The bytes `save_pretrained` writes for the weights (tied tensors once)."""
    seen = {}
    for tensor in (*model.parameters(), *model.buffers()):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def save(model: nn.Module, tokenizer: Any, out: str | Path, manifest: dict[str, Any], overwrite: bool = False,
         inputs: Sequence[str | Path] = (), extras: dict[str, Path] | None = None,
         output: Output | None = None) -> Path:
    """Write a HF directory plus `secateur.json` through the output path (`secateur.output`): a hidden
    sibling renamed into place, so a crash, a signal or a full disk leaves either the old output or
    the new one. `out` is refused when it is, holds or lies inside an input (`inputs`, and those the
    manifest names). `output`: the claim a job took before its work (else claimed here).
    `extras` are files copied into the output under the given names (training metrics, plots).
    """
    protected = [*inputs, *manifest_inputs(manifest)]
    if output is not None:
        check_apart(output.path, protected, output.flag)
    claimed = contextlib.nullcontext(output) if output is not None else claim(out, inputs=protected,
                                                                              overwrite=overwrite, marker=MANIFEST)
    with claimed as output:
        with output.write(size=model_bytes(model)) as staging:
            files = remote.save_files(model)  # per-block shapes for trust_remote_code (completes the config)
            model.save_pretrained(staging)
            for name, text in files.items():
                (staging / name).write_text(text)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for name, path in (extras or {}).items():
                shutil.copyfile(path, staging / name)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        return output.path


def read_manifest(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelPathError(f"{file} is not valid JSON ({exc}); restore it or remove it to load the model as is") from None
    problem = "it is not a JSON object" if not isinstance(manifest, dict) else _manifest_problem(manifest)
    if problem:
        raise ModelPathError(f"{file} is not a secateur manifest ({problem}); restore it or remove it to load the "
                             "model as is")
    return manifest


SECTIONS = {"source": dict, "origin": dict, "recipe": dict, "history": list, "structure": dict, "evaluation": dict,
            "calibration": dict, "timings": dict}  # fmt: skip


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest unusable (the sections secateur reads, of the wrong type), or None."""
    for key, kind in SECTIONS.items():
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], kind):
            return f"{key} is {type(manifest[key]).__name__}, not {kind.__name__}"
    for number, record in enumerate(manifest.get("history") or [], 1):
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            return f"history entry {number} has no kind"
        if not isinstance(record.get("settings", {}), dict) or not isinstance(record.get("result", {}), dict):
            return f"history entry {number} has malformed settings or result"
    section = structure_section(manifest)
    return next((problem for s in structures() if (problem := s.problem(section))), None)


def structure_section(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest's structure section (read from the layout of earlier versions where it has none)."""
    if manifest.get("structure") is not None:
        return manifest["structure"]
    return {key: value for s in structures() for key, value in s.legacy(manifest).items()}


Recorded = list[tuple[Any, Any]]  # (structure hook, what it rebuilds), for the kinds that left something


def structures():
    from secateur.recipe import structures as registered  # the kinds register their hooks there

    return registered()


def load(path: str | Path, dtype: str = "float32", device: str = "cpu",
         allow_nonfinite: bool = False) -> tuple[nn.Module, Any]:
    """Load any secateur output (or any model): `load_model`, or, where the manifest records shapes the
    stock config alone cannot express (the kinds' structure hooks: removed branches, per-block widths),
    the model built empty from its config, reshaped as recorded, then its weights. The weight files are
    checked against the config first (block count, shapes, truncation), and the weights for NaN / Inf
    (unless `allow_nonfinite`)."""
    recorded = check_model(path)
    if recorded:
        model, tokenizer = _load_reshaped(Path(path), dtype, device, recorded)
    else:
        model, tokenizer = load_model(path, dtype=dtype, device=device)
    check_finite(model, f"the model {path}", allow_nonfinite)
    return model, tokenizer


def check_model(path: str | Path) -> Recorded:
    """Read a model directory's manifest and check its weight files against its config, without loading
    a weight (commands call it before any work); returns what the manifest's structure section asks a
    loader to rebuild."""
    split_model_path(Path(path))
    manifest = (read_manifest(path) if Path(path).is_dir() else None) or {}
    section = structure_section(manifest)
    recorded = [(s, needed) for s in structures() if (needed := s.needed(section)) is not None]
    if Path(path).is_dir():
        check_weight_files(Path(path), recorded)
    return recorded


class NonFiniteError(SecateurError):
    """Weights hold NaN or Inf."""


def nonfinite(model: nn.Module) -> list[tuple[str, int]]:
    """(name, count) of every parameter holding NaN or Inf values."""
    counts = ((name, int((~torch.isfinite(p)).sum())) for name, p in model.named_parameters() if p.is_floating_point())
    return [(name, count) for name, count in counts if count]


def check_finite(model: nn.Module, what: str, allow: bool = False,
                 advice: str = "fix the checkpoint, or pass --allow-nonfinite to go on anyway") -> None:
    """Refuse weights with NaN or Inf values (they prune, train and export to garbage without a word)."""
    bad = nonfinite(model)
    if bad and not allow:
        name, count = bad[0]
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        raise NonFiniteError(f"{what} has non-finite weights ({count:,} NaN/Inf values in {name}{more}); {advice}")


# --- weight files against the config -------------------------------------------------------------------

BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def safetensors_header(file: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """(where the data starts, {name: {"dtype", "shape", "data_offsets"}}) from a safetensors file's
    header, after checking the file holds all the bytes it promises."""
    try:
        with open(file, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                raise ModelPathError(f"{file} is truncated or not a safetensors file ({size:,} bytes); restore it")
            header = json.loads(handle.read(length))
    except OSError as exc:
        raise ModelPathError(f"cannot read {file}: {exc.strerror}; check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelPathError(f"{file} is not a safetensors file (its header is not JSON); restore it") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        malformed = any(not isinstance(v["shape"], list) or not isinstance(v["dtype"], str) for v in tensors.values())
    except (KeyError, TypeError, IndexError):
        malformed = True
    if malformed:
        raise ModelPathError(f"{file} is not a safetensors file (malformed header); restore it")
    if 8 + length + end > size:
        raise ModelPathError(f"{file} is truncated: {size:,} bytes where its header needs {8 + length + end:,}; "
                             "restore it (an interrupted copy or download?)")
    return 8 + length, tensors


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header, after checking the file holds all their bytes."""
    return {name: list(entry["shape"]) for name, entry in safetensors_header(file)[1].items()}


def _skeleton(path: Path, recorded: Recorded, dtype: torch.dtype | None = None) -> nn.Module:
    """The model `path`'s config (and recorded structure) describes, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    adapter_for(config)  # an unsupported family is refused here
    with init_empty_weights(include_buffers=False), _quiet_missing_weights():
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype is not None else {}))
    for structure, needed in recorded:
        structure.rebuild(model, needed)
    return model


def _as_loaded(model: nn.Module, found: dict[str, Any]) -> dict[str, Any] | None:
    """File keys (of shapes or tensors) under the names transformers gives them on load (its renamings, e.g. GPT-NeoX's
    embed_out -> lm_head); None where a conversion merges or splits tensors."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
    except (ImportError, TypeError, AttributeError):  # another transformers: the names as stored
        return found
    if any(not isinstance(t, WeightRenaming) for t in transforms):
        return None
    renamed = {}
    for key, shape in found.items():
        for transform in transforms:
            key, _ = transform.rename_source_key(key)
        renamed[key] = shape
    return renamed


def renamed_on_load(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Stored tensor name -> the name transformers' renamings give it on load (GPT-NeoX's embed_out ->
    lm_head), for the keys a renaming changes; tensors it merges or splits are left out."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except (ImportError, TypeError, AttributeError):  # another transformers: the names as stored
        return {}
    renamed = {}
    for key in keys:
        loaded = key
        for transform in renamings:
            loaded, _ = transform.rename_source_key(loaded)
        if loaded != key:
            renamed[key] = loaded
    return renamed


def check_weight_files(path: Path, recorded: Recorded = ()) -> None:
    """Refuse a model directory whose safetensors files are truncated or unreadable, or disagree with
    its config.json: another block count, a missing tensor, another shape (transformers would fill the
    gap with random weights, or stop with a traceback)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return  # other formats are left to transformers
    found: dict[str, list[int]] = {}
    for file in files:
        found.update(safetensors_shapes(file))
    model = _skeleton(path, list(recorded))
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    found = _as_loaded(model, found)
    if found is None:
        return  # tensors that transformers fuses or splits on load: their shapes are its to check
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not any(k.startswith(prefix) for k in found):  # hub checkpoints of GPT-2, OPT
        expected = {k.removeprefix(prefix): v for k, v in expected.items()}
    blocks = model.config.num_hidden_layers
    held = {int(m.group(1)) for k in found if (m := BLOCK_KEY.search(k))}
    if held and len(held) != blocks:
        raise ModelPathError(f"{path}: config.json says {blocks} blocks and the weights hold {len(held)}; the config "
                             "does not describe these weights (fix config.json or restore the weights)")
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in expected if k not in found and not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ModelPathError(f"{path}: the weights lack {missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, "
                             "which config.json describes; restore the weights or fix config.json")
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            raise ModelPathError(f"{path}: {key} is {tuple(found[key])} in the weights and {tuple(shape)} in "
                                 "config.json; restore the weights or fix config.json")


def _load_reshaped(path: Path, dtype: str, device: str, recorded: Recorded) -> tuple[nn.Module, Any]:
    """Load through transformers (its renamings and tensor fusions included) into the stock class
    shaped as recorded: a subclass, made here, reshapes the model right after the stock `__init__`,
    before the weights load; the model is an instance of the stock class again afterwards."""
    from transformers import AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_config(path)
    stock = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    class Reshaped(stock):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            for structure, needed in recorded:
                structure.rebuild(self, needed)

    for name in ("__name__", "__qualname__", "__module__"):  # transformers finds a family's conversions by these
        setattr(Reshaped, name, getattr(stock, name))
    with _quiet_missing_weights():
        model, info = Reshaped.from_pretrained(path, config=config, dtype=resolve_dtype(dtype), output_loading_info=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k.endswith("lm_head.weight"))]
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", ())]
    wrong = [*missing, *info.get("unexpected_keys", ()), *mismatched]
    if wrong:
        raise ModelPathError(f"{path}: weights do not match the recorded structure ({sorted(map(str, wrong))[:3]}); "
                             "restore the weights or the manifest")
    model.__class__ = stock
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
