"""`plan(model, config, out)`: from a target to a recipe, with the Pareto front to prove it.

1. Before loading anything: the target, the grids, the engine, the output.
2. Shapes: every width stage (width, hidden, attention split) is pruned once on a one-block copy
   of the model (uniform widths do not depend on the depth), so each candidate's shape, parameters
   and file size are known before any candidate is built.
3. Costs (speed targets): a design of the shapes, and held-out ones, timed in the engine (cached per
   machine and engine); a linear model per hidden size predicts the rest. It only screens: shapes
   predicted within its error below the target stay in.
4. Quality: KL to the dense model after one-shot pruning, by successive halving over the boundary
   (the candidates that may meet the target and remove no more than needed: removing more of any
   kind only loses quality): all on one window, the better share on twice as many, and so on.
   Scores are cached per window, so an interrupted or budget-limited plan goes on where it stopped.
5. Speed targets: the winner's shape is timed against the dense model in pairs (the target's metric
   only); if it misses the target it leaves the search, the checks correct the other predictions
   (and, from two checks on, the tolerance becomes their leave-one-out error where that is
   smaller), and 4 runs again (from the cache) until the winner is one that was timed and meets
   the target.
6. The Pareto front (KL, cost), a plot, and the chosen candidate as a recipe.

`--target draft` (plan/draft.py) searches every candidate but the dense model by the predicted
speedup of speculative decoding with it as the draft (the rounds a replay of decoding takes over
the dense model's own greedy continuations of the proxy windows, its predicted cost per token, the
verification's cost timed on the dense model), then runs the best predicted ones as drafts for real
and chooses the fastest measured.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from secateur.calibrate.stream import block_bars
from secateur.config import CalibConfig
from secateur.data.calibration import bos_token
from secateur.data.enwiki import cache_dir
from secateur.errors import ConfigError
from secateur.experts import ExpertsConfig
from secateur.io import check_model, content_hash, load, load_config, resolve_device
from secateur.models import adapter_for
from secateur.output import Output, claim
from secateur.plan.costs import (
    ArchShape,
    CostBook,
    Engine,
    HFEngine,
    METRICS,
    LlamaCppEngine,
    identity_key,
    llamacpp_alignment,
    parameter_count,
    random_model,
    shape_of,
    timed_model,
    with_layers,
)
from secateur.plan.config import PlanConfig
from secateur.plan.draft import CONTINUATION, RoundCosts, measure_in_engine, parse_tokens, verification_costs
from secateur.plan.proxy import Proxy
from secateur.plan.rows import append_rows, read_rows
from secateur.plan.search import halve, pareto_front, undominated
from secateur.plan.space import (
    Candidate,
    candidates,
    depth_counts,
    parse_grid,
    parse_splits,
    parse_vocabulary,
    split_order,
)
from secateur.plan.targets import Target, parse_target
from secateur.width import WidthConfig, width_prune
from secateur.width.prune import gather_statistics, resolve_variant, width_of
from secateur.width.scores import IMPORTANCE
from secateur.width.structure import WidthError

log = logging.getLogger(__name__)

# A check's speedup must beat the target by this much: a paired speedup drifts with the machine's
# state between the check and any later measurement (SmolLM2 in llama.cpp on a shared 2-core EPYC:
# one pruned model's check measured 1.646x, six paired rounds minutes later 1.56-1.59x).
DEFAULT_MARGIN = 0.05
PROXY_VERSION = 1  # bump when the proxy's definition changes: cached scores of older ones are not reused


@dataclass
class Row:
    """One candidate: its shape and costs (known up front) and its proxy scores (per window)."""

    candidate: Candidate
    shape: ArchShape
    params: int
    file_bytes: int
    speedup: tuple[float, float] | None = None  # (decode, prefill), predicted or timed in pairs
    measured: bool = False  # the speedup was timed on this very shape, against the dense model
    feasible: bool = False  # meets the target (timed, or a size), or may (predicted within the tolerance)
    kl: list[float] = field(default_factory=list)
    accept: list[str] = field(default_factory=list)  # --target draft, per window: proposals accepted ("0101...")
    draft: tuple[int, float] | None = None  # --target draft: (proposals per round, predicted speedup)
    check: dict[str, Any] | None = None  # --target draft: the draft run for real with the dense model

    @property
    def score(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else float("inf")

    @property
    def agreement(self) -> float | None:
        """--target draft: the share of proposals the dense model accepts on its own continuations."""
        return sum(a.count("1") for a in self.accept) / sum(len(a) for a in self.accept) if self.accept else None

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.candidate.key, **asdict(self.candidate), "kind": self.candidate.kind,
                "shape": asdict(self.shape), "params": self.params, "file_bytes": self.file_bytes,
                "decode_speedup": self.speedup[0] if self.speedup else None,
                "prefill_speedup": self.speedup[1] if self.speedup else None, "measured": self.measured,
                "feasible": self.feasible, "kl": self.score if self.kl else None, "windows": len(self.kl),
                **({"agree": self.agreement, "draft_tokens": self.draft[0], "draft_speedup": self.draft[1],
                    "check": self.check, "accept": self.accept} if self.draft else {})}  # fmt: skip


def _engine(config: PlanConfig, target: Target, model_path: str | Path) -> Engine | None:
    """The timing engine a speed target needs (checked before any work); None for size targets. Which
    options apply to which target and engine is the options' own `requires` (plan/config.py)."""
    if not target.timed:
        return None
    lengths = {k: v for k in ("prompt", "new_tokens", "repeats") if (v := getattr(config, k)) is not None}
    if (config.engine or "llama.cpp") == "hf":
        return HFEngine(device=str(resolve_device(config.device)), **lengths)
    from secateur.bench import llama_bench_binary
    from secateur.export.gguf import FAMILIES

    model_type = load_config(model_path).model_type
    if model_type not in FAMILIES:
        raise ConfigError(f"--engine llama.cpp times GGUF exports, which support the {', '.join(sorted(FAMILIES))} "
                          f"families, not {model_type}; use --engine hf")
    binary = llama_bench_binary(config.llama_cpp)
    return LlamaCppEngine(binary, None, threads=config.threads, **lengths)


