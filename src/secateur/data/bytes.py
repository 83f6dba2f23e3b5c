"""How many bytes of text each token id stands for, so that a loss can be put per byte: bits per byte
compare models whose tokenizers differ (a pruned vocabulary splits rare words into more tokens, so its
perplexity per token is not comparable with the original's)."""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import Tensor

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPIECE_SPACE = "\u2581"


def is_byte_level(data: dict[str, Any]) -> bool:
    """Whether a parsed tokenizer.json pre-tokenizes or decodes byte-level (every byte one character)."""
    return '"ByteLevel"' in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])


def token_bytes(tokenizer: Any, size: int) -> Tensor:
    """(size,) UTF-8 bytes of text per id: byte-level BPE tokens are one byte per character; byte-
    fallback tokens `<0xNN>` one byte; other tokens their text with SentencePiece's `▁` as a space.
    Special tokens (BOS, chat markers) and ids the tokenizer does not have stand for no text."""
    lengths = torch.zeros(size, dtype=torch.long)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: what each token decodes to on its own
        for i in range(min(size, len(tokenizer))):
            lengths[i] = len(tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]).encode())
    else:
        data = json.loads(backend.to_str())
        byte_level = is_byte_level(data)
        vocab = data["model"].get("vocab") or {}
        pairs = vocab.items() if isinstance(vocab, dict) else ((entry[0], i) for i, entry in enumerate(vocab))  # unigram
        for token, i in pairs:
            if i < size:
                lengths[i] = (len(token) if byte_level else 1 if BYTE_TOKEN.fullmatch(token)
                              else len(token.replace(SPIECE_SPACE, " ").encode()))  # fmt: skip
        for added in data.get("added_tokens", []):
            if added["id"] < size:
                lengths[added["id"]] = 0 if added.get("special") else len(added["content"].encode())
    return lengths
