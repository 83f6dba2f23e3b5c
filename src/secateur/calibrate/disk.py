"""Models larger than memory: decoder blocks read from the input's safetensors when a streamed pass
reaches them and written to the output's shards as soon as they are done.

`DiskBlocks.open(path)` builds the model on the meta device (buffers such as rotary tables computed as
usual) and loads only what lies outside the blocks and is needed to reach them (the input
embeddings; a tied head shares them), dropped again once the first block's inputs are captured.
The model carries its store (`disk_store`), so any streamed pass over it
(`calibrate.stream.stream_blocks`) calls `enter(i)`: block
i's tensors are read from the input (the next block's already, in a background thread, while this
one computes) and placed on the device; and `leave(i)`: block i is written to its own output shard
and goes back to the meta device. Peak host memory is about two blocks plus the calibration
activations plus the pruning's temporaries, whatever the depth.

With a work directory (`work`), finished blocks are written there instead, and every SAVE_EVERY
seconds the activations entering the next block and what the finished blocks reported (`reached`):
a run killed at any point goes on from there (`resume_point`), writing what an uninterrupted run
would, bit for bit; the blocks move into the output at the end.

`finish()` writes what lies outside the blocks, copied from the input a piece at a time (a one-shot
sparsity stage leaves it unchanged), renames the shards to transformers' `model-0000i-of-0000n`
names and writes their index, so stock `from_pretrained` loads the output.

A block's tensors are read as its checkpoint stores them (`calibrate.layout`: a mixture's fused
experts from one matrix per expert and projection, straight into their slices) and written back in
that layout; its persistent buffers (DeepSeek-V3's router bias) go with its parameters.

Every tensor is read and written with plain file reads and writes at the offsets the safetensors
headers give (`io.safetensors_header`): safetensors' own `get_tensor` hands out views of a
copy-on-write mapping of the whole file (its pages resident while any view lives) and its
`save_file` serialises a whole file into one bytes object first.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from secateur.calibrate.layout import Layout, Piece, layout_of
from secateur.calibrate.processes import require_single
from secateur.errors import SecateurError
from secateur.io import renamed_on_load, safetensors_header
from secateur.models import Adapter, adapter_for
from secateur.models.linear_experts import stock_parameters
from secateur.runtime import release_free_memory
from secateur.output import save_whole

INDEX = "model.safetensors.index.json"
STATE = "state.pt"  # in the work directory: where a resumed run starts
SAVE_EVERY = 60.0  # seconds between saves of the activations (a resumed run redoes at most about this much)
SHARD = 2**30  # bytes of tensors outside the blocks per output shard
ALIGN = 64  # bytes: each tensor of a read starts at a multiple (what the allocator would give it)
PIECE = 1 << 26  # bytes copied or converted at a time when a tensor goes from the input's file to the output's
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}  # fmt: skip
_SAFE = {dtype: name for name, dtype in _TORCH.items()}

# what a HF directory holds besides config and weights, copied as they are
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")  # fmt: skip
Headers = dict[Path, tuple[int, dict[str, dict[str, Any]]]]  # file -> (where its data starts, its entries)
_STORE = "_secateur_disk"  # the attribute of a model whose blocks stay on disk: its DiskBlocks


def disk_store(model: nn.Module) -> "DiskBlocks | None":
    """The store of a model whose blocks stay on disk (`DiskBlocks.open`); None for a model in memory."""
    return getattr(model, _STORE, None)


def has_state(work: Path) -> bool:
    """Whether a streamed run's work directory holds a state to resume from (each streamed kind saves
    one `*.pt` there: `state.pt` for sparsity, `depth.pt` for depth, `width.pt` for width, `vocabulary.pt`; a recipe's
    stage, in its own `stage-i.work`), or a recipe's finished intermediate model (`stage-i`)."""
    return work.is_dir() and (any(work.rglob("*.pt")) or any(work.glob("stage-*/secateur.json")))


def block_tensors(block: nn.Module, adapter: Adapter) -> Iterator[tuple[str, Tensor]]:
    """What a checkpoint stores of a block, by block-relative name: its own parameters and its
    persistent buffers (DeepSeek-V3's router correction bias)."""
    yield from stock_parameters(block, adapter)
    for module_name, module in block.named_modules():
        for leaf, buffer in module._buffers.items():
            if buffer is not None and leaf not in module._non_persistent_buffers_set:
                yield f"{module_name}.{leaf}" if module_name else leaf, buffer


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
    return {name: single for name in safetensors_header(single)[1]}


