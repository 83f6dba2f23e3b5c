"""Vocabulary pruning: the embedding and LM head rows of the tokens a corpus needs, and a tokenizer
rewritten to emit only those."""

from secateur.vocabulary.bpe import VocabularyError
from secateur.vocabulary.config import VocabularyConfig
from secateur.vocabulary.engine import VocabularyReport, choose_vocabulary, prune_vocabulary

__all__ = ["VocabularyConfig", "VocabularyError", "VocabularyReport", "choose_vocabulary", "prune_vocabulary"]
