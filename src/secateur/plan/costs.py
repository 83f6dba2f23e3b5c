"""The cost model: measured, not guessed.

Random-weight models of candidate shapes are timed once per machine and engine (cached), a linear
model per hidden size is fitted on a design of them, and held-out shapes, timed too, tell its error.
Per hidden size because engines are not smooth in it (llama.cpp runs a 504-wide SmolLM2 at a third
of its prefill speed); within one, a token's time is a fixed cost (embedding, LM head, sampling) plus,
per block, a fixed cost and a term proportional to the block's weights (decode reads each once):

    t(L, block) = a + L * (b + c * block_params)

(Separate attention and MLP terms were tried: the design's blocks shrink both together, so the two
were ill-determined and held-out errors reached 23% on SmolLM2 in llama.cpp, against 6% with one.)
A timing is the fastest of its repetitions, and of `rounds` passes over all the shapes in turn:
interference from other processes only slows a run, and this machine's slow spells last longer
than one run (on SmolLM2 in llama.cpp, one shape's fastest of 5 repetitions in one process moved
by 11% from one pass to the next; the fastest of 3 passes put a 18-block model within 0.3% of the
line through 6 and 30 blocks).

The model only screens. The planner checks its choice by `paired` timing: the candidate's shape and
the dense model in alternation, round after round, the speedup read as the median of the rounds'
ratios, so that a slow spell of the machine slows both sides of a ratio; the checks also correct
the predictions of the shapes not checked (`CostBook`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.errors import ConfigError
from secateur.models import adapter_for
from secateur.plan.rows import append_rows, read_rows


@dataclass(frozen=True, order=True)
class ArchShape:
    """What a uniform decoder's speed depends on (with the family of the base model, and its vocabulary
    unless `vocab` says how many tokens are kept)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    channels: int  # MLP width
    experts: int = 0  # routed experts per MoE block (0: a dense decoder)
    vocab: int = 0  # tokens in the embedding and LM head (0: the base model's)

    @property
    def key(self) -> str:
        experts = f"-e{self.experts}" if self.experts else ""
        vocab = f"-v{self.vocab}" if self.vocab else ""  # absent otherwise: caches of earlier plans stay valid
        return (f"L{self.layers}-h{self.hidden}-q{self.heads}-kv{self.kv_heads}-d{self.head_dim}-c{self.channels}"
                f"{experts}{vocab}")

    @property
    def blocks_only(self) -> "ArchShape":
        """The same blocks with the base model's vocabulary (what the cost model is fitted on)."""
        return replace(self, vocab=0)

    @property
    def attention_params(self) -> int:
        """q, k, v, o weights of one block."""
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def mlp_params(self) -> int:
        """gate, up, down weights of one block."""
        return 3 * self.hidden * self.channels

    def features(self) -> list[float]:
        return [1.0, self.layers, self.layers * (self.attention_params + self.mlp_params) / 1e6]


def shape_of(config: Any, vocab: int = 0) -> ArchShape:
    """`config`'s shape; `vocab`: the tokens it keeps where that is not the base model's vocabulary."""
    heads = config.num_attention_heads
    experts = adapter_for(config).experts
    return ArchShape(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=heads,
                     kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                     head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                     channels=config.intermediate_size,
                     experts=getattr(config, experts.count_key) if experts is not None else 0, vocab=vocab)  # fmt: skip


def with_layers(config: Any, layers: int) -> Any:
    """A copy of `config` with `layers` decoder blocks. Per-layer attention types (Gemma 3, Qwen3) are
    cut to the first `layers`, or repeated in turn where there are fewer (a one-block copy grown back:
    they do not change the parameters, and the timed shapes of the planner are uniform blocks)."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types:
        config.layer_types = [types[i % len(types)] for i in range(layers)]
    return config


def random_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def parameter_count(config: Any) -> tuple[int, int]:
    """(all parameters, those in 1-D tensors) of a model of `config`, counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.ndim == 1)


# --- timings and engines ---------------------------------------------------------------------------------


METRICS = ("decode", "prefill")  # the order of every (decode, prefill) pair


