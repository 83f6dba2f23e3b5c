"""Choosing GemFilter's filter layer for a model: needle-in-a-haystack prompts from a text the
long-context benchmark does not read, every block's selection at the budget, and the earliest block
(the cheapest filter: the filter pass runs the blocks up to it) whose selections keep the planted
answer about as often as the best block's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.generate.tokens import TokenPruning, attention_modules, filter_scores, select
from secateur.schema import option


@dataclass(frozen=True)
class FilterSearch:
    """How `secateur filter-layer` measures the blocks; its flags are generated from these fields."""

    text: str = option("enwiki-sample", "the text the haystacks are cut from (its second half: the long-context "
                                        "benchmark reads the first)")
    length: int = option(4096, "prompt length in tokens (at most the model's context)")
    samples: int = option(8, "haystacks, their needles at evenly spaced depths")
    budget: int = option(512, "kept tokens the selections are judged at")
    pool: int = option(5, "width of the moving average over the scores (odd; 1: none)")
    tolerance: float = option(0.1, "the chosen block keeps the answer's tokens at least this close to the best "
                                   "block's rate (a fraction)")
    seed: int = option(0, "seed of the needles' keys and numbers")

    def __post_init__(self) -> None:
        for name in ("length", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        TokenPruning(filter_layer=0, budget=self.budget, pool=self.pool)  # the settings it writes, checked as read
        if not 0.0 <= self.tolerance <= 1.0:
            raise ConfigError(f"--tolerance is a fraction in 0..1, got {self.tolerance}")
        if self.budget >= self.length:
            raise ConfigError(f"--budget {self.budget} keeps the whole --length {self.length} prompt; give a smaller "
                              "budget or a longer prompt")


def layer_recall(model: nn.Module, prompts: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], budget: int,
                 pool: int = 5) -> list[float]:  # fmt: skip
    """For every block, the mean over prompts of the fraction of the answer span's tokens (`spans`,
    [start, end) in each prompt) that its GemFilter selection at `budget` keeps. One forward per
    prompt reads every block's scores."""
    blocks = len(attention_modules(model))
    device = next(model.parameters()).device
    kept = torch.zeros(blocks)
    for prompt, (start, end) in zip(prompts, spans, strict=True):
        if not 0 <= start < end <= len(prompt):
            raise ValueError(f"answer span [{start}, {end}) lies outside a prompt of {len(prompt)} tokens")
        scores = filter_scores(model, torch.as_tensor([list(prompt)], device=device), None, range(blocks))
        for block, row in scores.items():
            chosen = select(row[0], budget, pool)
            kept[block] += ((chosen >= start) & (chosen < end)).sum().item() / (end - start)
    return (kept / len(prompts)).tolist()


def recommend_layer(recall: Sequence[float], tolerance: float = 0.1) -> int:
    """The earliest block (the cheapest filter) whose recall is within `tolerance` of the best block's."""
    best = max(recall)
    return next(i for i, r in enumerate(recall) if r >= best - tolerance)


def depths(samples: int) -> list[float]:
    """`samples` needle depths spread evenly over the text, ends excluded."""
    return [(i + 0.5) / samples for i in range(samples)]


def find_filter_layer(model: nn.Module, tokenizer: Any, search: FilterSearch) -> dict[str, Any]:
    """Every block's recall on the search's haystacks, and the recommended block."""
    from secateur.data.haystack import haystacks
    from secateur.data.sources import load_text
    from secateur.data.windows import tokenize
    from secateur.io import model_positions

    positions = model_positions(model.config)
    if positions is not None and search.length > positions:
        raise ConfigError(f"--length {search.length} is beyond the model's context of {positions} tokens")
    ids = tokenize(tokenizer, load_text(search.text, "calibration")).tolist()
    stacks = haystacks(tokenizer, ids, search.length, depths(search.samples), seed=search.seed, offset=len(ids) // 2)
    recall = layer_recall(model, [h.ids for h in stacks], [h.span for h in stacks], search.budget, search.pool)
    return {"recall": recall, "filter_layer": recommend_layer(recall, search.tolerance),
            "prompt_tokens": [len(h.ids) for h in stacks]}
