"""Where a run's weights live (`--offload`): in memory (`none`), or on disk (`disk`: the blocks streamed
from the input's safetensors to the output one at a time, by the stage kind's `Streaming`:
`sparsity.disk`, `depth.disk`, `width.disk`, `vocabulary.disk`, `experts.disk`); `auto` streams when
the weights would not fit in the memory available, and says so.

Streaming covers recipes of these stages (each from disk to disk, through intermediates in the
checkpoints directory): sparsity with a uniform, OWL or global allocation (or N:M), depth by angular
distance or Block Influence (with compensation), width (heads and MLP channels by activation,
fluctuation or magnitude, bias compensation or the least-squares refit, uniform or adaptive
allocation; not Taylor importance, not the hidden size), vocabulary, and experts (every method);
mixtures of experts stream through the checkpoint's per-expert matrices (`calibrate.layout`), so
sparsity inside the experts and depth reach them too. `--eval` reads the output's blocks from disk once
more (`perplexity_on_disk`, below, which `secateur eval --offload disk` uses too); lm-eval tasks and
the held-out check run the whole model, so they are not done (an explicit --eval-tasks or --check-windows is
refused; the default check is skipped, and the manifest says so).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.processes import world
from secateur.data.calibration import calibration_data
from secateur.errors import ConfigError
from secateur.io import load_config, load_tokenizer, resolve_device, resolve_dtype
from secateur.output import Output
from secateur.schema import flag, flatten
from secateur.settings import PlannedStage, RunOptions

log = logging.getLogger(__name__)

AUTO_SHARE = 0.8  # auto streams when the weights exceed this share of the memory available


def available_memory() -> int:
    """Bytes of memory the system can give without swapping (MemAvailable), or the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def weight_bytes(model_path: str | Path, dtype: str) -> int | None:
    """The weights' size once loaded at `dtype`, from the safetensors headers (None: not safetensors)."""
    from secateur.calibrate.disk import DiskError, stored_shapes

    try:
        shapes = stored_shapes(Path(model_path))
    except (DiskError, NotADirectoryError, FileNotFoundError):
        return None
    return sum(math.prod(shape) for shape in shapes.values()) * resolve_dtype(dtype).itemsize


def why_not(model_path: str | Path, stages: list[PlannedStage], options: RunOptions) -> str | None:
    """Why this run cannot stream its blocks from disk (None: it can)."""
    from secateur.recipe import KINDS, kind_of

    if world()[1] > 1:
        return "it runs in one process (each of several would read and write the same blocks); run it without torchrun"
    streams = [k.name for k in KINDS.values() if k.streaming is not None]
    for stage in stages:
        kind = kind_of(stage.config)
        if kind.streaming is None:
            return f"a {kind.name} stage is not streamed yet (only {', '.join(streams)})"
        why = kind.streaming.why_not(stage.config)
        if why is not None:
            return why
    given = [f"{flag(k)}" for k in ("eval_tasks", "check_windows") if k in options.explicit and getattr(options, k)]
    if given:
        return f"{', '.join(given)} runs the whole model, which streaming never holds; evaluate the output after"
    return unreadable(model_path)


def unreadable(model_path: str | Path) -> str | None:
    """Why the model's files cannot be read a block at a time (None: they can): not a directory of
    safetensors."""
    from secateur.calibrate.disk import DiskError, weight_map

    if Path(model_path).is_file():
        return "it reads safetensors directories, not GGUF files; convert the model first"
    try:
        weight_map(Path(model_path))
    except DiskError as exc:
        return str(exc)
    return None


def oversized(model_path: str | Path, dtype: str) -> tuple[int, int] | None:
    """(the weights' bytes at `dtype`, the memory available) when the weights exceed AUTO_SHARE of that
    memory, what `--offload auto` streams; None when they fit (or their size is unknown)."""
    size, free = weight_bytes(model_path, dtype), available_memory()
    return (size, free) if size is not None and size > AUTO_SHARE * free else None