@dataclass(frozen=True)
class Timing:
    decode: float  # seconds per decoded token
    prefill: float  # seconds for the prompt

    def speedup(self, base: "Timing") -> tuple[float, float]:
        """(decode, prefill) speedup over `base`."""
        return base.decode / self.decode, base.prefill / self.prefill


class Engine(Protocol):
    name: str
    keeps: bool  # what `prepare` makes is cheap to keep (a file), so `measure` makes it once for all rounds

    def identity(self) -> dict[str, Any]:
        """What its timings depend on besides the shape (machine, versions, threads, lengths)."""

    def prepare(self, config: Any) -> Any:
        """A random-weight model of `config`, ready to time (a model, a file)."""

    def run(self, prepared: Any, only: str | None = None) -> Timing:
        """Time what `prepare` made; `only` ("decode" or "prefill") lets an engine skip timing the other
        metric, which is then NaN (an engine that cannot skip it times both)."""

    def release(self, prepared: Any) -> None:
        """Free what `prepare` made."""


def paired(engine: Engine, shape: Any, reference: Any, rounds: int = 3, only: str | None = None,
           threshold: float | None = None) -> tuple[tuple[float, float], int]:  # fmt: skip
    """(decode, prefill) speedup of the prepared `shape` over the prepared `reference`, and the rounds
    run: both timed in alternation (the order swapped every round), the median of the rounds'
    ratios. With `only`, the engine may skip the other metric (NaN). With a `threshold` for that
    metric, the rounds stop as soon as those run fix on which side of it the median of all `rounds`
    falls (more than half of them on one side): the same answer, sooner (for three rounds, two
    that agree)."""
    if rounds < 1:
        raise ConfigError(f"paired timing needs at least one round, got {rounds}")
    if threshold is not None and only is None:
        raise ValueError("a threshold applies to the one metric `only` names")
    ratios: list[tuple[float, float]] = []
    for round_ in range(rounds):
        if round_ % 2 == 0:
            mine = engine.run(shape, only)
            theirs = engine.run(reference, only)
        else:
            theirs = engine.run(reference, only)
            mine = engine.run(shape, only)
        ratios.append(mine.speedup(theirs))
        if threshold is not None:
            above = sum(r[METRICS.index(only)] >= threshold for r in ratios)
            if max(above, len(ratios) - above) > rounds // 2:
                break
    speedup = float(np.median([r[0] for r in ratios])), float(np.median([r[1] for r in ratios]))
    return speedup, len(ratios)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine()}


@dataclass
class HFEngine:
    """transformers in this process (secateur bench's protocol: prefill, then greedy decode with the cache)."""

    device: str = "cpu"
    dtype: str = "float32"
    prompt: int = 128
    new_tokens: int = 32
    repeats: int = 3
    name: str = "hf"
    keeps: bool = False  # a model in memory

    def identity(self) -> dict[str, Any]:
        import transformers

        return {"engine": self.name, **machine(), "device": self.device, "dtype": self.dtype,
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__, "prompt": self.prompt, "new_tokens": self.new_tokens,
                "repeats": self.repeats, "estimator": "fastest"}  # fmt: skip

    def prepare(self, config: Any) -> tuple[nn.Module, torch.Tensor]:
        from secateur.io import resolve_dtype

        model = random_model(config, resolve_dtype(self.dtype)).to(self.device)
        ids = torch.randint(0, config.vocab_size, (1, self.prompt), generator=torch.Generator().manual_seed(0))
        return model, ids.to(self.device)

    def run(self, prepared: tuple[nn.Module, torch.Tensor], only: str | None = None) -> Timing:
        """Both metrics always: decoding needs the prefill, which is short next to it."""
        from secateur.bench import _one_run

        model, ids = prepared
        _one_run(model, ids, self.new_tokens)  # warm-up
        runs = [_one_run(model, ids, self.new_tokens) for _ in range(self.repeats)]
        return Timing(decode=1 / max(r[1] for r in runs), prefill=min(r[0] for r in runs))

    def release(self, prepared: Any) -> None:
        pass  # the model goes with the last reference to it


