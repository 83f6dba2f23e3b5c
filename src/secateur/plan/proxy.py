"""The quality proxy: KL divergence from the dense model's next-token distributions, after one-shot
pruning, on calibration windows that the statistics did not see.

Everything a candidate needs that does not depend on its width is computed once: the angular
distances of every span length (one pass), the dense model's width statistics (one pass, which also
keeps the activations entering the blocks where depth levels start to differ and those leaving their
removed runs), and per depth level the compensated shallower model and its width statistics. A level
differs from the dense model from the block before its removed run on (the block compensation fits):
the fit reads the kept activations entering that block and, as its target, those leaving the run,
so no block of the run runs; the statistics pass starts at that block, on the kept dense
activations; the statistics of the blocks before are the dense ones. A candidate is then a copy of
its level sliced by `width_prune` with those statistics, and one forward per window. A mixture of
experts' candidate is a copy of its level whose experts `prune_experts` removes (its own streamed
pass over the calibration windows, REAP).

A candidate that also keeps fewer tokens (its last stage, as in the recipe) cannot be compared token
for token: its tokenizer splits the text of a removed token into smaller kept ones. Its score adds,
to the KL of the candidate with the whole vocabulary, the cross-entropy its vocabulary adds on the
window's text: (the summed next-token cross-entropy of the sliced model on the text re-tokenized,
less that of the unsliced model on the window) / the window's predicted tokens, in nats per token of
the dense tokenization like the KL. It is negative where every token of the text is kept (the
probability of the removed tokens goes to the kept ones) and large where rare words are split."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.calibrate.stream import BlockState
from secateur.depth.compensate import compensate, unavailable
from secateur.depth.scores import lowest
from secateur.depth.search import angular_distances
from secateur.depth.structure import remove_blocks
from secateur.experts import ExpertsConfig, prune_experts
from secateur.models import adapter_for
from secateur.plan.draft import accepted, continued
from secateur.data.windows import tokenize
from secateur.plan.space import Candidate
from secateur.vocabulary.model import slice_vocabulary
from secateur.width import width_prune
from secateur.width.prune import Statistics, gather_statistics


def token_cross_entropy(logits: Tensor, ids: Tensor) -> Tensor:
    """The summed next-token cross-entropy (nats) of (seq, vocab) logits on their (seq,) ids."""
    return F.cross_entropy(logits[:-1].float(), ids[1:].to(logits.device), reduction="sum")


def token_kl(teacher_logprobs: Tensor, student_logits: Tensor) -> Tensor:
    """KL(teacher || student) per position: sum_v p_t(v) (log p_t(v) - log p_s(v)).
    (..., vocab) log-probabilities and logits -> (...)."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logprobs.exp() * (teacher_logprobs - student)).sum(-1)


@torch.no_grad()
def window_scores(model: nn.Module, window: Tensor, teacher_logprobs: Tensor, device: torch.device,
                  tail: int = 0, nats: bool = False) -> dict[str, Any]:  # fmt: skip
    """Over one window's positions: the mean KL; with `tail`, whether the model's proposal for each of
    the window's last `tail` tokens is the teacher's (`accept`, a string of 0 and 1: plan/draft.py)."""
    logits = model(input_ids=window[None].to(device), use_cache=False).logits[0]  # (seq, vocab)
    teacher = teacher_logprobs.to(device)
    scores: dict[str, Any] = {"kl": float(token_kl(teacher, logits).mean())}
    if nats:  # the summed cross-entropy on the window's own tokens (a vocabulary's score starts from it)
        scores["nats"] = float(token_cross_entropy(logits, window))
    if tail:  # position i predicts token i + 1
        scores["accept"] = accepted(teacher[-tail - 1 : -1], logits[-tail - 1 : -1])
    return scores


@dataclass
class Level:
    """The dense model less `removed`, compensated: kept as the parameters compensation changed (so an
    evicted level's model is rebuilt from the dense one without another pass) and, while recently
    used, as the model itself."""

    removed: list[int]
    patch: dict[str, Tensor]  # parameters (dense model names) that compensation changed
    model: nn.Module | None = None
    statistics: Statistics | None = None  # width statistics, gathered when a candidate first needs them


