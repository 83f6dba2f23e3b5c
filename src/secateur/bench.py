"""Speed and size of models: parameters, file size, prefill latency, decode tokens/s, peak memory.

Protocol (per model, batch 1, random token ids, greedy):
- prefill: one forward over `prompt` tokens with the KV cache on, logits for the last position only
  (what `generate` computes: the time to the first token);
- decode: after that prefill, `new_tokens` single-token steps with the KV cache, timed together;
- one warm-up run, then `repeats` timed runs; medians are reported;
- `rounds`: the models are timed in turn, round after round, each time in a fresh process, so a
  slow drift of the machine (on the shared 2-core development VM, dense decode moved by 25% within
  half an hour) falls on every model alike; a model's figures are medians over all its runs, and a
  speedup is the median over rounds of the ratio of the two models' per-round medians;
- peak memory: the process's peak resident memory (VmHWM) on CPU, measured in a fresh process per
  model so models do not see each other's peaks; peak allocated CUDA memory on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from secateur.config import ConfigError
from secateur.io import Dtype
from secateur.models.cache import cache_of, with_cache
from secateur.schema import Requires, option, refuse_inapplicable

HF = Requires(lambda c: c.engine == "hf", "--engine hf (the default)")
LLAMA_CPP = Requires(lambda c: c.engine == "llama.cpp", "--engine llama.cpp")


def speculating(config) -> bool:
    return config.draft is not None or config.draft_blocks is not None


SPECULATING = Requires(speculating, "--draft or --draft-blocks")


@dataclass(frozen=True)
class BenchConfig:
    """How `secateur bench` times its models; its flags are generated from these fields."""

    engine: Literal["hf", "llama.cpp"] = option("hf", "hf (transformers, secateur.load) or llama.cpp (llama-bench on "
                                                      ".gguf files)")
    llama_cpp: str | None = option(None, "llama.cpp's binaries (default: $SECATEUR_LLAMA_CPP, then PATH)",
                                   requires=LLAMA_CPP)
    threads: int | None = option(None, "llama.cpp threads (default: torch's thread count)", requires=LLAMA_CPP)
    device: str = option("auto", "auto (cuda when present), cpu or cuda[:N]", requires=HF)
    dtype: Dtype = option("float32", "load precision", requires=HF)
    prompt: int = option(512, "prefill tokens (llama.cpp: 0 skips the test)")
    new_tokens: int = option(128, "decoded tokens (llama.cpp: 0 skips the test)")
    repeats: int = option(3, "timed runs per model and round")
    rounds: int = option(3, "rounds over all models, each model in a fresh process per round, so machine drift "
                            "falls on every model alike; medians over all runs, speedups are medians of per-round "
                            "ratios", requires=Requires(lambda c: not speculating(c), "several models (not --draft)"))
    draft: str | None = option(None, "a pruned model as the speculative-decoding draft of the one model given: its "
                                     "acceptance rate, the speedup of greedy decoding, and whether the output is the "
                                     "model's own greedy output (llama.cpp: both .gguf files)")
    draft_blocks: int | None = option(None, "the model's own first N blocks (with its final norm and LM head, "
                                            "sharing its weights) as the draft: self-speculation", requires=HF)
    draft_tokens: int = option(4, "draft tokens proposed per round", requires=SPECULATING)
    prompt_text: str = option("enwiki-sample", "the text whose first --prompt tokens are the prompt (--draft: "
                                               "acceptance depends on real text)",
                              requires=SPECULATING)

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        if self.draft is not None and self.draft_blocks is not None:
            raise ConfigError("--draft and --draft-blocks each name the draft; give one")
        if self.draft_blocks is not None and self.draft_blocks < 1:
            raise ConfigError(f"--draft-blocks must be at least 1, got {self.draft_blocks}")
        least = 0 if self.engine == "llama.cpp" else 1  # llama.cpp skips a test of length 0; hf times both
        for name in ("prompt", "new_tokens"):
            if getattr(self, name) < least:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {least} with --engine {self.engine}, "
                                  f"got {getattr(self, name)}")
        if self.prompt == 0 and self.new_tokens == 0:
            raise ConfigError("--prompt 0 and --new-tokens 0 leave nothing to time; give one of them")
        if self.draft_tokens < 1:
            raise ConfigError(f"--draft-tokens must be at least 1, got {self.draft_tokens}")
        for name in ("repeats", "rounds", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}")


BENCH_PROTOCOL = (
    "batch 1; prefill = one forward over the prompt with the KV cache, last-position logits; decode = new_tokens greedy single-token "
    "steps with the KV cache after that prefill; 1 warm-up + repeats timed runs per round, models in turn each round "
    "in a fresh process, medians; speedup = median over rounds of the per-round ratio; peak memory = VmHWM "
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
    prefill_seconds: float  # median over all timed runs
    decode_tokens_per_second: float  # median over all timed runs
    peak_memory_bytes: int  # the largest over rounds
    repeats: int  # timed runs per round
    rounds: int = 1
    prefill_runs: list[float] = field(default_factory=list)  # every timed run, round after round
    decode_runs: list[float] = field(default_factory=list)

    def per_round(self, runs: list[float]) -> list[float]:
        return [statistics.median(runs[i : i + self.repeats]) for i in range(0, len(runs), self.repeats)]

    def speedup(self, base: SpeedResult) -> tuple[float, float]:
        """(prefill, decode) speedup over `base`: the median over rounds of the per-round ratios."""
        if not self.prefill_runs or len(self.per_round(self.prefill_runs)) != len(base.per_round(base.prefill_runs)):
            return base.prefill_seconds / self.prefill_seconds, self.decode_tokens_per_second / base.decode_tokens_per_second
        prefill = [b / s for s, b in zip(self.per_round(self.prefill_runs), base.per_round(base.prefill_runs))]
        decode = [s / b for s, b in zip(self.per_round(self.decode_runs), base.per_round(base.decode_runs))]
        return statistics.median(prefill), statistics.median(decode)


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
    cache = cache_of(out)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, **with_cache(model, cache))
        cache = cache_of(out)
        token = out.logits[:, -1:].argmax(-1)
    sync()
    return prefill, new_tokens / (time.perf_counter() - start)


def measure(path: str | Path, *, device: str = "cpu", prompt: int = 512, new_tokens: int = 128, repeats: int = 5,
            dtype: str = "float32", seed: int = 0, allow_nonfinite: bool = False) -> SpeedResult:
    """Load `path` with `secateur.load` (so depth-pruned outputs run as saved) and time it here."""
    from secateur.io import load

    if prompt < 1 or new_tokens < 1 or repeats < 1:
        raise ConfigError(f"the hf engine times at least 1 prompt token, 1 new token and 1 run; got --prompt {prompt}, "
                          f"--new-tokens {new_tokens}, --repeats {repeats}")
    model, _ = load(path, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
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
        prefill_runs=[r[0] for r in runs], decode_runs=[r[1] for r in runs],
    )  # fmt: skip


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(queue: mp.Queue, path: str, kwargs: dict[str, Any]) -> None:
    from secateur.errors import SecateurError

    try:
        queue.put(("ok", asdict(measure(path, **kwargs))))
    except SecateurError as exc:  # bad input: the parent says it in one line
        queue.put(("input", str(exc)))
    except Exception as exc:  # reported to the parent, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


class BenchError(ConfigError):
    """A measurement could not be made (its process died, or the model cannot run)."""


def measure_isolated(path: str | Path, poll: float = 0.5, **kwargs: Any) -> SpeedResult:
    """`measure` in a fresh process, so peak memory and allocator state belong to this model alone. A
    process that dies without reporting (killed, out of memory, a crash in native code) is an error,
    never a wait."""
    import queue as queues

    context = mp.get_context("spawn")
    channel = context.Queue()
    process = context.Process(target=_worker, args=(channel, str(path), kwargs))
    process.start()
    try:
        while True:
            try:
                status, payload = channel.get(timeout=poll)
                break
            except queues.Empty:
                if not process.is_alive():
                    try:  # it may have reported just before exiting
                        status, payload = channel.get(timeout=poll)
                        break
                    except queues.Empty:
                        raise BenchError(_death(path, process.exitcode)) from None
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    if status == "input":
        raise BenchError(payload)
    if status != "ok":
        raise BenchError(f"benchmarking {path} failed: {payload}")
    return SpeedResult(**payload)


def _death(path: str | Path, code: int | None) -> str:
    import signal

    how = f"exit {code}"
    if code is not None and code < 0:
        how = f"killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"the process measuring {path} died ({how}) before reporting; nothing was measured"


# --- llama.cpp ----------------------------------------------------------------------------------------

LLAMA_CPP_ENV = "SECATEUR_LLAMA_CPP"  # a directory holding llama.cpp's binaries (llama-bench)


def llama_bench_binary(directory: str | Path | None) -> Path:
    """llama-bench from `directory`, else from $SECATEUR_LLAMA_CPP, else from PATH, else from the build
    `secateur llama-cpp` leaves in secateur's cache."""
    return llama_cpp_tool("llama-bench", directory)