def on_disk(model_path: str | Path, stages: list[PlannedStage], options: RunOptions) -> bool:
    """Whether the run streams from disk: as asked, or (auto) when the weights do not fit; a run asked
    to stream that cannot is refused, before any work."""
    if options.offload == "none":
        return False
    why = why_not(model_path, stages, options)
    if options.offload == "disk":
        if why is not None:
            raise ConfigError(f"--offload disk: {why}")
        return True
    over = oversized(model_path, options.dtype)
    if over is None:
        return False
    size, free = over
    if why is not None:
        log.warning("offload auto: the weights (%.1f GiB) exceed %d%% of the memory available (%.1f GiB), but %s: "
                    "loading them in memory anyway", size / 2**30, AUTO_SHARE * 100, free / 2**30, why)  # fmt: skip
        return False
    log.warning("offload auto: the weights (%.1f GiB) exceed %d%% of the memory available (%.1f GiB): streaming the "
                "blocks from disk", size / 2**30, AUTO_SHARE * 100, free / 2**30)  # fmt: skip
    return True


def run_on_disk(model_path: str | Path, stages: list[PlannedStage], output: Output, options: RunOptions,
                earlier: dict[str, Any], notes: list[str], work: Path) -> dict[str, Any]:  # fmt: skip
    """The run streamed from disk into the claimed `output`, finished blocks and the state to resume
    from kept in `work` until the end; returns the manifest it wrote. A recipe of several stages goes
    from disk to disk stage by stage: each stage but the last writes a whole intermediate model
    into `work` (`stage-i`, with the manifest's structure so that the next stage builds its shapes),
    which the next stage streams from; a finished intermediate stays there for a resumed run, and
    is removed once the stage after it is done. Peak disk: the input, two intermediates, the output."""
    from secateur.calibrate.disk import stored_bytes
    from secateur.io import MANIFEST
    from secateur.manifest import header, history_of, recipe_document

    compute = resolve_device(options.device)
    records, structure, cutting, seconds = [], {}, 0.0, 0.0
    source = Path(model_path)
    with output.write(size=stored_bytes(Path(model_path))) as staging:
        for index, stage in enumerate(stages):
            last = index == len(stages) - 1
            target = staging if last else work / f"stage-{index}"
            stage_work = work if len(stages) == 1 else work / f"stage-{index}.work"
            if not last and (target / MANIFEST).is_file():  # finished before an interrupted run stopped
                done = json.loads((target / MANIFEST).read_text())
                record, structure = done["history"][-1], done["structure"]
            else:
                record, structure, times = _stream_stage(source, target, stage, options, compute, stage_work,
                                                         Path(model_path))  # fmt: skip
                cutting, seconds = cutting + times[0], seconds + times[1]
            records.append(record)
            if index > 0:
                shutil.rmtree(source, ignore_errors=True)  # the intermediate this stage read
            source = target
        manifest = {**header(model_path, options.dtype, compute, earlier), "recipe": recipe_document(stages, options),
                    "history": [*history_of(earlier), *records], "structure": structure,
                    "timings": {"calibration_data": cutting, "prune": seconds}, "offload": "disk",
                    "check": "skipped: the whole model is never in memory when streaming"}  # fmt: skip
        if notes:
            manifest["adapted"] = notes
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if options.eval_source:  # the output as written (its manifest rebuilds per-block shapes), streamed too
            manifest["evaluation"] = _evaluate(staging, model_path, options, compute)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _evaluate(staging: Path, model_path: str | Path, options: RunOptions, compute: Any) -> dict[str, Any]:
    """`--eval` of a streamed run: the output's perplexity on each source with its blocks read from disk
    one at a time, as the run in memory records it (with the share of the text's tokens a pruned
    vocabulary splits otherwise)."""
    from secateur.evaluate import changed_tokens, split_sources

    clock = time.perf_counter()
    tokenizer, original = load_tokenizer(staging), load_tokenizer(model_path)
    sources = split_sources(options.eval_source)
    evaluation = evaluate_on_disk(staging, tokenizer, sources, options.eval_seq_len, options.eval_windows,
                                  dtype=options.dtype, device=compute)  # fmt: skip
    if original.get_vocab() != tokenizer.get_vocab():
        for name, record in (evaluation.get("domains") or {sources[0]: evaluation}).items():
            record["changed_tokens"] = changed_tokens(original, tokenizer, name, options.eval_seq_len,
                                                      options.eval_windows)  # fmt: skip
    log.info("evaluated the output from disk in %.1f s", time.perf_counter() - clock)
    return evaluation