@dataclass
class Proxy:
    """Builds candidates from `model` (left unchanged) and scores them on `windows`."""

    model: nn.Module
    calibration: Tensor  # (samples, seq) windows for the statistics, the spans and the fit
    windows: Tensor  # (n, seq) windows the proxy is measured on
    device: torch.device
    batch_size: int = 4
    damp: float = 0.1  # the depth stage's compensate_damp default
    max_levels: int = 6  # depth levels whose model is kept (a copy each); older ones are rebuilt from patches
    continuation: int = 0  # each window's last tokens replaced by the dense model's greedy continuation (drafts)
    tokenizer: Any = None  # the dense model's: candidates with fewer tokens re-tokenize the windows' text
    bos: int | None = None  # the BOS id the windows start with (None: none)
    vocabularies: dict[int, tuple[list[int], Any]] = field(default_factory=dict)  # tokens -> (kept ids, tokenizer)
    levels: dict[int, Level] = field(default_factory=dict)
    _held: dict[int, None] = field(default_factory=dict)  # levels holding a model, least recently used first
    seconds: dict[str, float] = field(default_factory=lambda: {"spans": 0.0, "levels": 0.0, "teacher": 0.0,
                                                                "builds": 0.0, "candidates": 0.0})  # fmt: skip
    _distances: dict[int, list[float]] | None = None
    _teacher: dict[int, Tensor] = field(default_factory=dict)
    _continued: dict[int, Tensor] = field(default_factory=dict)
    _dense: Statistics | None = None  # the dense model's width statistics
    _states: dict[int, list[Tensor]] = field(default_factory=dict)  # dense activations entering level starts

    def spans(self, counts: list[int]) -> None:
        """The angular distances of every span length in `counts`, in one pass."""
        clock = time.perf_counter()
        counts = [c for c in counts if c]
        if counts:
            self._distances = angular_distances(self.model, adapter_for(self.model), self.calibration, counts,
                                                self.batch_size, self.device)  # fmt: skip
        self.seconds["spans"] += time.perf_counter() - clock

    def removed(self, blocks: int) -> list[int]:
        if not blocks:
            return []
        if self._distances is None or blocks not in self._distances:
            self.spans([blocks])
        start = lowest(self._distances[blocks], 1)[0]
        return list(range(start, start + blocks))

    def level(self, blocks: int) -> Level:
        if blocks not in self.levels:
            clock = time.perf_counter()
            model, adapter = copy.deepcopy(self.model), adapter_for(self.model)
            removed = self.removed(blocks)
            if removed and unavailable(adapter) is None:
                after = removed[-1] + 1  # the dense state entering it is the fit's target
                targets = {removed[-1]: self._states[after]} if after in self._states else None
                compensate(model, adapter, removed, self.calibration, self.batch_size, self.device, self.damp,
                           self._start(removed), targets)  # fmt: skip
            dense = dict(self.model.named_parameters())
            patch = {n: p.detach().clone() for n, p in model.named_parameters() if not torch.equal(p, dense[n])}
            if removed:
                remove_blocks(model, adapter, removed)
            self.levels[blocks] = Level(removed, patch, model)
            self.seconds["levels"] += time.perf_counter() - clock
        level = self.levels[blocks]
        self._held.pop(blocks, None)
        self._held[blocks] = None  # most recently used last
        while len(self._held) > self.max_levels:
            self.levels[next(iter(self._held))].model = None
            self._held.pop(next(iter(self._held)))
        if level.model is None:
            level.model = self._rebuild(level)
        return level

    def _rebuild(self, level: Level) -> nn.Module:
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, value in level.patch.items():
                model.get_parameter(name).copy_(value)
        if level.removed:
            remove_blocks(model, adapter_for(model), level.removed)
        return model

    @staticmethod
    def _first_changed(removed: list[int]) -> int:
        """The first block of a level that is not the dense model's: the one compensation fits."""
        return max(removed[0] - 1, 0)

    def _start(self, removed: list[int]) -> BlockState | None:
        """The dense activations entering the level's first changed block, where the dense pass kept them."""
        index = self._first_changed(removed)
        return BlockState(index, self._states[index]) if index in self._states else None

    def dense_statistics(self) -> Statistics:
        """The dense model's width statistics; the pass keeps, for every span length measured so far,
        the activations entering the level's first changed block and those leaving its removed run
        (the compensation's start and target: the level is then fitted without running the run)."""
        if self._dense is None:
            clock = time.perf_counter()
            spans = [self.removed(n) for n in (self._distances or {})]
            wanted = {self._first_changed(r) for r in spans} | {r[-1] + 1 for r in spans}

            def keep(index: int, hidden: list[Tensor]) -> None:
                if index in wanted:
                    self._states[index] = [h.cpu() for h in hidden]

            self._dense = gather_statistics(self.model, self.calibration, moments=True, gradients=False,
                                            device=self.device, batch_size=self.batch_size, observe=keep)  # fmt: skip
            self.seconds["levels"] += time.perf_counter() - clock
        return self._dense

    def statistics(self, level: Level) -> Statistics:
        """The level's width statistics: the dense ones for its unchanged blocks, one pass for the rest."""
        if level.statistics is None:
            dense = self.dense_statistics()
            if not level.removed:
                level.statistics = dense
                return dense
            clock = time.perf_counter()
            start = self._start(level.removed)
            tail = gather_statistics(level.model, self.calibration, moments=True, gradients=False,
                                     device=self.device, batch_size=self.batch_size, start=start)  # fmt: skip
            first, prefix = (start.index if start else 0), adapter_for(level.model).blocks + "."
            head = {k: v for k, v in dense.moments.items() if int(k[len(prefix):].split(".", 1)[0]) < first}
            level.statistics = Statistics({**head, **tail.moments})
            self.seconds["levels"] += time.perf_counter() - clock
        return level.statistics

    def build(self, candidate: Candidate) -> nn.Module:
        """The candidate, pruned one-shot (a new model)."""
        # first: a new level's compensation reads the states it keeps (a mixture of experts has no width
        # statistics: its levels compensate from a pass of their own)
        if candidate.width or (candidate.blocks and adapter_for(self.model).width is not None):
            self.dense_statistics()
        level = self.level(candidate.blocks)
        statistics = self.statistics(level) if candidate.width else None  # timed as "levels"
        clock = time.perf_counter()
        model = copy.deepcopy(level.model)
        if candidate.experts:  # after the blocks, as the recipe orders them
            prune_experts(model, ExpertsConfig(fraction=candidate.experts), self.calibration, device=self.device,
                          batch_size=self.batch_size)  # fmt: skip
        if candidate.width:
            config = candidate.width_config()
            width_prune(model, config, self.calibration if config.reconstruct else None,
                        device=self.device, batch_size=self.batch_size, statistics=statistics)  # fmt: skip
        self.seconds["builds"] += time.perf_counter() - clock
        return model

    def window(self, index: int) -> Tensor:
        """Proxy window `index`; with `continuation`, its last tokens are the dense model's own greedy
        continuation of the rest (what the dense model verifies when a draft proposes)."""
        if not self.continuation:
            return self.windows[index]
        if index not in self._continued:
            clock = time.perf_counter()
            self.model.to(self.device).eval()
            self._continued[index] = continued(self.model, self.windows[index], self.continuation, self.device)
            self.seconds["teacher"] += time.perf_counter() - clock
        return self._continued[index]

    def teacher(self, index: int) -> Tensor:
        if index not in self._teacher:
            window = self.window(index)
            clock = time.perf_counter()
            with torch.no_grad():
                self.model.to(self.device)
                logits = self.model(input_ids=window[None].to(self.device), use_cache=False).logits[0]
                self._teacher[index] = F.log_softmax(logits.float(), dim=-1).cpu()
            self.seconds["teacher"] += time.perf_counter() - clock
        return self._teacher[index]

    def score(self, model: nn.Module, indices: range) -> list[float]:
        """Per-window KL of a built candidate on the proxy windows `indices`."""
        return [m["kl"] for m in self.measure(model, indices)]

    def measure(self, model: nn.Module, indices: range, vocabulary: int = 0) -> list[dict[str, Any]]:
        """Per-window KL (and, with `continuation`, the accepted proposals) of a built candidate on the
        proxy windows `indices`; with `vocabulary` (tokens kept), `model`'s vocabulary is then sliced
        to them and the cross-entropy that adds on the windows' text is added to the KL ("kl"; the
        part in "vocabulary")."""
        teachers = [self.teacher(i) for i in indices]  # timed apart, as "teacher"
        clock = time.perf_counter()
        model.to(self.device).eval()
        scores = [window_scores(model, self.window(i), t, self.device, self.continuation, nats=bool(vocabulary))
                  for i, t in zip(indices, teachers)]  # fmt: skip
        if vocabulary:
            kept, tokenizer = self.vocabularies[vocabulary]
            slice_vocabulary(model, kept)
            for index, score in zip(indices, scores):
                window = self.window(index)
                text = window[1:] if self.bos is not None and int(window[0]) == self.bos else window
                ids = tokenize(tokenizer, self.tokenizer.decode(text.tolist(), clean_up_tokenization_spaces=False))
                if text is not window:
                    ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
                with torch.no_grad():
                    logits = model(input_ids=ids[None].to(self.device), use_cache=False).logits[0]
                score["vocabulary"] = (float(token_cross_entropy(logits, ids)) - score.pop("nats")) / (len(window) - 1)
                score["kl"] += score["vocabulary"]
        self.seconds["candidates"] += time.perf_counter() - clock
        return scores