def llama_cpp_tool(name: str, directory: str | Path | None) -> Path:
    """One of llama.cpp's binaries, looked up as `llama_bench_binary` says."""
    import os
    import shutil

    from secateur.export.llamacpp import built

    where = directory or os.environ.get(LLAMA_CPP_ENV)
    found = Path(where) / name if where else (Path(p) if (p := shutil.which(name)) else None)
    if found is None and (cached := built((name,))) is not None:  # an older build without the newer tools too
        found = cached / name
    if found is None or not found.is_file():
        raise ConfigError(f"{name} not found {'in ' + str(where) if where else 'on PATH'}: run `secateur "
                          f"llama-cpp` once to build it (several minutes; needs cmake and a C++ compiler), or pass "
                          f"--llama-cpp DIR or set {LLAMA_CPP_ENV} to the directory of llama.cpp's binaries")
    return found


def gguf_parameters(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def measure_llamacpp(path: str | Path, *, binary: Path, prompt: int = 512, new_tokens: int = 128, repeats: int = 5,
                     threads: int | None = None) -> SpeedResult:
    """`llama-bench` on one GGUF file in a fresh process: prefill and decode per repetition (it warms up
    first), and that process's peak resident memory. A length of 0 skips that test (its figure NaN)."""
    import os
    import subprocess
    import tempfile

    path = Path(path)
    threads = threads or torch.get_num_threads()
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen([str(binary), "-m", str(path), "-p", str(prompt), "-n", str(new_tokens),
                                    "-r", str(repeats), "-t", str(threads), "-o", "json"],
                                   stdout=out, stderr=subprocess.DEVNULL)  # fmt: skip
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise ConfigError(f"llama-bench failed on {path} (exit {process.returncode}); is it a GGUF file llama.cpp reads?")
        out.seek(0)
        rows = json.loads(out.read())

    def samples(n_prompt: int, n_gen: int) -> list[float]:
        """Tokens per second of one test's repetitions; none for a test of length 0 (skipped)."""
        if not max(n_prompt, n_gen):
            return []
        row = next((r for r in rows if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen), None)
        if row is None:
            raise ConfigError(f"llama-bench reported no pp{n_prompt} tg{n_gen} test for {path}")
        return list(row["samples_ts"])

    prefill_runs = [prompt / ts for ts in samples(prompt, 0)]
    decode_runs = samples(0, new_tokens)
    return SpeedResult(model=str(path), device="cpu (llama.cpp)", threads=threads, parameters=gguf_parameters(path),
                       file_bytes=file_bytes(path), prompt=prompt, new_tokens=new_tokens,
                       prefill_seconds=statistics.median(prefill_runs) if prefill_runs else float("nan"),
                       decode_tokens_per_second=statistics.median(decode_runs) if decode_runs else float("nan"),
                       peak_memory_bytes=usage.ru_maxrss * 1024, repeats=repeats, prefill_runs=prefill_runs,
                       decode_runs=decode_runs)  # fmt: skip


def pooled(rounds: list[SpeedResult]) -> SpeedResult:
    """One model's rounds as one result: medians over all runs, the largest peak memory."""
    prefill = [t for r in rounds for t in r.prefill_runs]
    decode = [t for r in rounds for t in r.decode_runs]
    return SpeedResult(**{**asdict(rounds[0]), "rounds": len(rounds), "prefill_runs": prefill, "decode_runs": decode,
                          "prefill_seconds": statistics.median(prefill), "decode_tokens_per_second": statistics.median(decode),
                          "peak_memory_bytes": max(r.peak_memory_bytes for r in rounds)})  # fmt: skip


def bench(paths: list[str | Path], *, rounds: int = 3, progress: Callable[[int, int, SpeedResult], None] | None = None,
          measure_one: Callable[..., SpeedResult] = measure_isolated, **kwargs: Any) -> list[SpeedResult]:
    """`measure_one` (default: the HF engine in a fresh process) for every model, the models in turn,
    `rounds` times; pooled per model. `progress(round, model index, result)` is called after each
    measurement.
    """
    if rounds < 1 or kwargs.get("repeats", 1) < 1:
        raise ConfigError(f"--rounds and --repeats must be at least 1, got {rounds} and {kwargs.get('repeats')}")
    measured: list[list[SpeedResult]] = [[] for _ in paths]
    for round_ in range(rounds):
        for index, (runs, path) in enumerate(zip(measured, paths)):
            runs.append(measure_one(path, **kwargs))
            if progress:
                progress(round_, index, runs[-1])
    return [pooled(runs) for runs in measured]


def table(results: list[SpeedResult]) -> str:
    """Markdown table; speed ratios are against the first model."""
    base = results[0]
    lines = [
        "| model | params | file MB | prefill ms | decode tok/s | decode x | prefill x | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        prefill_x, decode_x = r.speedup(base)
        lines.append(
            f"| {r.model} | {r.parameters / 1e6:.1f}M | {r.file_bytes / 1e6:.1f} | {r.prefill_seconds * 1e3:.1f} | "
            f"{r.decode_tokens_per_second:.1f} | {decode_x:.2f} | {prefill_x:.2f} | {r.peak_memory_bytes / 1e6:.0f} |"
        )
    return "\n".join(lines)


def to_json(results: list[SpeedResult]) -> str:
    return json.dumps({"protocol": BENCH_PROTOCOL, "results": [asdict(r) for r in results]}, indent=2)


def time_labelled(entries: list[tuple[str, str]], repeats: int, rounds: int = 3, device: str = "cpu") -> list[dict[str, Any]]:
    """`bench` over (label, path) entries, printing a line per measurement; rows as dicts with the label
    and the speedups over the first entry."""
    def progress(round_: int, index: int, r: SpeedResult) -> None:
        print(f"round {round_ + 1}/{rounds} {entries[index][0]:32s} prefill {r.prefill_seconds * 1e3:7.1f} ms  decode "
              f"{r.decode_tokens_per_second:6.1f} tok/s", flush=True)

    results = bench([path for _, path in entries], rounds=rounds, progress=progress, device=device, repeats=repeats)
    rows = []
    for (label, _), r in zip(entries, results):
        prefill_x, decode_x = r.speedup(results[0])
        rows.append({**asdict(r), "label": label, "prefill_speedup": prefill_x, "decode_speedup": decode_x})
    return rows


# --- speculative decoding with a draft ------------------------------------------------------------------

DRAFT_PROTOCOL = (
    "batch 1, greedy; the prompt is the first --prompt tokens of --prompt-text; plain = one target forward per new "
    "token with the KV cache; speculative = the draft proposes --draft-tokens tokens, the target checks them in one "
    "forward and keeps the longest prefix that matches its own greedy choices, plus its next token; 1 warm-up, then "
    "plain and speculative alternate for --repeats runs each; medians; speedup = plain time / speculative time"
)


@dataclass
class DraftResult:
    model: str
    draft: str
    prompt: int
    new_tokens: int
    draft_tokens: int
    identical: bool  # the speculative output is the model's greedy output, token for token
    acceptance: float  # accepted / proposed draft tokens
    tokens_per_round: float  # new tokens per target forward (accepted + 1)
    plain_tokens_per_second: float  # medians over the runs, prefill included
    speculative_tokens_per_second: float
    speedup: float
    plain_runs: list[float] = field(default_factory=list)
    speculative_runs: list[float] = field(default_factory=list)


def measure_draft(path: str | Path, draft_path: str | Path | None, *, prompt: int = 512, new_tokens: int = 128,
                  draft_tokens: int = 4, repeats: int = 3, text: str = "enwiki-sample", device: str = "cpu",
                  dtype: str = "float32", allow_nonfinite: bool = False,
                  draft_blocks: int | None = None) -> DraftResult:  # fmt: skip
    """Greedy decoding of `path` alone and with `draft_path` (or, with `draft_blocks`, the model's own
    first blocks) as its speculative draft, on a real prompt."""
    from secateur.data import load_text
    from secateur.data.windows import tokenize
    from secateur.generate import shallow_view
    from secateur.io import load

    model, tokenizer = load(path, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
    if draft_blocks is not None:
        draft, draft_path = shallow_view(model, draft_blocks), f"its first {draft_blocks} blocks"
    else:
        draft, _ = load(draft_path, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite)
    ids = tokenize(tokenizer, load_text(text, "evaluation", "text"))
    if len(ids) < prompt:
        raise ConfigError(f"--prompt-text {text} has {len(ids)} tokens, fewer than --prompt {prompt}")
    result = draft_speed(model, draft, ids[:prompt].view(1, -1).to(device), new_tokens, draft_tokens, repeats)
    return dataclasses.replace(result, model=str(path), draft=str(draft_path))


def draft_speed(model: nn.Module, draft: nn.Module, prompt_ids: torch.Tensor, new_tokens: int, draft_tokens: int,
                repeats: int) -> DraftResult:  # fmt: skip
    """Greedy decoding of `model` alone and with `draft` proposing `draft_tokens` per round, after
    `prompt_ids` (1, length): a warm-up pair, then `repeats` pairs, medians."""
    from secateur.generate import greedy, speculative

    reference = greedy(model, prompt_ids, new_tokens)  # also the warm-up
    first = speculative(model, draft, prompt_ids, new_tokens, draft_tokens)
    plain, fast = [], []
    for _ in range(repeats):
        plain.append(new_tokens / greedy(model, prompt_ids, new_tokens).seconds)
        fast.append(new_tokens / speculative(model, draft, prompt_ids, new_tokens, draft_tokens).seconds)
    plain_speed, fast_speed = statistics.median(plain), statistics.median(fast)
    return DraftResult(
        model="", draft="", prompt=prompt_ids.shape[1], new_tokens=new_tokens, draft_tokens=draft_tokens,
        identical=first.tokens == reference.tokens, acceptance=first.acceptance,
        tokens_per_round=(first.accepted + first.target_calls) / max(first.target_calls, 1),
        plain_tokens_per_second=plain_speed, speculative_tokens_per_second=fast_speed, speedup=fast_speed / plain_speed,
        plain_runs=plain, speculative_runs=fast)  # fmt: skip


LLAMA_DRAFT_PROTOCOL = (
    "llama.cpp, greedy (--temp 0 --top-k 1); the prompt is the first --prompt tokens of --prompt-text; plain = "
    "llama-completion, speculative = llama-speculative-simple (--spec-type draft-simple, --draft-tokens per round), "
    "both with --threads threads per model; decode speed without the prompt, as each tool reports it; medians of "
    "--repeats runs; identical = one continuation is a prefix of the other (a round may pass --new-tokens)"
)


def run_llama_tool(binary: Path, *args: Any) -> Any:
    """One of llama.cpp's binaries run to completion, beside its shared libraries; a failure is one line."""
    import os
    import subprocess

    libraries = [str(binary.parent), os.environ.get("LD_LIBRARY_PATH", "")]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in libraries if p)}
    process = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, env=env)
    if process.returncode != 0:
        last = (process.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{binary.name} failed (exit {process.returncode}): {last}")
    return process


def continuation(stdout: str, prompt: str) -> str:
    """What a llama.cpp tool printed after the prompt, without colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    tail = prompt[-60:]
    return text[text.index(tail) + len(tail):].strip() if tail in text else text.strip()


def agree(a: str, b: str) -> bool:
    """Two greedy continuations agree when one is a prefix of the other (a speculative round may pass the
    requested length)."""
    return a.startswith(b) or b.startswith(a)


def completion_speed(stderr: str) -> float:
    """Decode tokens per second from `llama-completion`'s timings (not the prompt's)."""
    import re

    line = next((x for x in stderr.splitlines() if "eval time" in x and "prompt" not in x), "")
    found = re.search(r"([\d.]+) tokens per second", line)
    if found is None:
        raise ConfigError("llama-completion printed no decode speed")
    return float(found[1])


def speculative_stats(stderr: str) -> tuple[int, float, int, int]:
    """(new tokens, decode tokens per second, tokens drafted, drafts accepted) from
    `llama-speculative-simple`'s report."""
    import re

    speed = re.search(r"decoded\s+(\d+) tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+)", stderr)
    counts = re.search(r"n_drafted\s+=\s+(\d+).*?n_accept\s+=\s+(\d+)", stderr, re.S)
    if speed is None or counts is None:
        raise ConfigError("llama-speculative-simple printed no speed or acceptance")
    return int(speed[1]), float(speed[2]), int(counts[1]), int(counts[2])


