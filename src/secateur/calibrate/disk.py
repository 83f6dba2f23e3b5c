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
from safetensors.torch import save_file
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
    """The named tensors, read from their (memory-mapped) files into one buffer of their own, floating-
    point ones cast to `dtype`. The buffer is an anonymous mapping, outside the allocator's heap: a
    block's weights go back to the system as one piece when its last view dies (as separate heap
    tensors, interleaved with the pruning's temporaries, they fragment the heap and resident memory
    creeps up block after block). safetensors' own tensors are views of a copy-on-write mapping of
    the whole file, which must not outlive the read."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    layout, total = {}, 0  # name -> (offset, shape, dtype)
    for file, group in by_file.items():
        with safe_open(file, "pt") as handle:
            for name in group:
                sliced = handle.get_slice(name)
                stored = _TORCH[sliced.get_dtype()]
                kind = dtype if stored.is_floating_point else stored
                layout[name] = (total, sliced.get_shape(), kind)
                total += -(-math.prod(sliced.get_shape()) * kind.itemsize // ALIGN) * ALIGN
    buffer = torch.frombuffer(mmap.mmap(-1, max(total, 1)), dtype=torch.uint8)  # unmapped with its last view
    tensors = {}
    for file, group in by_file.items():
        with safe_open(file, "pt") as handle:
            for name in group:
                offset, shape, kind = layout[name]
                view = buffer[offset : offset + math.prod(shape) * kind.itemsize].view(kind).view(shape)
                view.copy_(handle.get_tensor(name))
                tensors[name] = view
    return tensors


ALIGN = 64  # bytes: each tensor of a read starts at a multiple (what the allocator would give it)


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
            tensors = {prefix + name: p.detach().to("cpu").contiguous() for name, p in block.named_parameters()}
            file = self._block_file(index)
            save_file(tensors, file.with_suffix(".tmp"), metadata={"format": "pt"})
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
                save_file({n: t.contiguous() for n, t in read(self.files, group, self.dtype).items()}, shards[-1],
                          metadata={"format": "pt"})  # fmt: skip
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