def _file_bytes(params: int, one_d: int, config: PlanConfig) -> int:
    """The saved file's size: GGUF f16 (1-D tensors f32) for llama.cpp, float32 safetensors for hf."""
    if (config.engine or "llama.cpp") == "llama.cpp":
        return 2 * (params - one_d) + 4 * one_d
    return 4 * params


def block_shapes(model_config: Any, stages: list[Candidate]) -> dict[Candidate, Any | str]:
    """The config each width stage (`Candidate.stage`) leaves, from a one-block random copy of the
    model pruned for real (uniform widths are the same at any depth); a string says why one cannot
    be pruned."""
    one = random_model(_small_vocabulary(with_layers(model_config, 1)))
    calibration = torch.randint(0, one.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out: dict[Candidate, Any | str] = {}
    statistics = None  # one gathering serves every stage (the planner's stages all score alike)
    for stage in stages:
        if not stage.width:
            out[stage] = with_layers(model_config, 1)
            continue
        settings = stage.width_config()
        with block_bars(False):
            if statistics is None:
                statistics = gather_statistics(one, calibration, moments=settings.needs_moments,
                                               gradients=IMPORTANCE[settings.importance].gradients)  # fmt: skip
            skeleton = copy.deepcopy(one)  # pruning rewrites the model and its config
            try:
                width_prune(skeleton, _slicing(skeleton, settings), calibration, statistics=statistics)
            except WidthError as exc:
                out[stage] = str(exc)
                continue
        skeleton.config.vocab_size = model_config.vocab_size
        out[stage] = skeleton.config
    types = getattr(model_config, "layer_types", None)
    for config in out.values():  # a depth's shape gets the model's first attention types (Gemma 3: 5 local, 1 global)
        if isinstance(types, list) and not isinstance(config, str):
            config.layer_types = list(types)
    return out


def _slicing(model: Any, settings: WidthConfig) -> WidthConfig:
    """The settings that give the same shapes without the refit (it changes weights, not shapes:
    a refit pass per stage would only cost time), once the refit's own refusals have run."""
    if not settings.reconstruct:
        return settings
    adapter = adapter_for(model)
    settings, _ = resolve_variant(model, adapter, settings)
    width_of(model, adapter, settings)  # e.g. fused attention that cannot run block by block with fewer heads
    return replace(settings, reconstruct=False)


def stage_counts(one_block: Any) -> Callable[[int], tuple[int, int]]:
    """(all parameters, those in 1-D tensors) of the model of `one_block`'s widths with L blocks, for
    any L: uniform blocks make both linear in L, so two counts on the meta device give them all."""
    one, two = parameter_count(one_block), parameter_count(with_layers(one_block, 2))
    return lambda layers: (one[0] + (layers - 1) * (two[0] - one[0]), one[1] + (layers - 1) * (two[1] - one[1]))


def _distinct(configs: dict[Candidate, Any]) -> tuple[dict[Candidate, Any], dict[str, str]]:
    """One candidate per model: where rounding prunes two width stages to the same shape at the same
    depth (a hidden fraction that the alignment and the head count round away, width fractions
    rounded to the same multiple, an attention split that is the default's), the one asking to
    remove the least stays (the default split before explicit ones); the others are named with it."""
    kept: dict[tuple[int, ArchShape], Candidate] = {}
    same: dict[str, str] = {}
    for c in sorted(configs, key=lambda c: (c.blocks, c.hidden, c.width, *split_order(c.attention), c.experts,
                                           c.vocabulary)):  # fmt: skip
        key = (c.blocks, shape_of(configs[c], c.vocabulary))
        if key in kept:
            same[c.key] = kept[key].key
        else:
            kept[key] = c
    return {c: cfg for c, cfg in configs.items() if c.key not in same}, same


def _small_vocabulary(config: Any) -> Any:
    """`config` with a vocabulary just large enough for its special tokens: widths do not depend on
    it, and the embeddings of a real vocabulary dominate building and pruning a one-block copy."""
    ids = [v for k in ("pad_token_id", "bos_token_id", "eos_token_id") for v in [getattr(config, k, None)]
           if isinstance(v, int)]  # fmt: skip
    config = copy.deepcopy(config)
    config.vocab_size = min(config.vocab_size, max([256, *(i + 1 for i in ids)]))
    return config


def _windows(model: Any, tokenizer: Any, config: PlanConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from secateur.data.calibration import calibration_data

    calib = CalibConfig(source=config.calib, samples=config.calib_samples + config.proxy_windows,
                        seq_len=config.calib_seq_len, seed=config.seed, holdout_windows=config.eval_windows,
                        holdout_seq_len=config.eval_seq_len)  # fmt: skip
    windows = calibration_data(model, tokenizer, calib)
    return windows[: config.calib_samples], windows[config.calib_samples :]


def round_to_of(config: PlanConfig) -> int:
    """Widths' alignment: 8 for transformers; for llama.cpp the step of its f16 kernels on this
    machine (`llamacpp_alignment`: 64 with AVX512F), since it runs misaligned sizes far slower (an
    MLP of 440 channels slower than one of 544, a hidden size of 480 slower than 512)."""
    if config.round_to is not None:
        return config.round_to
    return 8 if config.engine == "hf" else llamacpp_alignment()


def _score_cache(model_path: str | Path, config: PlanConfig) -> Path:
    identity = {"model": content_hash(model_path), "proxy": PROXY_VERSION, "calib": config.calib,
                "samples": config.calib_samples, "seq_len": config.calib_seq_len, "seed": config.seed,
                "windows": config.proxy_windows, "round_to": round_to_of(config),
                "holdout": [config.eval_windows, config.eval_seq_len]}  # fmt: skip
    if config.reconstruct:  # absent otherwise: caches of plans before the option stay valid
        identity["reconstruct"] = True
    if config.vocabulary.strip():  # the windows whose tokens a vocabulary candidate keeps
        identity["vocabulary"] = [config.vocabulary_samples, config.vocabulary_seq_len]
    if parse_target(config.target).draft:  # windows that end in the dense model's own continuation
        identity["continuation"] = continuation_of(config)
    blob = json.dumps(identity, sort_keys=True)
    return cache_dir() / "plan" / f"scores-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.jsonl"


def continuation_of(config: PlanConfig) -> int:
    """--target draft: tokens of the dense model's own continuation that end each proxy window."""
    return min(CONTINUATION, config.calib_seq_len // 2)


def _read_scores(path: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """key -> window -> {"kl": ..., "accept": ...} (rows cached without accepted proposals: KL only)."""
    scores: dict[str, dict[int, dict[str, Any]]] = {}
    for row in read_rows(path):
        scores.setdefault(row["key"], {})[int(row["window"])] = {k: row[k] for k in ("kl", "accept")
                                                                 if k in row}  # fmt: skip
    return scores


@dataclass
class Search:
    """Successive halving over `rows` with the proxy; scores cached per (candidate, window)."""

    rows: dict[str, Row]
    proxy: Proxy
    cache: Path
    keep: float
    windows: int
    deadline: float | None
    progress: bool = True
    rank: Callable[[Row], float] | None = None  # lower is better; default: the mean KL
    needs: tuple[str, ...] = ("kl",)  # the per-window figures a row must have (drafts: "accept" too)
    stopped: str | None = None  # why the search ended before its last rung
    evaluations: int = 0

    def ranked(self, row: Row) -> float:
        return row.score if self.rank is None else self.rank(row)

    def run(self) -> list[int]:
        """Returns the windows read at each rung."""
        known = _read_scores(self.cache)
        self.stopped = None
        rungs, alive, size = [], list(self.rows), 1
        bar = tqdm(total=len(alive), desc="plan: candidates", disable=not self.progress)
        while alive:
            size = min(size, self.windows)
            rungs.append(size)
            for key in sorted(alive, key=lambda k: self.rows[k].candidate):
                cached = known.setdefault(key, {})
                missing = [i for i in range(size) if any(k not in cached.get(i, {}) for k in self.needs)]
                if missing and self._late():
                    self.stopped = f"--budget-minutes reached at rung {len(rungs)} ({size} windows)"
                    bar.close()
                    return rungs
                if missing:
                    self._score(self.rows[key], missing, cached)
                self.rows[key].kl = [cached[i]["kl"] for i in range(size)]
                self.rows[key].accept = [cached[i]["accept"] for i in range(size) if "accept" in cached[i]]
                bar.update(1)
            feasible = {k: self.ranked(self.rows[k]) for k in alive if self.rows[k].feasible}
            if size >= self.windows or len(feasible) <= 1:
                break
            alive = halve(feasible, self.keep)
            size *= 2
            bar.total += len(alive)
            bar.refresh()
        bar.close()
        return rungs

    def _late(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def _score(self, row: Row, missing: list[int], cached: dict[int, dict[str, Any]]) -> None:
        """Build the candidate, score the windows the cache lacks, and append them to it."""
        model = self.proxy.build(row.candidate)
        built = shape_of(model.config)  # its vocabulary is sliced as it is measured
        if built != row.shape.blocks_only:
            raise RuntimeError(f"{row.candidate.key}: built {built.key}, predicted {row.shape.key}")
        scores = self.proxy.measure(model, missing, row.candidate.vocabulary)
        del model
        self.evaluations += 1
        cached.update(zip(missing, scores))
        append_rows(self.cache, [{"key": row.candidate.key, "window": i, **m} for i, m in zip(missing, scores)])


def boundary(rows: dict[str, Row]) -> dict[str, Row]:
    """The rows that meet the target (or may) and that no other such row of the same hidden fraction
    and attention split dominates: no more blocks, width, experts and tokens removed, and less of one."""
    live = [r for r in rows.values() if r.feasible]
    keep = undominated([((r.candidate.hidden, r.candidate.attention),
                         (r.candidate.blocks, r.candidate.width, r.candidate.experts,
                          -(r.candidate.vocabulary or math.inf))) for r in live])  # fmt: skip
    return {live[i].candidate.key: live[i] for i in keep}


def _choose(rows: dict[str, Row], rank: Callable[[Row], float] | None = None) -> Row | None:
    """The best score (`rank`, else the mean KL) among the searched rows meeting the target that were
    scored on the most windows (rows left out of the last search keep older scores, which are not
    compared)."""
    return next(iter(_best(rows, rank)), None)


def _best(rows: dict[str, Row], rank: Callable[[Row], float] | None = None) -> list[Row]:
    """The rows `_choose` chooses among, best first."""
    scored = [r for r in rows.values() if r.kl and r.feasible]
    top = max((len(r.kl) for r in scored), default=0)
    return sorted((r for r in scored if len(r.kl) == top),
                  key=lambda r: (r.score if rank is None else rank(r), r.candidate))  # fmt: skip


def plan(model_path: str | Path, config: PlanConfig, out: str | Path, *, overwrite: bool = False,
         progress: bool = True, engine: Engine | None = None, allow_nonfinite: bool = False,
         explicit: frozenset[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    """Search, write `out/` (plan.toml, plan.json, front.md, pareto.png) and return the plan's record.
    `engine` replaces the one `config` names (tests time a table). The output is claimed first (not
    at or around the model or the text, locked for the whole search)."""
    from secateur.plan.output import PLAN_FILE

    texts = [config.calib] if Path(config.calib).exists() else []
    with claim(out, inputs=[model_path, *texts], overwrite=overwrite, marker=PLAN_FILE) as output:
        config = fit_positions(config, load_config(model_path), explicit)
        return _plan(model_path, config, output, progress, engine, allow_nonfinite, explicit)


def fit_positions(config: PlanConfig, base: Any, explicit: frozenset[str]) -> PlanConfig:
    """Default window lengths longer than the model's positions become its positions (said on the
    console); lengths given (`explicit` keys) that do not fit are refused."""
    from secateur.io import model_positions

    positions = model_positions(base)
    for key in ("calib_seq_len", "eval_seq_len"):
        length = getattr(config, key)
        if positions and length > positions:
            if key in explicit:
                raise ConfigError(f"--{key.replace('_', '-')} {length} is longer than the model's {positions} "
                                  "positions; lower it")
            log.warning("adapted to the model: --%s %d (the default %d is longer than the model's %d positions)",
                        key.replace("_", "-"), positions, length, positions)
            config = replace(config, **{key: positions})
    return config


def _plan(model_path: str | Path, config: PlanConfig, output: Output, progress: bool, engine: Engine | None,
          allow_nonfinite: bool, explicit: frozenset[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    from secateur.plan.output import write_plan

    clock = time.perf_counter()
    target, base, grid = _inputs(model_path, config, explicit)
    if engine is None:
        engine = _engine(config, target, model_path)
    grid, rows, configs, refused, same = _grid(base, grid, config)
    dense_params, dense_one_d = parameter_count(base)
    dense_value = {"params": dense_params, "file": _file_bytes(dense_params, dense_one_d, config)}
    if not target.timed:
        _feasible(rows, target, None, 0.0, {}, dense_value)
    model, tokenizer = load(model_path, dtype="float32", device="cpu", allow_nonfinite=allow_nonfinite)
    calibration, windows = _windows(model, tokenizer, config)  # a short text fails before any timing
    sizes = sorted({c.vocabulary for c in grid} - {0})
    vocabularies = _vocabularies(model, tokenizer, sizes, config) if sizes else {}
    if isinstance(engine, LlamaCppEngine) and engine.vocabulary is None:
        engine.vocabulary = vocabulary_of(tokenizer, model_path, base.vocab_size)
    if isinstance(engine, LlamaCppEngine):  # the timed files of smaller vocabularies hold their own tokens
        engine.vocabularies.update({n: vocabulary_of(tokens, model_path, n, pruned=True)
                                   for n, (_, tokens) in vocabularies.items()})
    book, costs = _costs(engine, base, rows, configs, config, target, progress)
    margin, tolerance = costs["margin"], costs["tolerance"]
    if target.speed:
        _feasible(rows, target, book, margin, tolerance, dense_value)
    rank = round_costs = None
    if target.draft:
        rank, round_costs = _draft_rows(rows, book, engine, base, config, costs)
    setup = time.perf_counter() - clock
    proxy = Proxy(model, calibration, windows, resolve_device(config.device),
                  continuation=continuation_of(config) if target.draft else 0, tokenizer=tokenizer,
                  bos=bos_token(model, tokenizer), vocabularies=vocabularies)  # fmt: skip
    proxy.spans(sorted({c.blocks for c in grid}))
    deadline = clock + config.budget_minutes * 60 if config.budget_minutes else None
    search = Search(rows, proxy, _score_cache(model_path, config), config.keep, config.proxy_windows, deadline,
                    progress, rank, ("kl", "accept") if target.draft else ("kl",))  # fmt: skip
    try:
        with block_bars(progress):
            if target.draft:
                chosen, rungs = _search_drafts(search, rows, rank, round_costs, proxy, engine, tokenizer, config,
                                               costs)  # fmt: skip
            else:
                chosen, rungs, tolerance = _search(search, rows, configs, book, costs, config, target, tolerance,
                                                   dense_value)  # fmt: skip
    finally:
        if book is not None:
            book.close()
    if book is not None:
        costs.update(measured_shapes=len(book.timings) + len(book.checked), correction=book.correction,
                     final_tolerance=tolerance)  # fmt: skip
    record = _record(model_path, config, target, rows, costs, search, rungs, refused, dense_params, chosen)
    record["same_shape"] = same
    record["seconds"] = {"total": time.perf_counter() - clock, "setup": setup, "checks": book.seconds if book else 0.0,
                         **proxy.seconds}  # fmt: skip
    write_plan(output, record)
    return record


WIDTH_AXES = ("width", "hidden", "attention", "reconstruct", "round_to")  # the dense decoders' axes


def _inputs(model_path: str | Path, config: PlanConfig,
            explicit: frozenset[str] = frozenset()) -> tuple[Target, Any, list[Candidate]]:  # fmt: skip
    """The target, the model's config and the candidate grid, every input checked before any work.
    `explicit`: the options the user gave (those of another kind of model are refused)."""
    from secateur.data import load_text

    target = parse_target(config.target)
    depth_counts(config.depth, 2)  # checks the grid before any work
    widths = parse_grid(config.width, "width")
    hiddens = parse_grid(config.hidden, "hidden")
    splits = parse_splits(config.attention)
    shares = parse_grid(config.experts, "experts")
    load_text(config.calib, "calibration", "text")
    check_model(model_path)
    base = load_config(model_path)
    adapter = adapter_for(base)
    tokens = parse_vocabulary(config.vocabulary, base.vocab_size)
    if len(tokens) > 1:
        _check_tokenizer(model_path, tokens)
    if adapter.experts is not None:
        return target, base, _expert_candidates(base, config, target, shares, explicit, tokens)
    if "experts" in explicit:
        raise ConfigError(f"--experts applies to mixtures of experts; {base.model_type} has no routed experts")
    if adapter.width is None:
        raise ConfigError(f"secateur plan prunes width; {base.model_type} has no width description")
    if adapter.width.mlp.size_key != "intermediate_size":  # the shapes the cost model describes
        raise ConfigError(f"secateur plan describes decoders whose config gives intermediate_size (Llama, Qwen, Gemma, "
                          f"Phi-3, GPT-NeoX, ...), not {base.model_type}: prune it with secateur prune")
    if adapter.width.attention is None and splits != (None,):  # the width is all MLP channels there
        raise ConfigError(f"--attention {config.attention}: {base.model_type}'s heads are not pruned (its head size "
                          f"is hidden_size / heads), so there is no split to search: drop --attention")
    grid = candidates(depth_counts(config.depth, base.num_hidden_layers), widths, hiddens, round_to_of(config), splits,
                      config.reconstruct, vocabularies=tokens)  # fmt: skip
    return target, base, grid


def _check_tokenizer(model_path: str | Path, tokens: tuple[int, ...]) -> None:
    """Before any work: the tokenizer is one vocabulary pruning rewrites, and every size asked for holds
    the tokens each pruned vocabulary keeps."""
    from secateur.io import load_tokenizer
    from secateur.vocabulary.bpe import Closure, read_bpe
    from secateur.vocabulary.tokenizer import tokenizer_json

    bpe = read_bpe(tokenizer_json(load_tokenizer(model_path)))
    Closure(bpe)  # refuses what it cannot close
    if min(t for t in tokens if t) < len(bpe.required):
        raise ConfigError(f"--vocabulary {min(t for t in tokens if t)} is fewer than the {len(bpe.required):,} tokens "
                          "every pruned vocabulary keeps (bytes, unknown and special tokens)")


def vocabulary_calibration(config: PlanConfig) -> CalibConfig:
    """The windows whose tokens a vocabulary candidate keeps (the recipe's vocabulary stage counts the same)."""
    return CalibConfig(source=config.calib, samples=config.vocabulary_samples, seq_len=config.vocabulary_seq_len,
                       seed=config.seed, holdout_windows=config.eval_windows, holdout_seq_len=config.eval_seq_len)


def _vocabularies(model: Any, tokenizer: Any, sizes: list[int], config: PlanConfig) -> dict[int, tuple[list[int], Any]]:
    """Per token count: the kept ids and the tokenizer the vocabulary stage would make."""
    from secateur.data.calibration import calibration_data
    from secateur.vocabulary import VocabularyConfig, choose_vocabulary

    windows = calibration_data(model, tokenizer, vocabulary_calibration(config))
    out = {}
    for size in sizes:
        kept, pruned, _ = choose_vocabulary(model, tokenizer, VocabularyConfig(keep_tokens=size), windows)
        out[size] = (kept, pruned)
    return out


def _expert_candidates(base: Any, config: PlanConfig, target: Target, shares: tuple[float, ...],
                       explicit: frozenset[str], tokens: tuple[int, ...] = (0,)) -> list[Candidate]:  # fmt: skip
    """A mixture of experts is planned along depth and the share of every MoE block's routed experts
    removed (the experts stage with its default criterion, REAP); sizes only: the cost model times
    dense decoders."""
    given = [f"--{k.replace('_', '-')}" for k in WIDTH_AXES if k in explicit]
    if given:
        raise ConfigError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to dense decoders; a mixture "
                          f"of experts ({base.model_type}) is planned along --depth and --experts")
    if target.timed:
        raise ConfigError(f"secateur plan times dense decoders only; for a mixture of experts ({base.model_type}) "
                          "give a params= or file= target")
    return candidates(depth_counts(config.depth, base.num_hidden_layers), (0.0,), (0.0,), experts=shares,
                      vocabularies=tokens)


def _expert_configs(base: Any, grid: list[Candidate]) -> tuple[dict[Candidate, Any], dict[str, str]]:
    """Every candidate's config (blocks and expert count; the experts stage's own rounding and
    refusals), and the expert shares that cannot be removed, with the reason."""
    spec = adapter_for(base).experts
    count, top_k = getattr(base, spec.count_key), getattr(base, spec.top_k_key)
    configs, refused = {}, {}
    for c in grid:
        try:
            removed = ExpertsConfig(fraction=c.experts).removed(count, top_k) if c.experts else 0
        except ConfigError as exc:
            refused[f"e{c.experts:g}"] = str(exc)
            continue
        configs[c] = with_tokens(with_layers(base, base.num_hidden_layers - c.blocks), c.vocabulary)
        setattr(configs[c], spec.count_key, count - removed)
    return configs, refused


def _grid(base: Any, grid: list[Candidate], config: PlanConfig) -> tuple:
    """The candidates whose shapes exist, one per distinct shape: (grid, rows by key, configs, refused
    shapes with the reason, candidates that share a shape)."""
    if adapter_for(base).experts is not None:  # counted exactly on the meta device, shape by shape
        configs, refused = _expert_configs(base, grid)
        configs, same = _distinct(configs)
        rows = {}
        for c, cfg in configs.items():
            params, one_d = parameter_count(cfg)
            rows[c.key] = Row(c, shape_of(cfg, c.vocabulary), params, _file_bytes(params, one_d, config))
        return list(configs), rows, configs, refused, same
    blocks = base.num_hidden_layers
    shapes = block_shapes(base, sorted({c.stage for c in grid}))
    refused = {s.key.removeprefix("d0-"): why for s, why in shapes.items() if isinstance(why, str)}
    grid = [c for c in grid if not isinstance(shapes[c.stage], str)]
    configs = {c: with_tokens(with_layers(shapes[c.stage], blocks - c.blocks), c.vocabulary) for c in grid}
    configs, same = _distinct(configs)
    grid = list(configs)
    rows = {}
    counts = {(c.stage, c.vocabulary): stage_counts(with_tokens(shapes[c.stage], c.vocabulary)) for c in grid}
    for c in grid:
        params, one_d = counts[c.stage, c.vocabulary](blocks - c.blocks)
        rows[c.key] = Row(c, shape_of(configs[c], c.vocabulary), params, _file_bytes(params, one_d, config))
    return grid, rows, configs, refused, same


def _search(search: Search, rows: dict[str, Row], configs: dict[Candidate, Any], book: CostBook | None,
            costs: dict[str, Any], config: PlanConfig, target: Target, tolerance: Any,
            dense_value: dict[str, float]) -> tuple[Row, list, Any]:  # fmt: skip
    """Successive halving over the boundary rows; for a speed target, the chosen shape is timed and
    the search goes on until the choice is a measured one. Returns (chosen, rungs, tolerance)."""
    margin = costs["margin"]
    by_key = {c.key: c for c in configs}
    while True:
        search.rows = rows if config.exhaustive else boundary(rows)
        rungs = search.run()
        chosen = _choose(search.rows)
        if chosen is None:
            raise ConfigError("the budget ran out before a candidate meeting the target was scored; raise "
                              "--budget-minutes (a rerun reuses what was scored)")
        if not target.speed or chosen.measured:
            return chosen, rungs, tolerance
        predicted = chosen.speedup
        measured = book.check(configs[by_key[chosen.candidate.key]], target.value * (1 + margin), chosen.shape)
        costs["checks"].append({"key": chosen.candidate.key, "shape": chosen.shape.key, "predicted": predicted,
                                "measured": [v if math.isfinite(v) else None for v in measured]})  # fmt: skip
        # what the checks say the corrected predictions of the other shapes are worth
        loo = book.held_out_error(target.speed_index)
        if config.tolerance is None and loo is not None:
            tolerance = {h: min(t, loo) for h, t in costs["tolerance"].items()}
        _feasible(rows, target, book, margin, tolerance, dense_value)


def _draft_rows(rows: dict[str, Row], book: CostBook, engine: Engine, base: Any, config: PlanConfig,
                costs: dict[str, Any]) -> tuple[Callable[[Row], float], RoundCosts]:  # fmt: skip
    """--target draft: every candidate that removes something is in the search, with its predicted
    decode speedup (the draft's cost per token is its inverse); the verification's cost is timed on
    the dense model. Returns the search's rank (minus the predicted speculative speedup, with the
    round costs as they stand when it is called) and those round costs."""
    for row in rows.values():
        row.speedup = book.speedup(row.shape)
        c = row.candidate
        row.feasible = bool(c.blocks or c.width or c.hidden)
    verify = verification_costs(engine, base, parse_tokens(config.draft_tokens), costs["dense"]["decode"])
    costs["verify"] = {str(k): v for k, v in verify.items()}
    rounds = RoundCosts(verify)

    def rank(row: Row) -> float:
        row.draft = rounds.best(row.accept, 1 / row.speedup[0])
        return -row.draft[1]

    return rank, rounds


def _search_drafts(search: Search, rows: dict[str, Row], rank: Callable[[Row], float], round_costs: RoundCosts,
                   proxy: Proxy, engine: Engine, tokenizer: Any, config: PlanConfig,
                   costs: dict[str, Any]) -> tuple[Row, list[int]]:  # fmt: skip
    """Successive halving by the predicted speculative speedup over every candidate; then, `checks`
    times, the best predicted draft (with its best k) not yet run runs as the dense model's draft for
    real, and what it measured corrects the round costs of every prediction before the next pick.
    The fastest measured that gives the dense model's output is chosen (one that does not is said in
    the record)."""
    search.rows = {k: r for k, r in rows.items() if r.feasible}  # not the dense model
    rungs = search.run()
    if not _best(rows, rank):
        raise ConfigError("the budget ran out before any draft was scored; raise --budget-minutes (a rerun reuses "
                          "what was scored)")
    vocabulary, done, measured = getattr(engine, "vocabulary", None), set(), {}
    while len(done) < config.checks:
        row = next((r for r in _best(rows, rank) if (r.candidate.key, r.draft[0]) not in done), None)
        if row is None:
            break
        k, predicted = row.draft
        draft = proxy.build(row.candidate)
        check = measure_in_engine(engine, proxy.model, draft, tokenizer, config.calib, k, vocabulary)
        del draft
        done.add((row.candidate.key, k))
        costs["checks"].append({"key": row.candidate.key, "predicted": predicted, "overhead": round_costs.overhead,
                                **check})  # fmt: skip
        if row.candidate.key not in measured or check["speedup"] > measured[row.candidate.key]["speedup"]:
            measured[row.candidate.key] = check
        round_costs.correct(k, 1 / row.speedup[0], check["tokens_per_round"], check["speedup"])
    costs["overhead"], costs["implied_overheads"] = round_costs.overhead, list(round_costs.implied)
    for row in rows.values():
        if row.accept and row.feasible:
            rank(row)  # every scored row's figure with the corrected round costs (the record's front)
        row.check = measured.get(row.candidate.key)
    checked = [r for r in rows.values() if r.check]
    return max(checked, key=lambda r: (r.check["identical"], r.check["speedup"])), rungs


def _costs(engine: Engine | None, base: Any, rows: dict[str, Row], configs: dict[Candidate, Any],
           config: PlanConfig, target: Target, progress: bool) -> tuple[CostBook | None, dict[str, Any]]:  # fmt: skip
    """Speed targets: the cost model fitted and checked on held-out shapes of this engine."""
    if engine is None:
        return None, {"engine": None, "margin": 0.0, "tolerance": {}, "checks": []}
    by_shape = {rows[c.key].shape: cfg for c, cfg in configs.items() if not c.vocabulary}  # fewer tokens: predicted
    dense = shape_of(base)
    key = identity_key(engine, base)
    cache = cache_dir() / "plan" / f"costs-{key}.jsonl"
    fitted, timings, errors = timed_model(engine, by_shape, cache, holdout=config.holdout,
                                          rounds=config.timing_rounds or 3, also={dense: base}, progress=progress)  # fmt: skip
    book = CostBook(engine, base, timings, cache_dir() / "plan" / f"paired-{key}.jsonl", config.rounds or 3,
                    target.speed_index)  # fmt: skip
    metric = METRICS[target.speed_index]
    worst = {h: max((abs(e[metric]) for e in errors if e["hidden"] == h), default=0.0)
             for h in sorted({r.shape.hidden for r in rows.values()})}  # fmt: skip
    # each hidden size has its own fit, so its own error (llama.cpp is not smooth across hidden sizes)
    tolerance = {h: config.tolerance if config.tolerance is not None else max(w, 0.05) for h, w in worst.items()}
    return book, {"engine": engine.identity(), "cache": str(cache), "margin": DEFAULT_MARGIN if config.margin is None
                  else config.margin, "tolerance": tolerance, "errors": errors, "checks": [],
                  "dense": asdict(timings[dense]), "rounds": book.rounds, "timing_rounds": config.timing_rounds or 3,
                  "coefficients": {str(h): [list(map(float, c)) for c in v] for h, v in fitted.coefficients.items()}}  # fmt: skip


def vocabulary_of(tokenizer: Any, model_path: str | Path, vocab_size: int, pruned: bool = False) -> Any:
    """The GGUF vocabulary of the model (its source GGUF's where it came from one); `pruned`: of a
    smaller `tokenizer` of it (the source GGUF's at its tokens, else built from its own files)."""
    import tempfile

    from secateur.export.vocab import vocabulary
    from secateur.io import read_manifest

    path = Path(model_path)
    manifest = {"converted_from": str(path)} if path.is_file() else read_manifest(path)
    if not pruned:
        return vocabulary(tokenizer, path.parent if path.is_file() else path, vocab_size, manifest, None)
    with tempfile.TemporaryDirectory(prefix="secateur-plan-tokenizer-") as files:
        tokenizer.save_pretrained(files)
        return vocabulary(tokenizer, Path(files), vocab_size, manifest, None)


def _feasible(rows: dict[str, Row], target: Target, book: CostBook | None, margin: float,
              tolerance: dict[int, float], dense: dict[str, int]) -> None:  # fmt: skip
    """Mark the rows that meet the target: sizes exactly; speeds by their paired timing with `margin`
    to spare, or, untimed, by a prediction within the `tolerance` of their hidden size below that
    (the timing decides later).
    Refuse a target the dense model meets or no row can meet."""
    if not target.speed and target.met(dense[target.metric]):
        raise ConfigError(f"the dense model already meets --target {target} ({dense[target.metric]:,}); "
                          "nothing needs removing")
    for row in rows.values():
        if book is None:
            row.feasible = target.met(row.params if target.metric == "params" else row.file_bytes)
            continue
        row.speedup, row.measured = book.speedup(row.shape), row.shape in book.checked
        slack = margin if row.measured else (1 + margin) * (1 - tolerance[row.shape.hidden]) - 1
        row.feasible = target.met(row.speedup[target.speed_index], slack)
    if not any(r.feasible for r in rows.values()):
        raise ConfigError(f"no candidate of the grid meets --target {target}"
                          f"{' (predicted within the cost model tolerance of %.0f%%, or timed)' % (max(tolerance.values()) * 100) if book else ''}: widen "
                          "--depth / --width / --hidden")


def _counting(config: PlanConfig) -> dict[str, Any]:
    """The vocabulary stage's calibration settings in the recipe: the windows the planner counted."""
    calib = vocabulary_calibration(config)
    return {"calib": calib.source, "calib_samples": calib.samples, "calib_seq_len": calib.seq_len,
            **({"seed": calib.seed} if calib.seed else {})}  # fmt: skip


def with_tokens(config: Any, tokens: int) -> Any:
    """A copy of `config` with `tokens` in its vocabulary (0: `config` itself)."""
    if not tokens:
        return config
    config = copy.deepcopy(config)
    config.vocab_size = tokens
    return config


def cost_of(row: Row, target: Target) -> float:
    """The front's cost axis (lower is better): time per token relative to dense for speed targets,
    else the target's own quantity."""
    if target.metric == "decode-speedup":
        return 1 / row.speedup[0]
    if target.metric == "prefill-speedup":
        return 1 / row.speedup[1]
    if target.draft:  # a draft token's cost in the dense model's decode steps
        return 1 / row.speedup[0]
    return float(row.params if target.metric == "params" else row.file_bytes)


def _record(model_path: str | Path, config: PlanConfig, target: Target, rows: dict[str, Row], costs: dict[str, Any],
            search: Search, rungs: list[int], refused: dict[str, str], dense_params: int,
            chosen: Row) -> dict[str, Any]:  # fmt: skip
    scored = [r for r in rows.values() if r.kl and (r.draft or not target.draft)]
    # a draft's front: disagreement with the dense model against its cost per token
    quality = (lambda r: 1 - r.agreement) if target.draft else (lambda r: r.score)
    front = pareto_front([(quality(r), cost_of(r, target)) for r in scored])
    return {"model": str(Path(model_path).resolve()), "target": str(target), "metric": target.metric,
            "value": target.value, "config": asdict(config), "dense_params": dense_params, "costs": costs,
            "rungs": rungs, "evaluations": search.evaluations, "searched": len(search.rows), "stopped": search.stopped, "refused": refused,
            "candidates": [r.to_dict() for r in rows.values()], "front": [scored[i].candidate.key for i in front],
            "chosen": chosen.to_dict(), "stages": chosen.candidate.stages(_counting(config)),
            "recover_tokens": config.recover_tokens}  # fmt: skip
