"""Export to the engines people run: GGUF for llama.cpp, ollama and LM Studio."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from secateur.errors import OutputError
from secateur.export.gguf import MANIFEST_KEY, TYPES, ExportError, Shape, model_shape, write_gguf

__all__ = ["MANIFEST_KEY", "TYPES", "ExportError", "Shape", "check_gguf_output", "export_gguf", "model_shape"]


def check_gguf_output(out: str | Path, overwrite: bool, source: str | Path) -> Path:
    """Refuse before any work: a name without .gguf, an existing file (unless asked to overwrite),
    the input itself, a directory, or an unwritable place."""
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise OutputError(f"--gguf {out}: the file name must end in .gguf")
    if out.resolve() == Path(source).resolve():
        raise OutputError(f"--gguf {out} is the input model; choose another file")
    if out.is_dir():
        raise OutputError(f"--gguf {out} is a directory; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {parent} is not a writable directory")
    return out


def export_gguf(model_path: str | Path, out: str | Path, kind: str = "f16", overwrite: bool = False,
                tokenizer_pre: str | None = None) -> dict[str, Any]:
    """Write any secateur output (or HF model) of an exportable family as one GGUF file, its manifest
    in the metadata; returns the export record (layout, type, tokenizer origin, bytes)."""
    from secateur.export.vocab import vocabulary
    from secateur.io import load, read_manifest

    if kind not in TYPES:
        raise ExportError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    out = check_gguf_output(out, overwrite, model_path)
    path = Path(model_path)
    if not path.is_dir():
        raise ExportError(f"{path}: give a HF model directory or secateur output (a GGUF file is already GGUF)")
    manifest = read_manifest(path)
    model, tokenizer = load(path)
    shape = model_shape(model)  # refusals before anything is written
    vocab = vocabulary(tokenizer, path, int(model.config.vocab_size), manifest, tokenizer_pre)
    record = {"format": "gguf", "type": kind, "arch": shape.arch, "tokenizer": vocab.origin,
              "heads": shape.heads, "kv_heads": shape.kv_heads, "channels": shape.channels,
              "stub_mlps": shape.stub_mlps}  # fmt: skip
    document = {**(manifest or {}), "export": record}
    write_gguf(model, shape, out, kind, document, vocab, name=path.name)
    record["bytes"] = out.stat().st_size
    return record
