"""Speed and size of models: parameters, file size, prefill latency, decode tokens/s, peak memory.

Protocol (per model, batch 1, random token ids, greedy):
- prefill: one forward over `prompt` tokens with the KV cache on, logits for the last position only
  (what `generate` computes: the time to the first token);
- decode: after that prefill, `new_tokens` single-token steps with the KV cache, timed together;
- one warm-up run, then `repeats` timed runs; medians are reported;
- peak memory: the process's peak resident memory (VmHWM) on CPU, measured in a fresh process per
  model so models do not see each other's peaks; peak allocated CUDA memory on CUDA.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_PROTOCOL = (
    "batch 1; prefill = one forward over the prompt with the KV cache, last-position logits; decode = new_tokens greedy single-token "
    "steps with the KV cache after that prefill; 1 warm-up + repeats timed runs, medians; peak memory = VmHWM "
    "of a fresh process per model (CPU) or peak allocated CUDA memory"
)


@dataclass
class SpeedResult:
    model: str
    device: str
    threads: int
    parameters: int
    file_bytes: int
    prompt: int
    new_tokens: int
    prefill_seconds: float  # median
    decode_tokens_per_second: float  # median
    peak_memory_bytes: int
    repeats: int


def file_bytes(path: str | Path) -> int:
    """Bytes of the weight files (safetensors / bin / gguf) of a model directory or file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))


@torch.inference_mode()
def _one_run(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one prefill + greedy decode."""
    device = prompt_ids.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1)  # as generate(): last position only
    token = out.logits[:, -1:].argmax(-1)
    sync()
    prefill = time.perf_counter() - start
    cache = out.past_key_values
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    sync()
    return prefill, new_tokens / (time.perf_counter() - start)


def measure(path: str | Path, *, device: str = "cpu", prompt: int = 512, new_tokens: int = 128, repeats: int = 5,
            dtype: str = "float32", seed: int = 0) -> SpeedResult:
    """Load `path` with `secateur.load` (so depth-pruned outputs run as saved) and time it here."""
    from secateur.io import load

    model, _ = load(path, dtype=dtype, device=device)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(seed)).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _one_run(model, prompt_ids, new_tokens)  # warm-up
    runs = [_one_run(model, prompt_ids, new_tokens) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _vm_hwm()
    return SpeedResult(
        model=str(path), device=device, threads=torch.get_num_threads(),
        parameters=sum(p.numel() for p in model.parameters()), file_bytes=file_bytes(path),
        prompt=prompt, new_tokens=new_tokens,
        prefill_seconds=statistics.median(r[0] for r in runs),
        decode_tokens_per_second=statistics.median(r[1] for r in runs),
        peak_memory_bytes=peak, repeats=repeats,
    )  # fmt: skip


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(queue: mp.Queue, path: str, kwargs: dict[str, Any]) -> None:
    try:
        queue.put(("ok", asdict(measure(path, **kwargs))))
    except Exception as exc:  # reported to the parent, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def measure_isolated(path: str | Path, **kwargs: Any) -> SpeedResult:
    """`measure` in a fresh process, so peak memory and allocator state belong to this model alone."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(queue, str(path), kwargs))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmarking {path} failed: {payload}")
    return SpeedResult(**payload)


def table(results: list[SpeedResult]) -> str:
    """Markdown table; speed ratios are against the first model."""
    base = results[0]
    lines = [
        "| model | params | file MB | prefill ms | decode tok/s | decode x | prefill x | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.parameters / 1e6:.1f}M | {r.file_bytes / 1e6:.1f} | {r.prefill_seconds * 1e3:.1f} | "
            f"{r.decode_tokens_per_second:.1f} | {r.decode_tokens_per_second / base.decode_tokens_per_second:.2f} | "
            f"{base.prefill_seconds / r.prefill_seconds:.2f} | {r.peak_memory_bytes / 1e6:.0f} |"
        )
    return "\n".join(lines)


def to_json(results: list[SpeedResult]) -> str:
    return json.dumps({"protocol": BENCH_PROTOCOL, "results": [asdict(r) for r in results]}, indent=2)


def time_labelled(entries: list[tuple[str, str]], repeats: int, device: str = "cpu") -> list[dict[str, Any]]:
    """`measure_isolated` for each (label, path), printing a line per model; rows as dicts with the label."""
    rows = []
    for label, path in entries:
        row = {**asdict(measure_isolated(path, device=device, repeats=repeats)), "label": label}
        rows.append(row)
        print(f"{label:26s} prefill {row['prefill_seconds'] * 1e3:7.1f} ms  decode "
              f"{row['decode_tokens_per_second']:6.1f} tok/s", flush=True)
    return rows
