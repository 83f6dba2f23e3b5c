"""A knowledge probe built offline from WordNet 3.0 (Princeton; Debian's `wordnet-base`): given a
noun's dictionary definition, pick the word it defines among four.

Items are generated deterministically: nouns whose first sense is common in the SemCor-tagged
counts (`cntlist.rev`), single alphabetic words, the definition without its usage examples and
never containing the word; three distractors are common nouns of the same lexicographer file
(animals with animals, artifacts with artifacts), none a synonym of the answer. Scored by
log-likelihood of each choice after the prompt, as lm-eval's multiple-choice tasks are; chance is
25%.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from secateur.errors import SecateurError
from secateur.tasks.local import write_multiple_choice

WORDNET = Path("/usr/share/wordnet")  # Debian's wordnet-base
TASK = "secateur_wordnet"
CHOICES = 4
WORD = re.compile(r"[a-z]{3,}")


class ProbeError(SecateurError):
    """The probe's source data is missing or unusable."""


@dataclass(frozen=True)
class Synset:
    offset: str
    lexfile: int
    words: tuple[str, ...]  # lemmas as written in WordNet (underscores for spaces)
    lex_ids: tuple[int, ...]
    gloss: str  # the definition, usage examples removed


def parse_data_line(line: str) -> Synset | None:
    """One synset of a `data.*` file (None for the license header)."""
    if line.startswith("  "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    count = int(fields[3], 16)
    words = tuple(fields[4 : 4 + 2 * count : 2])
    lex_ids = tuple(int(x, 16) for x in fields[5 : 5 + 2 * count : 2])
    definition = gloss.split(";")[0].strip().strip('"').strip()
    return Synset(fields[0], int(fields[1]), words, lex_ids, definition)


def parse_counts(lines: Iterator[str]) -> dict[str, tuple[int, int]]:
    """sense key -> (sense number, tag count) from `cntlist.rev`."""
    counts = {}
    for line in lines:
        key, sense, tags = line.split()
        counts[key] = (int(sense), int(tags))
    return counts


def sense_key(word: str, lexfile: int, lex_id: int) -> str:
    return f"{word.lower()}%1:{lexfile:02d}:{lex_id:02d}::"


def common_nouns(synsets: list[Synset], counts: dict[str, tuple[int, int]], min_tags: int) -> list[tuple[str, Synset]]:
    """(word, synset) where the synset is the word's first sense and was tagged at least `min_tags`
    times: the familiar meaning of a familiar word."""
    found = []
    for synset in synsets:
        for word, lex_id in zip(synset.words, synset.lex_ids):
            sense, tags = counts.get(sense_key(word, synset.lexfile, lex_id), (0, 0))
            if sense == 1 and tags >= min_tags and WORD.fullmatch(word) and word not in synset.gloss.lower():
                found.append((word, synset))
                break
    return found


def build_items(synsets: list[Synset], counts: dict[str, tuple[int, int]], n: int = 500, min_tags: int = 5,
                seed: int = 0) -> list[dict]:
    """`n` items {id, question, choices, answer}, the same for the same inputs and seed."""
    nouns = common_nouns(synsets, counts, min_tags)
    by_file: dict[int, list[str]] = defaultdict(list)
    for word, synset in nouns:
        by_file[synset.lexfile].append(word)
    rng = random.Random(seed)
    order = sorted(nouns, key=lambda pair: pair[1].offset)
    rng.shuffle(order)
    items = []
    for word, synset in order:
        pool = sorted({w for w in by_file[synset.lexfile] if w not in synset.words and w != word})
        if len(pool) < CHOICES - 1 or len(synset.gloss) < 10:
            continue
        choices = [word, *rng.sample(pool, CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"id": synset.offset, "question": f'The word for "{synset.gloss}" is', "choices": choices,
                      "answer": choices.index(word)})  # fmt: skip
        if len(items) == n:
            break
    return items


def read_wordnet(root: Path = WORDNET) -> tuple[list[Synset], dict[str, tuple[int, int]]]:
    data, counts = root / "data.noun", root / "cntlist.rev"
    if not data.is_file() or not counts.is_file():
        raise ProbeError(f"WordNet not found in {root}; install Debian's wordnet-base (apt-get install wordnet-base)")
    with data.open(encoding="utf-8", errors="replace") as f:
        synsets = [s for s in map(parse_data_line, f) if s is not None]
    with counts.open(encoding="utf-8") as f:
        return synsets, parse_counts(f)


def write_task(directory: Path, n: int = 500, min_tags: int = 5, seed: int = 0, root: Path = WORDNET) -> Path:
    """Generate the probe's items and its lm-eval task YAML into `directory` (its --include-path)."""
    synsets, counts = read_wordnet(root)
    items = build_items(synsets, counts, n, min_tags, seed)
    source = f"WordNet 3.0 noun glosses (Debian wordnet-base), first senses with at least {min_tags} SemCor tags"
    return write_multiple_choice(directory, TASK, items, source)
