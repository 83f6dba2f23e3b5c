"""Export to the engines people run: GGUF for llama.cpp, ollama and LM Studio."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateur.export.gguf import MANIFEST_KEY, TYPES, ExportError, Shape, file_bytes, model_shape, write_gguf
from secateur.export.vocab import LLAMA_CPP_PRE_TOKENIZERS
from secateur.output import claim
from secateur.schema import option

__all__ = ["MANIFEST_KEY", "TYPES", "ExportConfig", "ExportError", "Shape", "export_gguf", "model_shape"]


@dataclass(frozen=True)
class ExportConfig:
    """How `secateur export` writes the file; its flags are generated from these fields."""

    type: str = option("f16", "weight type of 2-D tensors (norms and biases stay f32)", choices=lambda: tuple(TYPES))
    tokenizer_pre: str | None = option(None, "llama.cpp's pre-tokenizer name, for a tokenizer secateur does not "
                                             "recognise (default: copied from the source GGUF or recognised)")


def export_gguf(model_path: str | Path, out: str | Path, kind: str = "f16", overwrite: bool = False,
                tokenizer_pre: str | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Write any secateur output (or HF model) of an exportable family as one GGUF file, its manifest
    in the metadata; returns the export record (layout, type, tokenizer origin, bytes)."""
    from secateur.export.vocab import vocabulary
    from secateur.io import load, read_manifest, split_model_path

    if kind not in TYPES:
        raise ExportError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    if tokenizer_pre is not None and tokenizer_pre not in LLAMA_CPP_PRE_TOKENIZERS:
        raise ExportError(f"--tokenizer-pre {tokenizer_pre!r} is not a pre-tokenizer llama.cpp knows; give one of "
                          f"{', '.join(sorted(LLAMA_CPP_PRE_TOKENIZERS))}")
    path = Path(model_path)
    split_model_path(path)  # a missing or non-model path is said as such, first
    with claim(out, inputs=[model_path], overwrite=overwrite, shape="file", flag="--gguf", suffix=".gguf",
               magic=b"GGUF") as output:  # fmt: skip
        if not path.is_dir():
            raise ExportError(f"{path}: give a HF model directory or secateur output (a GGUF file is already GGUF)")
        manifest = read_manifest(path)
        model, tokenizer = load(path, allow_nonfinite=allow_nonfinite)
        shape = model_shape(model)  # refusals before anything is written
        vocab = vocabulary(tokenizer, path, int(model.config.vocab_size), manifest, tokenizer_pre)
        record = {"format": "gguf", "type": kind, "arch": shape.arch, "tokenizer": vocab.origin,
                  "heads": shape.heads, "kv_heads": shape.kv_heads, "channels": shape.channels,
                  "stub_mlps": shape.stub_mlps}  # fmt: skip
        document = {**(manifest or {}), "export": record}
        with output.write(size=file_bytes(model, kind)) as staging:
            write_gguf(model, shape, staging, kind, document, vocab, name=path.name)
            record["bytes"] = staging.stat().st_size
    return record
