"""Vocabulary pruning of a model and its tokenizer together."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from secateur.vocabulary.bpe import VocabularyError, prune_tokenizer_json, read_bpe, select
from secateur.vocabulary.config import VocabularyConfig
from secateur.vocabulary.model import slice_vocabulary, special_ids
from secateur.vocabulary.tokenizer import prune_tokenizer, tokenizer_json


@dataclass
class VocabularyReport:
    style: str  # byte-level or byte-fallback BPE
    tokens_before: int  # embedding rows
    tokens_after: int
    required: int  # bytes, unknown, special tokens and config ids: kept whatever the corpus
    corpus_tokens: int  # tokens counted in the calibration windows
    corpus_distinct: int  # distinct ids among them
    corpus_kept: float  # share of the counted tokens whose id is kept
    not_in_corpus: int  # kept though the corpus never used them: merge-path parts, and --keep-tokens' fill
    merges_before: int
    merges_after: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_tokens(windows: Tensor) -> dict[int, int]:
    """How often each id occurs in the calibration windows."""
    counts = torch.bincount(windows.flatten())
    ids = counts.nonzero().flatten()
    return dict(zip(ids.tolist(), counts[ids].tolist()))


def choose_vocabulary(model: nn.Module, tokenizer: Any, config: VocabularyConfig,
                      calibration: Tensor) -> tuple[list[int], Any, VocabularyReport]:  # fmt: skip
    """The ids to keep (the calibration windows' tokens with the tokens they are built from and the
    required ones), the tokenizer that emits them only, and the report; `model` is read, not changed."""
    if tokenizer is None:
        raise VocabularyError("vocabulary pruning needs the model's tokenizer (secateur.prune(..., tokenizer=...))")
    data = tokenizer_json(tokenizer)
    bpe = read_bpe(data)
    rows = model.get_input_embeddings().num_embeddings
    beyond = max(bpe.vocab.values()) + 1 - rows
    if beyond > 0:
        raise VocabularyError(f"the tokenizer has {beyond} ids beyond the model's {rows} embedding rows")
    generation = getattr(model, "generation_config", None)
    named = special_ids(model.config) | (special_ids(generation) if generation is not None else set())
    bpe = dataclasses.replace(bpe, required=bpe.required | {i for i in named if i < rows})
    counts = count_tokens(calibration)
    kept = select(counts, bpe, keep_tokens=config.keep_tokens, coverage=config.coverage)
    pruned = prune_tokenizer_json(data, kept, bpe)
    new_tokenizer = prune_tokenizer(tokenizer, pruned, kept)
    keep = set(kept)
    total = sum(counts.values())
    report = VocabularyReport(
        style=bpe.style, tokens_before=rows, tokens_after=len(kept), required=len(bpe.required),
        corpus_tokens=total, corpus_distinct=len(counts), corpus_kept=sum(c for i, c in counts.items() if i in keep) / total,
        not_in_corpus=sum(1 for i in keep if i not in counts and i not in bpe.required),
        merges_before=len(bpe.merges), merges_after=len(pruned["model"]["merges"]))  # fmt: skip
    return kept, new_tokenizer, report


def prune_vocabulary(model: nn.Module, tokenizer: Any, config: VocabularyConfig,
                     calibration: Tensor) -> tuple[Any, VocabularyReport]:  # fmt: skip
    """Keep the tokens the calibration windows use (with the tokens they are built from and the
    required ones) in `model` (in place) and in a new tokenizer, which is returned with the report."""
    kept, new_tokenizer, report = choose_vocabulary(model, tokenizer, config, calibration)
    slice_vocabulary(model, kept)
    return new_tokenizer, report
