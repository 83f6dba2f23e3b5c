"""Models larger than memory: decoder blocks read from the input's safetensors when a streamed pass
reaches them and written to the output's shards as soon as they are done.

`DiskBlocks.open(path)` builds the model on the meta device (buffers such as rotary tables computed as
usual) and loads only what lies outside the blocks and is needed to reach them (the input
embeddings; a tied head shares them). A streamed pass (`calibrate.stream.stream_blocks(...,
store=blocks)`) then calls `enter(i)`: block i's tensors are read from the memory-mapped shards (the
next block's already, in a background thread, while this one computes) and placed on the device; and
`leave(i)`: block i is written to its own output shard and goes back to the meta device. Peak host
memory is about the embeddings plus two blocks plus the calibration activations, whatever the depth.

With a work directory (`work`), finished blocks are written there instead, and every SAVE_EVERY
seconds the activations entering the next block and what the finished blocks reported (`reached`):
a run killed at any point goes on from there (`resume_point`), writing what an uninterrupted run
would, bit for bit; the blocks move into the output at the end.

`finish()` writes what lies outside the blocks, copied tensor by tensor from the input (a one-shot
sparsity stage leaves it unchanged), renames the shards to transformers' `model-0000i-of-0000n`
names and writes their index, so stock `from_pretrained` loads the output.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from secateur.errors import SecateurError
from secateur.models import Adapter, adapter_for
from secateur.runtime import release_free_memory

INDEX = "model.safetensors.index.json"
STATE = "state.pt"  # in the work directory: where a resumed run starts
SAVE_EVERY = 60.0  # seconds between saves of the activations (a resumed run redoes at most about this much)


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
    """The named tensors, read from their files into one buffer of their own, floating-point ones cast
    to `dtype`. The buffer is an anonymous mapping, outside the allocator's heap: a block's weights go
    back to the system as one piece when its last view dies (as separate heap tensors, interleaved
    with the pruning's temporaries, they fragment the heap and resident memory creeps up block after
    block). The bytes are read with plain reads, not through safetensors' memory map, whose pages
    would count as resident while the file is open (a whole block more, at the pruning's peak)."""
    layout, total = {}, 0  # name -> (offset in the buffer, shape, stored dtype, dtype, byte range in its file)
    headers: dict[Path, tuple[int, dict]] = {}
    for name in names:
        file = files[name]
        if file not in headers:
            headers[file] = _read_header(file)
        start, header = headers[file]
        entry = header[name]
        stored, shape = _TORCH[entry["dtype"]], entry["shape"]
        kind = dtype if stored.is_floating_point else stored
        begin, end = entry["data_offsets"]
        layout[name] = (total, shape, stored, kind, (start + begin, start + end))
        total += -(-math.prod(shape) * kind.itemsize // ALIGN) * ALIGN
    buffer = torch.frombuffer(mmap.mmap(-1, max(total, 1)), dtype=torch.uint8)  # unmapped with its last view
    tensors = {}
    for name in names:
        offset, shape, stored, kind, (begin, end) = layout[name]
        view = buffer[offset : offset + math.prod(shape) * kind.itemsize].view(kind).view(shape)
        target = view if stored == kind else torch.empty(shape, dtype=stored)
        with open(files[name], "rb") as handle:
            handle.seek(begin)
            handle.readinto(memoryview(target.reshape(-1).view(torch.uint8).numpy()))
        if target is not view:
            view.copy_(target)
        tensors[name] = view
    return tensors


def _read_header(file: Path) -> tuple[int, dict]:
    """A safetensors file's header and where its data starts."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return 8 + length, json.loads(handle.read(length))


ALIGN = 64  # bytes: each tensor of a read starts at a multiple (what the allocator would give it)
PIECE = 1 << 26  # bytes copied at a time when a tensor goes from the input's file to the output's


def _header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """A safetensors header for (name, dtype, shape, bytes) in this order, padded to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, size in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory (safetensors' save_file
    first serialises the whole file into one bytes object: a second copy of a block)."""
    items = [(name, t.detach().to("cpu").contiguous()) for name, t in tensors.items()]
    entries = [(name, _SAFE[t.dtype], list(t.shape), t.numel() * t.element_size()) for name, t in items]
    with open(file, "wb") as handle:
        handle.write(_header(entries))
        for _, tensor in items:
            handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def copy_tensors(files: dict[str, Path], names: list[str], dtype: torch.dtype, file: Path) -> None:
    """The named tensors of the input into one safetensors file, floating-point ones as `dtype`, a piece
    at a time: bytes copied as they are where the type is kept, rows converted where it changes."""
    entries, sources = [], []
    for name in names:
        with safe_open(files[name], "pt") as handle:
            sliced = handle.get_slice(name)
            stored, shape = _TORCH[sliced.get_dtype()], sliced.get_shape()
        kind = dtype if stored.is_floating_point else stored
        entries.append((name, _SAFE[kind], shape, math.prod(shape) * kind.itemsize))
        sources.append((files[name], name, stored, kind, shape))
    with open(file, "wb") as out:
        out.write(_header(entries))
        for source, name, stored, kind, shape in sources:
            if stored == kind:
                start, end = _data_range(source, name)
                with open(source, "rb") as handle:
                    handle.seek(start)
                    for left in range(end - start, 0, -PIECE):
                        out.write(handle.read(min(PIECE, left)))
                continue
            rows = max(1, PIECE // max(math.prod(shape[1:]) * 4, 1)) if len(shape) > 1 else None
            with safe_open(source, "pt") as handle:
                sliced = handle.get_slice(name)
                parts = [sliced[a : a + rows] for a in range(0, shape[0], rows)] if rows else [handle.get_tensor(name)]
                for part in parts:
                    out.write(memoryview(part.to(kind).contiguous().reshape(-1).view(torch.uint8).numpy()))


def _data_range(file: Path, name: str) -> tuple[int, int]:
    """Where a tensor's bytes lie in a safetensors file."""
    start, header = _read_header(file)
    begin, end = header[name]["data_offsets"]
    return start + begin, start + end


@dataclass
class DiskBlocks:
    """The blocks of a model that stays on disk, read and written one at a time (see the module docstring)."""

    model: nn.Module
    adapter: Adapter
    files: dict[str, Path]  # input tensor name -> its file
    dtype: torch.dtype
    staging: Path | None = None  # where finished blocks are written (None: nowhere, read only)
    work: Path | None = None  # where they are written instead, with the state a resumed run starts from
    _pending: dict | None = None  # the state after the last finished block, not saved yet
    _saved_at: float = field(default_factory=time.monotonic)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    _ahead: dict[int, Future] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, dtype: torch.dtype, staging: Path | None = None,
             work: Path | None = None) -> DiskBlocks:  # fmt: skip
        from secateur.io import _skeleton

        path = Path(path)
        release_free_memory()  # what came before (the calibration text's tokens) leaves no high-water mark
        model = _skeleton(path, (), dtype)
        adapter = adapter_for(model)
        files = weight_map(path)
        store = cls(model, adapter, files, dtype, staging, work)
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
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

    def captured(self) -> None:
        """The blocks' inputs are captured: the tensors outside the blocks (the embeddings above all) go
        back to the meta device; `finish` copies them to the output from the input."""
        blocks = {id(p) for p in self.adapter.block_list(self.model).parameters()}
        for module in self.model.modules():
            for leaf, param in list(module._parameters.items()):
                if param is not None and id(param) not in blocks and not param.is_meta:
                    module._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=False)
        release_free_memory()

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
        """Write block `index` to its own shard (when writing), save the state when due, and send the
        block back to the meta device."""
        block = self.adapter.block_list(self.model)[index]
        if self.staging is not None:
            prefix = f"{self.adapter.blocks}.{index}."
            file = self._block_file(index)
            save_tensors({prefix + name: p for name, p in block.named_parameters()}, file.with_suffix(".tmp"))
            os.replace(file.with_suffix(".tmp"), file)
        block.to("meta")
        release_free_memory()
        if self.work is not None and self._pending is not None and self._pending["index"] == index + 1:
            if time.monotonic() - self._saved_at >= SAVE_EVERY:
                torch.save(self._pending, self.work / (STATE + ".tmp"))
                os.replace(self.work / (STATE + ".tmp"), self.work / STATE)
                self._saved_at = time.monotonic()
            self._pending = None

    def _block_file(self, index: int) -> Path:
        return (self.work or self.staging) / f"block-{index:05d}.safetensors"

    def reached(self, index: int, hidden: list[Tensor], reports: list[dict], errors: list[float]) -> None:
        """The activations entering block `index` and what the blocks before it reported: saved with the
        block before it, when due."""
        if self.work is not None:
            self._pending = {"index": index, "hidden": [h.to("cpu") for h in hidden], "reports": reports,
                             "errors": errors}  # fmt: skip

    def resume_point(self) -> dict | None:
        """The state an interrupted run saved last (None: start from the first block)."""
        if self.work is None or not (self.work / STATE).is_file():
            return None
        return torch.load(self.work / STATE, weights_only=True)

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
                copy_tensors(self.files, group, self.dtype, shards[-1])
                group, size = [], 0
            if name is not None:
                group.append(name)
                size += _bytes(self.files[name], name)
        shards += [self._block_file(i) for i in range(len(self.adapter.block_list(self.model)))]
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
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # fmt: skip
ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _bytes(file: Path, name: str, handle=None) -> int:
    """A stored tensor's size in bytes, from the file's header."""
    if handle is None:
        with safe_open(file, "pt") as opened:
            return _bytes(file, name, opened)
    sliced = handle.get_slice(name)
    return math.prod(sliced.get_shape()) * ITEMSIZE[sliced.get_dtype()]
_SAFE = {dtype: name for name, dtype in _TORCH.items()}
