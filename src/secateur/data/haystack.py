"""Needle-in-a-haystack prompts built offline: a stretch of real text of a given length in tokens, one
planted fact ("The secret number of Oslo is 48213.") at a relative depth, and the question about it
at the end, inside the model's chat template when it has one. Used to choose GemFilter's filter
layer and by the long-context benchmark."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from secateur.errors import ConfigError

KEYS = ("Oslo", "Lima", "Cairo", "Dublin", "Nairobi", "Quito", "Hanoi", "Riga", "Accra", "Bern", "Doha", "Manila")
MARK = "\u0000"  # stands for the user's message when the chat template is split around it


@dataclass(frozen=True)
class Haystack:
    ids: list[int]  # the whole prompt
    answer: str  # the planted number
    span: tuple[int, int]  # [start, end) of the number's tokens in `ids`
    depth: float  # where the fact sits in the text, 0 (start) to 1 (end)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The tokens before and after a user message: the chat template split around it, or nothing and
    a plain "Answer:" cue for a model without a template."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        head, tail = rendered.split(MARK, 1)
    else:
        head, tail = "", "\nAnswer:"
    return _encode(tokenizer, head), _encode(tokenizer, tail)


def haystacks(tokenizer: Any, text_ids: Sequence[int], length: int, depths: Sequence[float], *, seed: int = 0,
              offset: int = 0) -> list[Haystack]:  # fmt: skip
    """One prompt of about `length` tokens per depth, each from its own stretch of `text_ids` (starting
    at `offset`), with its own key and number (seeded)."""
    head, tail = chat_parts(tokenizer)
    rng = random.Random(seed)
    out = []
    for i, depth in enumerate(depths):
        if not 0.0 <= depth <= 1.0:
            raise ConfigError(f"a needle's depth lies in 0..1, got {depth}")
        key, number = KEYS[rng.randrange(len(KEYS))], str(rng.randrange(10_000, 100_000))
        before, value, after = (_encode(tokenizer, part) for part in (f" The secret number of {key} is", f" {number}",
                                                                      ". "))
        question = _encode(tokenizer, f"\n\nWhat is the secret number of {key}? Answer with the number only.")
        needle = before + value + after
        room = length - len(head) - len(tail) - len(question) - len(needle)
        if room < 1:
            raise ConfigError(f"a haystack of {length} tokens has no room for text; ask for a longer one")
        start = offset + i * room
        context = list(text_ids[start:start + room])
        if len(context) < room:
            raise ConfigError(f"the text has {len(text_ids)} tokens, too few for {len(depths)} haystacks of {length} "
                              f"tokens from token {offset}")
        cut = round(depth * room)
        ids = head + context[:cut] + needle + context[cut:] + question + tail
        first = len(head) + cut + len(before)
        out.append(Haystack(ids, number, (first, first + len(value)), depth))
    return out


def answered(text: str, haystack: Haystack) -> bool:
    """Whether a generated answer states the planted number."""
    return haystack.answer in text.replace(",", "").replace(" ", "")