def _stream_stage(source: Path, target: Path, stage: PlannedStage, options: RunOptions, compute: Any,
                  work: Path, run_input: Path) -> tuple[dict[str, Any], dict[str, Any], tuple[float, float]]:  # fmt: skip
    """One stage from the model at `source` into `target` (an intermediate, created here, when it is
    not the claimed output's staging directory: written under a hidden name with its structure,
    renamed when complete); returns (its history record, the structure section, (seconds cutting the
    calibration, seconds pruning))."""
    from secateur.io import MANIFEST
    from secateur.recipe import kind_of

    clock = time.perf_counter()
    windows = None
    if stage.calib is not None:  # whether windows start with BOS: the config says, no weight is needed
        windows = _windows(source, run_input, stage)
    cutting = time.perf_counter() - clock
    final = target
    if not target.exists():
        target = target.with_name(f".{target.name}.partial")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    start = time.perf_counter()
    record, structure = kind_of(stage.config).streaming.run(source, target, stage.config, windows, options.dtype,
                                                            compute, stage.calib.batch_size if stage.calib else 4,
                                                            work)  # fmt: skip
    seconds = time.perf_counter() - start
    record.update(calibration={**flatten(stage.calib), "tokens": windows.numel()} if windows is not None else None,
                  input={"path": str(run_input.resolve())})  # fmt: skip
    if target != final:
        (target / MANIFEST).write_text(json.dumps({"history": [record], "structure": structure}, default=str))
        target.rename(final)
        shutil.rmtree(work, ignore_errors=True)  # the stage's own resumable state: the stage is done
    return record, structure, (cutting, seconds)


def _windows(source: Path, run_input: Path, stage: PlannedStage) -> Any:
    """A stage's calibration windows as the recipe in memory cuts them: from the run's input with its
    tokenizer, re-tokenized where an earlier stage (a vocabulary) gave the model another one."""
    from secateur.data.calibration import retokenize

    original = load_tokenizer(run_input)
    windows = calibration_data(load_config(run_input), original, stage.calib)
    current = load_tokenizer(source) if source != run_input else original
    if current.get_vocab() != original.get_vocab():
        windows = retokenize(windows, original, current, load_config(source))
    return windows