def write_side_files(path: Path, staging: Path, model: nn.Module, dtype: torch.dtype, tokenizer: Any = None) -> None:
    """What the output holds besides its weights: the config of `model` (the output's, on the meta
    device, with weights of `dtype`), the module that builds per-block shapes where it has them
    (`models.remote`), and the input's tokenizer and generation files there are, as they are; with
    `tokenizer` (a stage rewrote it), that tokenizer and `model`'s generation config instead."""
    import shutil

    from secateur.models import remote

    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the passes sent head and embeddings to the meta device one by one
    model.config.dtype = dtype
    files = remote.save_files(model)  # re-derives a declaration (completes the config) or drops a stale one
    model.config.save_pretrained(staging)
    for name, text in files.items():
        (staging / name).write_text(text)
    if tokenizer is not None:
        if (path / "generation_config.json").is_file():
            model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        return
    for name in SIDE_FILES:
        if (path / name).is_file():
            shutil.copyfile(path / name, staging / name)


def stored_shapes(path: Path) -> dict[str, list[int]]:
    """Every stored tensor's shape, from the headers of a checkpoint directory's safetensors files."""
    return {name: list(entry["shape"]) for _, entries in headers_of(weight_map(path)).values()
            for name, entry in entries.items()}  # fmt: skip


def stored_bytes(path: Path) -> int:
    """The size of a checkpoint directory's safetensors files."""
    return sum(file.stat().st_size for file in set(weight_map(path).values()))


def headers_of(files: dict[str, Path]) -> Headers:
    """The header of every file a weight map names, read once."""
    return {file: safetensors_header(file) for file in set(files.values())}


def _entry(files: dict[str, Path], headers: Headers, name: str) -> tuple[Path, torch.dtype, list[int], int]:
    """(file, stored dtype, shape, where its bytes start) of a stored tensor."""
    file = files[name]
    start, entries = headers[file]
    entry = entries[name]
    return file, _TORCH[entry["dtype"]], list(entry["shape"]), start + entry["data_offsets"][0]


def _read_into(file: Path, offset: int, target: Tensor) -> None:
    """Fill the contiguous `target` with the bytes at `offset` of `file`."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        handle.readinto(memoryview(target.reshape(-1).view(torch.uint8).numpy()))


Wanted = dict[str, tuple[tuple[int, ...], list[Piece]]]  # tensor name -> (its shape, its stored pieces)


def read(files: dict[str, Path], headers: Headers, names: list[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The named stored tensors (see `read_pieces`)."""
    return read_pieces(files, headers, {n: (tuple(_entry(files, headers, n)[2]), [(n, None)]) for n in names}, dtype)


