"""Typed configuration of a vocabulary-pruning stage."""

from __future__ import annotations

from dataclasses import dataclass

from secateur.errors import ConfigError
from secateur.schema import option

METHODS = ("vocabulary",)


@dataclass(frozen=True)
class VocabularyConfig:
    """Keep the tokens a corpus uses (the calibration windows: counts of the original tokenizer's ids),
    remove the other rows of the embedding and LM head, and rewrite the tokenizer to match.

    Always kept: the byte tokens (so any text still tokenizes), the unknown and special tokens, the
    ids the configs name; then the corpus's tokens by count, each with every token its merges are
    built from, so the pruned tokenizer emits kept tokens only. `keep_tokens` keeps that many ids in
    all: the corpus's tokens first, and any room they leave filled with the tokens the tokenizer
    itself learned first (its merge order, the frequency order of its own training text), so text
    the corpus did not cover still finds its common words; `coverage` keeps the most frequent tokens
    that make up that share of the corpus's tokens (1.0: every token it uses), nothing else.
    """

    keep_tokens: int | None = option(None, "vocabulary size to keep, everything included: the corpus's tokens "
                                           "by count, then the tokenizer's own merge order")
    coverage: float | None = option(None, "keep the most frequent tokens that make up this share of the "
                                          "calibration corpus's tokens (1.0: every token it uses)")

    def __post_init__(self) -> None:
        if (self.keep_tokens is None) == (self.coverage is None):
            raise ConfigError("vocabulary pruning needs exactly one of --keep-tokens (ids to keep in all) and "
                              "--coverage (share of the calibration corpus's tokens, e.g. 0.999)")
        if self.keep_tokens is not None and self.keep_tokens < 1:
            raise ConfigError(f"--keep-tokens must be at least 1, got {self.keep_tokens}")
        if self.coverage is not None and not 0 < self.coverage <= 1:
            raise ConfigError(f"--coverage must be in (0, 1], got {self.coverage}")

    @property
    def method_name(self) -> str:
        return "vocabulary"