def llamacpp_alignment(flags: set[str] | None = None) -> int:
    """The width llama.cpp's CPU kernels want: ggml's f16 dot product (`ggml_vec_dot_f16`, what a
    decode step runs for every row of every weight) takes GGML_F16_STEP elements per iteration and
    the rest one by one, so a matrix whose input size is not a multiple of the step pays a scalar
    tail on every row. The step is 128 with AVX512-FP16, 64 with AVX512F and 32 with AVX/AVX2 or
    NEON (ggml-cpu/simd-mappings.h, a binary built for the machine it runs on). Measured on a
    2-core EPYC (AVX512F), SmolLM2 with 30 blocks of 1024 channels decoded at 156 tokens/s with a
    hidden size of 480 against 261 with 448 and 224 with 512; 1024 channels beat 1056, 960 beat 992."""
    if flags is None:
        try:
            flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                     for f in line.split(":", 1)[1].split()}  # fmt: skip
        except OSError:
            flags = set()
    if "avx512fp16" in flags:
        return 128
    return 64 if "avx512f" in flags else 32


@dataclass
class LlamaCppEngine:
    """llama-bench on an f16 GGUF of the shape (written with secateur's exporter, the source model's
    vocabulary)."""

    binary: Path
    vocabulary: Any  # secateur.export.vocab.Vocabulary of the source model
    threads: int | None = None
    vocabularies: dict[int, Any] = field(default_factory=dict)  # smaller vocabularies, by size (plan --vocabulary)
    prompt: int = 512
    new_tokens: int = 128
    repeats: int = 5
    kind: str = "f16"
    name: str = "llama.cpp"
    keeps: bool = True  # a file

    def identity(self) -> dict[str, Any]:
        stat = Path(self.binary).stat()
        return {"engine": self.name, **machine(), "binary": str(self.binary), "binary_bytes": stat.st_size,
                "binary_mtime": int(stat.st_mtime), "threads": self.threads or torch.get_num_threads(),
                "type": self.kind, "prompt": self.prompt, "new_tokens": self.new_tokens, "repeats": self.repeats,
                "estimator": "fastest"}  # fmt: skip

    def prepare(self, config: Any) -> Path:
        """The shape as a GGUF file in a new temporary folder."""
        from secateur.export.gguf import model_shape, write_gguf

        model = random_model(config)
        path = Path(tempfile.mkdtemp(prefix="secateur-plan-")) / "shape.gguf"
        try:
            vocabulary = self.vocabularies.get(config.vocab_size, self.vocabulary)
            write_gguf(model, model_shape(model), path, self.kind, None, vocabulary, name="shape")
        except BaseException:
            self.release(path)
            raise
        return path

    def run(self, prepared: Path, only: str | None = None) -> Timing:
        """llama-bench's prefill and decode tests; `only` runs one of them (a decode-only run takes
        about two thirds of the time of both, measured on SmolLM2)."""
        from secateur.bench import measure_llamacpp

        result = measure_llamacpp(prepared, binary=Path(self.binary), prompt=0 if only == "decode" else self.prompt,
                                  new_tokens=0 if only == "prefill" else self.new_tokens, repeats=self.repeats,
                                  threads=self.threads)  # fmt: skip
        return Timing(decode=1 / max(result.decode_runs) if result.decode_runs else float("nan"),
                      prefill=min(result.prefill_runs) if result.prefill_runs else float("nan"))  # fmt: skip

    def release(self, prepared: Path) -> None:
        shutil.rmtree(Path(prepared).parent, ignore_errors=True)


@dataclass
class TableEngine:
    """Timings looked up in a table keyed by shape (tests; or timings measured elsewhere)."""

    table: dict[ArchShape, Timing]
    name: str = "table"
    keeps: bool = True
    calls: list[ArchShape] = field(default_factory=list)
    vocab: int = 0  # the base model's vocabulary: a config with another has a shape of its own

    def identity(self) -> dict[str, Any]:
        return {"engine": self.name, "table": sorted(s.key for s in self.table)}

    def prepare(self, config: Any) -> ArchShape:
        shape = shape_of(config, config.vocab_size if self.vocab and config.vocab_size != self.vocab else 0)
        if shape not in self.table:
            raise ConfigError(f"the timing table has no row for {shape.key}")
        return shape

    def run(self, prepared: ArchShape, only: str | None = None) -> Timing:
        self.calls.append(prepared)
        return self.table[prepared]

    def release(self, prepared: Any) -> None:
        pass