def read_pieces(files: dict[str, Path], headers: Headers, wanted: Wanted, dtype: torch.dtype) -> dict[str, Tensor]:
    """The wanted tensors, each assembled from its stored pieces (`calibrate.layout`: a fused tensor
    read expert by expert into its slices), read into one buffer of their own, floating-point ones
    cast to `dtype`. The buffer is an anonymous mapping, outside the allocator's heap: a block's
    weights go back to the system as one piece when its last view dies (as separate heap tensors,
    interleaved with the pruning's temporaries, they fragment the heap and resident memory creeps up
    block after block)."""
    plan, total = [], 0
    for name, (shape, pieces) in wanted.items():
        sources = [(_entry(files, headers, stored), at) for stored, at in pieces]
        kind = dtype if sources[0][0][1].is_floating_point else sources[0][0][1]
        plan.append((name, shape, kind, sources, total))
        total += -(-math.prod(shape) * kind.itemsize // ALIGN) * ALIGN
    buffer = torch.frombuffer(mmap.mmap(-1, max(total, 1)), dtype=torch.uint8)  # unmapped with its last view
    tensors = {}
    for name, shape, kind, sources, at in plan:
        tensor = buffer[at : at + math.prod(shape) * kind.itemsize].view(kind).view(shape)
        for (file, stored, stored_shape, offset), where in sources:
            view = tensor if where is None else tensor[where[0], where[1] : where[2]]
            if list(view.shape) != stored_shape:
                raise DiskError(f"{name}: a stored piece of shape {stored_shape} where the model holds {list(view.shape)} "
                                "(the config does not describe this checkpoint)")
            if stored == kind:
                _read_into(file, offset, view)
            else:
                stored_copy = torch.empty(stored_shape, dtype=stored)
                _read_into(file, offset, stored_copy)
                view.copy_(stored_copy)
        tensors[name] = tensor
    return tensors


def _header(entries: list[tuple[str, torch.dtype, list[int]]]) -> bytes:
    """A safetensors header for (name, dtype, shape) in this order, padded to 8 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _bytes_of(tensor: Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def save_tensors(tensors: dict[str, Tensor], file: Path) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory."""
    items = [(name, t.detach().to("cpu")) for name, t in tensors.items()]
    with open(file, "wb") as handle:
        handle.write(_header([(name, t.dtype, list(t.shape)) for name, t in items]))
        for _, tensor in items:
            handle.write(_bytes_of(tensor))


def copy_tensors(files: dict[str, Path], headers: Headers, names: list[str], dtype: torch.dtype, file: Path) -> None:
    """The named tensors of the input into one safetensors file, floating-point ones as `dtype`, a piece
    at a time: bytes copied as they are where the type is kept, rows converted where it changes."""
    sources = [_entry(files, headers, name) for name in names]
    kinds = [dtype if stored.is_floating_point else stored for _, stored, _, _ in sources]
    with open(file, "wb") as out:
        out.write(_header([(name, kind, shape) for name, kind, (_, _, shape, _) in zip(names, kinds, sources)]))
        for (source, stored, shape, offset), kind in zip(sources, kinds):
            row = math.prod(shape[1:]) if shape else 1  # elements per row (a scalar: one row of one)
            rows = max(1, PIECE // max(row * stored.itemsize, 1))
            for first in range(0, shape[0] if shape else 1, rows):
                piece = torch.empty(min(rows, (shape[0] if shape else 1) - first) * row, dtype=stored)
                _read_into(source, offset + first * row * stored.itemsize, piece)
                out.write(_bytes_of(piece if stored == kind else piece.to(kind)))


@dataclass
class DiskBlocks:
    """The blocks of a model that stays on disk, read and written one at a time (see the module docstring)."""

    model: nn.Module
    adapter: Adapter
    files: dict[str, Path]  # input tensor name -> its file
    headers: Headers  # input file -> its header
    dtype: torch.dtype
    layout: Layout  # how the input stores the blocks' tensors (and the output will): fused experts or per expert
    staging: Path | None = None  # where finished blocks are written (None: nowhere, read only)
    work: Path | None = None  # where they are written instead, with the state a resumed run starts from
    _pending: dict | None = None  # the state after the last finished block, read when saved
    _saved_at: float = field(default_factory=time.monotonic)
    pinned: set[int] = field(default_factory=set)  # blocks that stay resident when left (a fit changes them later)
    # hand the heap's free pages back after every block: against the creep that the pruning's temporaries
    # leave; a pass that only runs the blocks reuses the same activations and would page-fault them anew
    trim: bool = True
    # (shape, fraction of zeros) of every matrix written, by name: the output's sparsity table without reading it again
    table: dict[str, tuple] = field(default_factory=dict)
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))
    _ahead: dict[int, Future] = field(default_factory=dict)
    _renamed: dict[str, str] | None = None  # outside tensors: the model's name -> the input's, where they differ
    # a stage that changes every block's shapes at once (hidden channels): each tensor as read from the input
    # (qualified name, the input's tensor) -> as the model now holds it
    reshape: Callable[[str, Tensor], Tensor] | None = None

    @classmethod
    def open(cls, path: str | Path, dtype: torch.dtype, staging: Path | None = None,
             work: Path | None = None) -> DiskBlocks:  # fmt: skip
        from secateur.io import _skeleton, check_model

        require_single("streaming from disk")
        path = Path(path)
        release_free_memory()  # what came before (the calibration text's tokens) leaves no high-water mark
        model = _skeleton(path, check_model(path), dtype)  # shapes an earlier run recorded, rebuilt
        files = weight_map(path)
        adapter = adapter_for(model)
        store = cls(model, adapter, files, headers_of(files), dtype, layout_of(adapter, set(files)), staging, work)
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
        store._check_names()
        store._load_outside()
        model.eval()
        setattr(model, _STORE, store)  # every streamed pass over this model reads its blocks from here
        return store

    def ready(self) -> None:
        """Before a streamed pass: what computes the first block's inputs, read again where an earlier
        pass dropped it."""
        if self.model.get_input_embeddings().weight.is_meta:
            self._load_outside()

    def _place(self, root: nn.Module, name: str, tensor: Tensor) -> None:
        """`tensor` as the parameter (or persistent buffer) `name` (relative to `root`)."""
        module_name, _, leaf = name.rpartition(".")
        module = root.get_submodule(module_name)
        if leaf in module._buffers:
            module._buffers[leaf] = tensor
        else:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)

    def _load_outside(self, head: bool = False) -> None:
        """What the blocks' inputs are computed from: every tensor outside the blocks but the output head's
        (embeddings, positions, projections, norms; a tied head comes with the embeddings); with `head`,
        the output head's too (what turns the last block's output into logits)."""
        output = self.model.get_output_embeddings()
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        skip = set() if head and not tied else \
            {id(p) for p in output.parameters()} - {id(self.model.get_input_embeddings().weight)}  # fmt: skip
        prefix = f"{self.adapter.blocks}."
        wanted = [name for name, p in self.model.named_parameters()
                  if not name.startswith(prefix) and id(p) not in skip]  # fmt: skip
        missing = [name for name in wanted if self.stored_name(name) not in self.files]
        if missing:
            raise DiskError(f"the checkpoint stores no tensor {missing[0]!r}: it cannot be streamed block by block; "
                            f"load it in memory")
        tensors = read(self.files, self.headers, [self.stored_name(name) for name in wanted], self.dtype)
        for name in wanted:
            tensor = tensors[self.stored_name(name)]
            self._place(self.model, name, self.reshape(name, tensor) if self.reshape is not None else tensor)
        if tied:
            self.model.tie_weights()

    def stored_name(self, name: str) -> str:
        """The input's name of a tensor outside the blocks (GPT-NeoX stores its head `lm_head` as
        embed_out: transformers renames it on load)."""
        if self._renamed is None:
            prefix = f"{self.adapter.blocks}."
            outside = [key for key in self.files if not key.startswith(prefix)]
            self._renamed = {loaded: key for key, loaded in renamed_on_load(self.model, outside).items()}
        return self._renamed.get(name, name)

    def load_outside(self) -> None:
        """Every tensor outside the blocks, the output head's included: the model runs whole but for its
        blocks (`offload.perplexity_on_disk` carries their outputs in)."""
        self._load_outside(head=True)

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
        """The blocks' tensors must be stored under the names the model gives them (no renaming beyond
        the layout of fused experts)."""
        missing = [stored for index in range(len(self.adapter.block_list(self.model)))
                   for _, pieces in self.pieces(index).values() for stored, _ in pieces if stored not in self.files]  # fmt: skip
        if missing:
            raise DiskError(f"the checkpoint stores no tensor {missing[0]!r} ({len(missing)} block tensors missing or "
                            f"renamed): it cannot be streamed block by block; load it in memory")

    def pieces(self, index: int, number: int | None = None) -> Wanted:
        """Block `index`'s tensors by qualified name, with their shapes and their stored pieces
        (qualified); `number`: named as the block of that number (a block renumbered)."""
        prefix = f"{self.adapter.blocks}.{index if number is None else number}."
        return {prefix + name: (tuple(p.shape), [(prefix + stored, at) for stored, at in self.layout.pieces(name, tuple(p.shape))])
                for name, p in block_tensors(self.adapter.block_list(self.model)[index], self.adapter)}  # fmt: skip

    def _stored(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """A block's tensors (qualified names) as the output stores them: fused experts in pieces."""
        stored = {}
        for name, tensor in tensors.items():
            block, _, relative = name[len(self.adapter.blocks) + 1 :].partition(".")
            prefix = f"{self.adapter.blocks}.{block}."
            for piece, at in self.layout.pieces(relative, tuple(tensor.shape)):
                stored[prefix + piece] = tensor if at is None else tensor[at[0], at[1] : at[2]]
        return stored

    def _read_block(self, index: int) -> dict[str, Tensor]:
        """The input's tensors of block `index` (a parameter a stage added, such as a compensation bias,
        is stored nowhere yet)."""
        wanted = {name: spec for name, spec in self.pieces(index).items() if all(s in self.files for s, _ in spec[1])}
        if self.reshape is None:
            return read_pieces(self.files, self.headers, wanted, self.dtype)
        # read at the input's shapes (a tensor stored whole), then reshaped as the model holds it now
        wanted = {name: (tuple(_entry(self.files, self.headers, pieces[0][0])[2]), pieces)
                  if len(pieces) == 1 and pieces[0][1] is None else (shape, pieces)
                  for name, (shape, pieces) in wanted.items()}  # fmt: skip
        return {name: self.reshape(name, t) for name, t in read_pieces(self.files, self.headers, wanted, self.dtype).items()}

    def reshaped_outside(self, names: list[str]) -> dict[str, Tensor]:
        """The named tensors outside the blocks (the model's names) read from the input through
        `reshape`, by the input's names, for `finish(replaced=...)`; those the input does not store (a
        tied head) are left out."""
        stored = {name: self.stored_name(name) for name in names if self.stored_name(name) in self.files}
        tensors = read(self.files, self.headers, list(stored.values()), self.dtype)
        return {key: self.reshape(name, tensors[key]) for name, key in stored.items()}

    def prefetch(self, index: int) -> None:
        if 0 <= index < len(self.adapter.block_list(self.model)) and index not in self._ahead:
            self._ahead[index] = self._pool.submit(self._read_block, index)

    def enter(self, index: int, device: torch.device) -> nn.Module:
        """Block `index` with its weights, on `device`; the next block starts loading."""
        block = self.adapter.block_list(self.model)[index]
        if index in self.pinned and not any(p.is_meta for p in block.parameters()):
            self.prefetch(index + 1)
            return block.to(device)  # resident since an earlier pass, with what was fitted into it
        self.prefetch(index)
        tensors = self._ahead.pop(index).result()
        self.prefetch(index + 1)
        prefix = f"{self.adapter.blocks}.{index}."
        for name, tensor in tensors.items():
            self._place(block, name[len(prefix):], tensor.to(device))
        for name, param in list(stock_parameters(block, self.adapter)):
            if param.is_meta:  # added by the stage (a bias for compensation): zeros, as it was created
                self._place(block, name, torch.zeros(param.shape, dtype=param.dtype, device=device))
        return block

    def leave(self, index: int) -> None:
        """Write block `index` to its own shard (when writing), save the state when due, and send the
        block back to the meta device."""
        block = self.adapter.block_list(self.model)[index]
        if self.staging is not None:
            prefix = f"{self.adapter.blocks}.{index}."
            file = self._block_file(index)
            tensors = {prefix + name: p.detach() for name, p in block_tensors(block, self.adapter)}
            save_tensors(self._stored(tensors), file.with_suffix(".tmp"))
            os.replace(file.with_suffix(".tmp"), file)
            self._count(tensors)
        if index in self.pinned:
            block.to("cpu")
            return
        block.to("meta")
        if self.trim:
            release_free_memory()
        pending, self._pending = self._pending, None
        if self.work is not None and pending is not None and pending["index"] == index + 1 \
                and time.monotonic() - self._saved_at >= SAVE_EVERY:  # fmt: skip
            state = {"index": pending["index"], "hidden": [h.to("cpu") for h in pending["hidden"]],
                     "reports": [r if isinstance(r, dict) else asdict(r) for r in pending["reports"]],
                     "errors": list(pending["errors"])}  # fmt: skip
            save_whole(state, self.work / STATE)
            self._saved_at = time.monotonic()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Passes inside write nothing and save no state (a look at the dense model, such as an
        allocation's, before the pass that writes)."""
        staging, work, self.staging, self.work = self.staging, self.work, None, None
        try:
            yield
        finally:
            self.staging, self.work = staging, work

    def write_blocks(self, order: list[int], patches: dict[int, dict[str, Tensor]] | None = None) -> dict[str, tuple]:
        """The output's block j is the input's block `order[j]`, read from the input (`patches`: the
        block-relative tensors that replace some of its own) and written under its new number; a
        block file already there (a resumed run) is kept. Returns `table`."""
        patches = patches or {}
        for new, old in enumerate(order):
            file = self._block_file(new)
            source, target = f"{self.adapter.blocks}.{old}.", f"{self.adapter.blocks}.{new}."
            if file.is_file():  # written before the kill: read back for its counts
                self.recount(new, old)
                continue
            tensors = self._read_block(old)
            for name, tensor in patches.get(old, {}).items():
                tensors[source + name] = tensor.to(self.dtype)
            tensors = {target + name[len(source):]: t for name, t in tensors.items()}
            save_tensors(self._stored(tensors), file.with_suffix(".tmp"))
            os.replace(file.with_suffix(".tmp"), file)
            self._count(tensors)
            del tensors
            release_free_memory()
        return self.table

    def _count(self, tensors: dict[str, Tensor]) -> None:
        """(shape, fraction of zeros) of every matrix, a fused expert tensor's by expert under the name
        its exposed layer takes (`models.linear_experts`: `...experts.{j}.gate_up_proj.weight`)."""
        for name, t in tensors.items():
            if t.ndim == 2:
                self.table[name] = tuple(t.shape), int((t == 0).sum()) / t.numel()
            elif t.ndim == 3 and self.adapter.experts is not None and f".{self.adapter.experts.experts}." in name:
                base, _, leaf = name.rpartition(".")
                for j, expert in enumerate(t):
                    self.table[f"{base}.{j}.{leaf}.weight"] = tuple(expert.shape), int((expert == 0).sum()) / expert.numel()

    def recount(self, index: int, source: int | None = None) -> None:
        """Count the matrices of block `index` as written by an interrupted run (when it wrote it);
        `source`: the model's block it was written from (renumbered), when another."""
        file = self._block_file(index) if self.staging is not None else None
        if file is None or not file.is_file():
            return
        header = safetensors_header(file)
        self._count(read_pieces(dict.fromkeys(header[1], file), {file: header},
                                self.pieces(index if source is None else source, index), self.dtype))
        release_free_memory()

    def written(self) -> set[int]:
        """The blocks an interrupted run has written already (none without a work directory)."""
        if self.work is None or self.staging is None:
            return set()
        return {i for i in range(len(self.adapter.block_list(self.model))) if self._block_file(i).is_file()}

    def _block_file(self, index: int) -> Path:
        return (self.work or self.staging) / f"block-{index:05d}.safetensors"

    def reached(self, index: int, hidden: list[Tensor], reports: list[Any], errors: list[float]) -> None:
        """The activations entering block `index` and what the blocks before it reported (dataclasses):
        kept by reference and, when a save is due, saved right after the block before it is written."""
        if self.work is not None:
            self._pending = {"index": index, "hidden": hidden, "reports": reports, "errors": errors}

    def resume_point(self) -> dict | None:
        """The state an interrupted run saved last (None: start from the first block); its reports are
        dictionaries."""
        if self.work is None or not (self.work / STATE).is_file():
            return None
        return torch.load(self.work / STATE, weights_only=True)

    def finish(self, replaced: dict[str, Tensor] | None = None) -> None:
        """The tensors outside the blocks, copied from the input a shard of at most SHARD bytes at a time
        (`replaced`: tensors written instead of the input's, in a shard of their own); shard names and
        index as transformers writes them."""
        self._pool.shutdown()
        self.model.to("meta")
        prefix = f"{self.adapter.blocks}."
        replaced = replaced or {}
        groups, size = [[]], 0
        for name in sorted(name for name in self.files if not name.startswith(prefix) and name not in replaced):
            if size >= SHARD:
                groups.append([])
                size = 0
            groups[-1].append(name)
            begin, end = self.headers[self.files[name]][1][name]["data_offsets"]
            size += end - begin
        shards = []
        for group in filter(None, groups):
            shards.append(self.staging / f"rest-{len(shards):05d}.safetensors")
            copy_tensors(self.files, self.headers, group, self.dtype, shards[-1])
        if replaced:
            shards.append(self.staging / f"rest-{len(shards):05d}.safetensors")
            save_tensors({name: t.to(self.dtype) for name, t in replaced.items()}, shards[-1])
        shards += [self._block_file(i) for i in range(len(self.adapter.block_list(self.model)))]
        mapping, total = {}, 0
        for i, shard in enumerate(shards):
            final = self.staging / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            shard.rename(final)
            for name, entry in safetensors_header(final)[1].items():
                mapping[name] = final.name
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
        (self.staging / INDEX).write_text(json.dumps(index, indent=2))

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