def measure_draft_llamacpp(path: str | Path, draft_path: str | Path, *, llama_cpp: str | Path | None = None,
                           prompt: int = 512, new_tokens: int = 128, draft_tokens: int = 4, repeats: int = 3,
                           text: str = "enwiki-sample", threads: int | None = None,
                           tokenizer: Any = None) -> DraftResult:  # fmt: skip
    """Plain and speculative greedy decoding of a GGUF file in llama.cpp, with a GGUF draft (the prompt
    tokenized by `tokenizer`, by default the GGUF file's own)."""
    from secateur.data import load_text
    from secateur.data.windows import tokenize
    from secateur.io import load_tokenizer

    plain_tool = llama_cpp_tool("llama-completion", llama_cpp)
    speculative_tool = llama_cpp_tool("llama-speculative-simple", llama_cpp)
    tokenizer = tokenizer or load_tokenizer(path)
    ids = tokenize(tokenizer, load_text(text, "evaluation", "text"))
    if len(ids) < prompt:
        raise ConfigError(f"--prompt-text {text} has {len(ids)} tokens, fewer than --prompt {prompt}")
    words = tokenizer.decode(ids[:prompt].tolist())
    threads = threads or torch.get_num_threads()
    common = ["-n", new_tokens, "--temp", 0, "--top-k", 1, "-t", threads]
    plain, fast, accepted, per_round, texts = [], [], [], [], {}
    for _ in range(repeats):
        out = run_llama_tool(plain_tool, "-m", path, *common, "-no-cnv", "-p", words)
        plain.append(completion_speed(out.stderr))
        texts.setdefault("plain", continuation(out.stdout, words))
        out = run_llama_tool(speculative_tool, "-m", path, "-md", draft_path, "--spec-type", "draft-simple", *common,
                             "-td", threads, "--spec-draft-n-max", draft_tokens, "-p", words)  # fmt: skip
        decoded, speed, drafted, kept = speculative_stats(out.stderr)
        fast.append(speed)
        accepted.append(kept / drafted if drafted else 0.0)
        per_round.append(decoded / max(drafted / draft_tokens, 1.0))  # new tokens per verification
        texts.setdefault("speculative", continuation(out.stdout, words))
    plain_speed, fast_speed = statistics.median(plain), statistics.median(fast)
    return DraftResult(
        model=str(path), draft=str(draft_path), prompt=prompt, new_tokens=new_tokens, draft_tokens=draft_tokens,
        identical=agree(texts["plain"], texts["speculative"]), acceptance=statistics.median(accepted),
        tokens_per_round=statistics.median(per_round), plain_tokens_per_second=plain_speed,
        speculative_tokens_per_second=fast_speed, speedup=fast_speed / plain_speed, plain_runs=plain,
        speculative_runs=fast)  # fmt: skip