# --- measuring, cached ----------------------------------------------------------------------------------


def identity_key(engine: Engine, base: Any) -> str:
    """The cache key of an engine's timings of one model family and vocabulary on this machine."""
    family = {"model_type": base.model_type, "vocab": base.vocab_size, "tied": bool(base.tie_word_embeddings)}
    blob = json.dumps({**engine.identity(), **family}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def measure(engine: Engine, configs: dict[ArchShape, Any], cache: Path | None, *, rounds: int = 1,
            progress: bool = True) -> dict[ArchShape, Timing]:  # fmt: skip
    """Timings of every shape: `rounds` passes over the shapes in turn, each shape's timing the
    fastest of its passes (decode and prefill each). Passes are read from `cache` (JSONL, one line
    per shape and pass) where there, measured and appended otherwise, so an interrupted measurement
    goes on where it stopped and a later call with more rounds times only the passes it lacks."""
    if rounds < 1:
        raise ConfigError(f"timing needs at least one round, got {rounds}")
    known: dict[str, dict[int, Timing]] = {}
    for row in read_rows(cache):
        known.setdefault(row["shape"], {})[int(row.get("round", 0))] = Timing(row["decode"], row["prefill"])
    todo = [(r, s) for r in range(rounds) for s in configs if r not in known.get(s.key, {})]
    last = {s: r for r, s in todo}  # the last pass a shape is timed in
    prepared: dict[ArchShape, Any] = {}
    try:
        for round_, shape in tqdm(todo, desc=f"timing shapes ({engine.name})", disable=not progress or not todo):
            if shape not in prepared:
                prepared[shape] = engine.prepare(configs[shape])
            try:
                timing = engine.run(prepared[shape])
            finally:
                if not engine.keeps or last[shape] == round_:
                    engine.release(prepared.pop(shape))
            known.setdefault(shape.key, {})[round_] = timing
            append_rows(cache, [{"shape": shape.key, "round": round_, **asdict(shape), **asdict(timing)}])
    finally:
        for leftover in prepared.values():
            engine.release(leftover)
    return {s: fastest([known[s.key][r] for r in range(rounds)]) for s in configs}


def fastest(timings: list[Timing]) -> Timing:
    return Timing(min(t.decode for t in timings), min(t.prefill for t in timings))


# --- the model ----------------------------------------------------------------------------------------------


@dataclass
class CostModel:
    """Least squares per hidden size on `ArchShape.features`, for decode and prefill seconds."""

    coefficients: dict[int, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def fit(cls, timings: dict[ArchShape, Timing]) -> "CostModel":
        coefficients = {}
        for hidden in sorted({s.hidden for s in timings}):
            shapes = [s for s in timings if s.hidden == hidden]
            x = np.array([s.features() for s in shapes], dtype=np.float64)
            fits = [np.linalg.lstsq(x, np.array([getattr(timings[s], k) for s in shapes]), rcond=None)[0]
                    for k in METRICS]  # fmt: skip
            coefficients[hidden] = (fits[0], fits[1])
        return cls(coefficients)

    def covers(self, shape: ArchShape) -> bool:
        return shape.hidden in self.coefficients

    def predict(self, shape: ArchShape) -> Timing:
        if not self.covers(shape):
            raise ConfigError(f"the cost model has no measured shape of hidden size {shape.hidden}")
        decode, prefill = self.coefficients[shape.hidden]
        x = np.array(shape.features())
        return Timing(float(x @ decode), float(x @ prefill))

    def errors(self, measured: dict[ArchShape, Timing]) -> list[dict[str, Any]]:
        """Relative error of the predictions on `measured` (held-out) shapes."""
        rows = []
        for shape, timing in measured.items():
            guess = self.predict(shape)
            rows.append({"shape": shape.key, "hidden": shape.hidden, "decode": guess.decode / timing.decode - 1,
                         "prefill": guess.prefill / timing.prefill - 1})  # fmt: skip
        return rows


def design(shapes: Iterable[ArchShape], holdout: int = 3) -> tuple[list[ArchShape], list[ArchShape]]:
    """(shapes to fit on, shapes held out) per hidden size: the fewest and most layers crossed with the
    smallest, middle and largest block, and up to `holdout` others spread over the rest (a hidden size
    with four shapes or fewer is measured whole and holds none out)."""

    def rank(group: list[ArchShape]) -> int:
        return int(np.linalg.matrix_rank(np.array([s.features() for s in group])))

    fit: list[ArchShape] = []
    held: list[ArchShape] = []
    shapes = sorted(set(shapes))
    for hidden in sorted({s.hidden for s in shapes}):
        group = [s for s in shapes if s.hidden == hidden]
        if len(group) <= 4:
            fit += group
            continue
        layers = sorted({s.layers for s in group})
        blocks = sorted({(s.heads, s.kv_heads, s.head_dim, s.channels) for s in group},
                        key=lambda b: (b[0] + b[1]) * b[2] * 2 + 3 * b[3])  # fmt: skip
        picked = {blocks[0], blocks[len(blocks) // 2], blocks[-1]}
        chosen = [s for s in group if s.layers in (layers[0], layers[-1])
                  and (s.heads, s.kv_heads, s.head_dim, s.channels) in picked]  # fmt: skip
        if rank(chosen) < rank(group):  # the corners do not determine what the group's shapes vary in
            chosen = group[:: max(len(group) // 6, 1)]
        rest = [s for s in group if s not in chosen]
        step = max(len(rest) / max(holdout, 1), 1)
        fit += chosen
        held += [rest[int(i * step)] for i in range(min(holdout, len(rest)))]
    return fit, held


def timed_model(engine: Engine, configs: dict[ArchShape, Any], cache: Path | None, *, holdout: int = 3,
                rounds: int = 1, also: dict[ArchShape, Any] | None = None,
                progress: bool = True) -> tuple[CostModel, dict[ArchShape, Timing], list[dict[str, Any]]]:  # fmt: skip
    """Measure the design and held-out shapes among `configs` (and the shapes `also` names, such as
    the dense model, in the same passes), fit on the design; returns the model, every measured
    timing and the held-out errors."""
    fit, held = design(configs, holdout)
    wanted = {**{s: configs[s] for s in [*fit, *held]}, **(also or {})}
    timings = measure(engine, wanted, cache, rounds=rounds, progress=progress)
    model = CostModel.fit({s: timings[s] for s in fit})
    return model, timings, model.errors({s: timings[s] for s in held})


@dataclass
class CostBook:
    """Speedups of shapes over the dense model: from paired timings where a shape was checked, else
    the cost model's prediction times a correction learnt from the checks.

    The model is fitted on single timings, the dense model's among them, so an error in that one
    timing moves every predicted speedup the same way (seen on SmolLM2 in llama.cpp: predictions 6%
    high across the board). Each metric's correction is the median over the checked shapes of
    measured / predicted, which removes such a shared error after one check.

    With `metric` (0: decode, 1: prefill) the checks time only that one, where the engine can skip
    the other; the dense model is prepared once for all checks (`close` frees it)."""

    engine: Engine
    base: Any  # the dense model's config
    timings: dict[ArchShape, Timing]  # single timings, the dense shape's among them
    cache: Path | None = None  # paired timings, one JSONL row per checked shape
    rounds: int = 3
    metric: int | None = None  # the one metric checks time (None: both)
    checked: dict[ArchShape, tuple[float, float]] = field(default_factory=dict)  # NaN where not timed
    seconds: float = 0.0  # spent timing checks
    correction: tuple[float, float] = (1.0, 1.0)  # (decode, prefill) factors learnt from the checks

    def __post_init__(self) -> None:
        self.dense = shape_of(self.base)
        if self.dense not in self.timings:
            raise ValueError("the cost book needs the dense model's timing")
        self.model = CostModel.fit(self.timings)
        # the dense model's decode seconds per weight read a token: all of them but an untied embedding's
        # (one row is read); measured whole, where a slope fitted across shapes of the blocks alone is
        # at the mercy of their noise (Gemma-3-270M in llama.cpp: its blocks are a third of the bytes)
        total, _ = parameter_count(self.base)
        embedding = 0 if getattr(self.base, "tie_word_embeddings", False) else self.base.vocab_size * self.base.hidden_size
        self.per_parameter = self.timings[self.dense].decode / (total - embedding)
        wanted = METRICS if self.metric is None else (METRICS[self.metric],)
        self._cached = {r["shape"]: r for r in read_rows(self.cache) if r["base"] == self.dense.key
                        and r["rounds"] == self.rounds and all(r.get(k) is not None for k in wanted)}  # fmt: skip
        self._reference: Any = None  # the dense model, prepared at the first check

    def predicted(self, shape: ArchShape) -> tuple[float, float]:
        """The model's (decode, prefill) speedup, uncorrected. A shape with fewer tokens is its blocks'
        prediction less the LM head rows it drops, at the dense model's decode time per weight it
        reads a token (`per_parameter`: decoding reads every weight once a token, the head's like the
        blocks'); prefill is left as predicted (llama-bench's prefill takes the logits of its last
        token only)."""
        timing = self.model.predict(shape.blocks_only)
        if shape.vocab:
            rows = self.base.vocab_size - shape.vocab
            timing = Timing(timing.decode - self.per_parameter * rows * shape.hidden, timing.prefill)
        return timing.speedup(self.timings[self.dense])

    def _ratios(self, metric: int) -> dict[ArchShape, float]:
        """measured / predicted of the checked shapes that timed `metric`."""
        return {s: m[metric] / self.predicted(s)[metric] for s, m in self.checked.items() if np.isfinite(m[metric])}

    def held_out_error(self, metric: int) -> float | None:
        """What the checks say an unchecked shape's corrected prediction is worth: the largest
        relative error on a checked shape when the correction is learnt from the other checks
        (leave-one-out; the in-sample error of one check is zero by construction). None with fewer
        than two checks."""
        ratios = self._ratios(metric)
        if len(ratios) < 2:
            return None
        return max(abs(r / float(np.median([o for t, o in ratios.items() if t != s])) - 1) for s, r in ratios.items())

    def speedup(self, shape: ArchShape) -> tuple[float, float]:
        """(decode, prefill) over dense: measured in pairs where checked, else predicted and corrected."""
        guess = [p * c for p, c in zip(self.predicted(shape), self.correction)]
        measured = self.checked.get(shape, (float("nan"), float("nan")))
        return tuple(m if np.isfinite(m) else g for m, g in zip(measured, guess))  # type: ignore[return-value]

    def check(self, config: Any, threshold: float | None = None, shape: ArchShape | None = None) -> tuple[float, float]:
        """Time `config`'s shape (`shape`, where it keeps fewer tokens) against the dense model in pairs
        (cached), and update the correction. With a `threshold` for the book's metric, the rounds stop
        once they decide on which side of it the shape falls (`paired`); such a timing is reused only
        for the same threshold."""
        shape = shape or shape_of(config)
        row = self._cached.get(shape.key)
        if row is not None and row.get("ran", self.rounds) < self.rounds and row.get("threshold") != threshold:
            row = None
        if row is None:
            clock = time.perf_counter()
            only = None if self.metric is None else METRICS[self.metric]
            if self._reference is None:
                self._reference = self.engine.prepare(self.base)
            prepared = self.engine.prepare(config)
            try:
                (decode, prefill), ran = paired(self.engine, prepared, self._reference, self.rounds, only,
                                                threshold if only else None)  # fmt: skip
            finally:
                self.engine.release(prepared)
            self.seconds += time.perf_counter() - clock
            row = {"shape": shape.key, "base": self.dense.key, "rounds": self.rounds, "ran": ran,
                   "threshold": threshold if ran < self.rounds else None,
                   **{k: v if np.isfinite(v) else None for k, v in (("decode", decode), ("prefill", prefill))}}  # fmt: skip
            append_rows(self.cache, [row])
            self._cached[shape.key] = row
        self.checked[shape] = tuple(float("nan") if row.get(k) is None else float(row[k]) for k in METRICS)  # type: ignore[assignment]
        self.correction = tuple(float(np.median(list(r.values()))) if (r := self._ratios(m)) else 1.0 for m in (0, 1))  # type: ignore[assignment]
        return self.checked[shape]

    def close(self) -> None:
        """Free the dense model prepared for the checks."""
        if self._reference is not None:
            self.engine.release(self._reference)
            self._reference = None
