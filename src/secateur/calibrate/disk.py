"""Models larger than memory: decoder blocks read from the input's safetensors when a streamed pass
reaches them and written to the output's shards as soon as they are done.

`DiskBlocks.open(path)` builds the model on the meta device (buffers such as rotary tables computed as
usual) and loads only what lies outside the blocks and is needed to reach them (the input
embeddings; a tied head shares them). A streamed pass (`calibrate.stream.stream_blocks(...,
store=blocks)`) then calls `enter(i)`: block i's tensors are read from the memory-mapped shards (the
next block's already, in a background thread, while this one computes) and placed on the device; and
`leave(i)`: block i is written to its own output shard and goes back to the meta device. Peak host
memory is about the embeddings plus two blocks plus the calibration activations, whatever the depth.

`finish()` writes what lies outside the blocks, copied tensor by tensor from the input (a one-shot
sparsity stage leaves it unchanged), renames the shards to transformers' `model-0000i-of-0000n`
names and writes their index, so stock `from_pretrained` loads the output.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from secateur.errors import SecateurError
from secateur.models import Adapter, adapter_for

INDEX = "model.safetensors.index.json"


class DiskError(SecateurError):
    """The checkpoint cannot be streamed from disk."""


def weight_map(path: Path) -> dict[str, Path]:
    """Every tensor name of a HF checkpoint directory and the safetensors file holding it."""
    index = path / INDEX
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise DiskError(f"{path} holds no safetensors weights (model.safetensors or {INDEX}); streaming from disk "
                        f"reads safetensors only: convert it with save_pretrained first")
    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def read(files: dict[str, Path], names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The named tensors, read from their (memory-mapped) files and cast to `dtype`."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors = {}
    for file, group in by_file.items():
        with safe_open(file, "pt") as handle:
            for name in group:
                tensor = handle.get_tensor(name)
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


@dataclass
class DiskBlocks:
    """The blocks of a model that stays on disk, read and written one at a time (see the module docstring)."""

    model: nn.Module
    adapter: Adapter
    files: dict[str, Path]  # input tensor name -> its file
    dtype: torch.dtype
    staging: Path | None = None  # where finished blocks are written (None: nowhere, read only)
    written: list[Path] = field(default_factory=list)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    _ahead: dict[int, Future] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, dtype: torch.dtype, staging: Path | None = None) -> DiskBlocks:
        from secateur.io import _skeleton

        path = Path(path)
        model = _skeleton(path, (), dtype)
        adapter = adapter_for(model)
        files = weight_map(path)
        store = cls(model, adapter, files, dtype, staging)
        store._check_names()
        store._load_outside()
        model.eval()
        return store

    def _load_outside(self) -> None:
        """What the blocks' inputs are computed from: every tensor outside the blocks but the output head's
        (embeddings, positions, projections, norms; a tied head comes with the embeddings)."""
        head = self.model.get_output_embeddings()
        skip = {id(p) for p in head.parameters()} - {id(self.model.get_input_embeddings().weight)}
        prefix = f"{self.adapter.blocks}."
        wanted = [(name, p) for name, p in self.model.named_parameters()
                  if not name.startswith(prefix) and id(p) not in skip]  # fmt: skip
        missing = [name for name, _ in wanted if name not in self.files]
        if missing:
            raise DiskError(f"the checkpoint stores no tensor {missing[0]!r} (renamed on load?): it cannot be "
                            f"streamed block by block; load it in memory")
        tensors = read(self.files, [name for name, _ in wanted], self.dtype)
        for name, _ in wanted:
            module_name, _, leaf = name.rpartition(".")
            self.model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensors[name], requires_grad=False)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()

    def _check_names(self) -> None:
        """The blocks' tensors must be stored under the names the model gives them (no renaming)."""
        wanted = {f"{self.adapter.blocks}.{name}" for name, _ in self.adapter.block_list(self.model).named_parameters()}
        missing = sorted(wanted - set(self.files))
        if missing:
            raise DiskError(f"the checkpoint stores no tensor {missing[0]!r} ({len(missing)} block tensors missing or "
                            f"renamed): it cannot be streamed block by block; load it in memory")

    def names(self, index: int) -> list[str]:
        block = self.adapter.block_list(self.model)[index]
        return [f"{self.adapter.blocks}.{index}.{name}" for name, _ in block.named_parameters()]

    def prefetch(self, index: int) -> None:
        if 0 <= index < len(self.adapter.block_list(self.model)) and index not in self._ahead:
            self._ahead[index] = self._pool.submit(read, self.files, self.names(index), self.dtype)

    def enter(self, index: int, device: torch.device) -> nn.Module:
        """Block `index` with its weights, on `device`; the next block starts loading."""
        self.prefetch(index)
        tensors = self._ahead.pop(index).result()
        self.prefetch(index + 1)
        block = self.adapter.block_list(self.model)[index]
        prefix = f"{self.adapter.blocks}.{index}."
        for name, tensor in tensors.items():
            module_name, _, leaf = name[len(prefix):].rpartition(".")
            module = block.get_submodule(module_name)
            module._parameters[leaf] = nn.Parameter(tensor.to(device), requires_grad=False)
        return block

    def leave(self, index: int) -> None:
        """Write block `index` to its own shard (when writing) and send it back to the meta device."""
        block = self.adapter.block_list(self.model)[index]
        if self.staging is not None:
            prefix = f"{self.adapter.blocks}.{index}."
            tensors = {prefix + name: p.detach().to("cpu").contiguous() for name, p in block.named_parameters()}
            file = self.staging / f"block-{index:05d}.safetensors"
            save_file(tensors, file, metadata={"format": "pt"})
            self.written.append(file)
        block.to("meta")

    def finish(self) -> None:
        """The tensors outside the blocks, copied from the input a shard of at most SHARD bytes at a time;
        shard names and index as transformers writes them."""
        self._pool.shutdown()
        self.model.to("meta")  # the embeddings are read again below, with the rest
        prefix = f"{self.adapter.blocks}."
        outside = sorted(name for name in self.files if not name.startswith(prefix))
        shards, group, size = [], [], 0
        for name in [*outside, None]:
            if group and (name is None or size >= SHARD):
                shards.append(self.staging / f"rest-{len(shards):05d}.safetensors")
                save_file({n: t.contiguous() for n, t in read(self.files, group, self.dtype).items()}, shards[-1],
                          metadata={"format": "pt"})  # fmt: skip
                group, size = [], 0
            if name is not None:
                group.append(name)
                size += _bytes(self.files[name], name)
        shards += self.written
        mapping, total = {}, 0
        for i, shard in enumerate(shards):
            final = self.staging / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            shard.rename(final)
            with safe_open(final, "pt") as handle:
                for name in handle.keys():
                    mapping[name] = final.name
                    total += _bytes(final, name, handle)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
        (self.staging / INDEX).write_text(json.dumps(index, indent=2))

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


SHARD = 2**30  # bytes of tensors outside the blocks per output shard
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _bytes(file: Path, name: str, handle=None) -> int:
    """A stored tensor's size in bytes, from the file's header."""
    if handle is None:
        with safe_open(file, "pt") as opened:
            return _bytes(file, name, opened)
    sliced = handle.get_slice(name)
    return math.prod(sliced.get_shape()) * ITEMSIZE[sliced.get_dtype()]