def prune_on_disk(path: str | Path, out: str | Path, config: Any, calibration: Any, *, dtype: str = "float32",
                  device: str = "cpu", batch_size: int = 4, overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """One stage (a sparsity, depth, width, vocabulary or experts config) on the model at `path` (a HF directory of safetensors),
    block by block from disk into `out`, never holding the model; returns the stage's history record.
    `calibration`: (samples, seq_len) token ids, tokenized by the input's tokenizer. The output goes
    through the one output path (claimed before any work, written to a hidden sibling, renamed into
    place at the end, removed on an error or a signal). Tunes the process's allocator as the command
    line does (`runtime.tune_allocator`: freed buffers stay in the heap for the next block; without
    it, glibc's moving mmap threshold lets resident memory creep up by a few MB per block)."""
    from secateur.calibrate.disk import stored_bytes
    from secateur.io import MANIFEST
    from secateur.manifest import header
    from secateur.output import claim
    from secateur.recipe import kind_of
    from secateur.runtime import tune_allocator

    kind = kind_of(config)
    why = "it is not streamed yet" if kind.streaming is None else kind.streaming.why_not(config)
    if why is not None:
        raise ConfigError(f"a {kind.name} stage cannot be streamed from disk: {why}")
    tune_allocator()
    path, start = Path(path), time.perf_counter()
    load_config(path)  # a directory with a readable config, before anything is claimed
    size = stored_bytes(path)
    with claim(out, inputs=[path], overwrite=overwrite, marker=MANIFEST) as output:
        with output.write(size=size) as staging:
            record, structure = kind.streaming.run(path, staging, config, calibration, dtype, resolve_device(device),
                                                   batch_size, None)  # fmt: skip
            manifest = {**header(path, dtype, device, {}), "recipe": {"dtype": dtype, "stage": [record["settings"]]},
                        "history": [record], "structure": structure, "offload": "disk",
                        "timings": {kind.name: time.perf_counter() - start}}  # fmt: skip
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return record


@torch.no_grad()
def perplexity_on_disk(store: Any, windows: Tensor, batch_size: int = 4, device: str | torch.device = "cpu",
                       token_bytes: Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """`evaluate.perplexity` of a model whose blocks stay on disk (`calibrate.disk.DiskBlocks`, opened read
    only): the windows' hidden states go through one block at a time (`stream_blocks`, the same
    batches), then the model runs once more per batch with every block passing its input on and the
    last handing over the streamed output, so its own final norm and head (a chunk of positions at a
    time) turn it into the same figure. Memory: two blocks, the outside tensors and every window's
    hidden states."""
    from secateur.calibrate.stream import move_outside_blocks, run_block, stream_blocks
    from secateur.evaluate import perplexity

    model, adapter = store.model, store.adapter
    start = time.perf_counter()
    outputs: list[Tensor] = []
    for index, block, inputs in stream_blocks(model, adapter, windows, batch_size, torch.device(device), "perplexity"):
        inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]
        outputs = inputs.hidden
    store.load_outside()
    blocks, streamed = adapter.block_list(model), iter(outputs)
    for block in blocks[:-1]:
        block.forward = lambda hidden_states, *args, **kwargs: hidden_states  # instance attribute shadows the class's
    blocks[-1].forward = lambda hidden_states, *args, **kwargs: next(streamed)
    move_outside_blocks(model, adapter, torch.device(device))
    try:
        result = perplexity(model, windows, batch_size, device, token_bytes)
    finally:
        for block in blocks:
            del block.forward
        store.captured()  # the outside tensors back to the meta device: another pass reads them again
        move_outside_blocks(model, adapter, torch.device("cpu"))
    return {**result, "seconds": time.perf_counter() - start, "offload": "disk"}


def evaluate_on_disk(path: str | Path, tokenizer: Any, sources: list[str], seq_len: int, windows: int, *,
                     field: str = "text", batch_size: int = 4, dtype: str = "float32",
                     device: torch.device | str = "cpu") -> dict[str, Any]:  # fmt: skip
    """`evaluate.evaluate_sources` of the model at `path` (a safetensors directory) with its blocks read from
    disk one at a time (`perplexity_on_disk`, one pass over them per source)."""
    from secateur.calibrate.disk import DiskBlocks
    from secateur.data.bytes import token_bytes
    from secateur.data.calibration import bos_token, evaluation_data
    from secateur.evaluate import combine

    store = DiskBlocks.open(path, resolve_dtype(dtype))
    try:
        vocabulary = store.model.get_input_embeddings().num_embeddings
        results = {}
        for source in sources:
            data = evaluation_data(store.model, tokenizer, source, seq_len, windows, field)
            results[source] = {"source": source, "bos": bos_token(store.model, tokenizer) is not None,
                               **perplexity_on_disk(store, data, batch_size, device,
                                                    token_bytes(tokenizer, vocabulary))}  # fmt: skip
    finally:
        store.close()
    return combine(results)
