"""A second offline task: the Google analogy test set (Mikolov et al. 2013, `questions-words.txt`, as
the gensim 4.4.0 wheel ships it), as four-choice questions: "Athens is to Greece as Baghdad is to"
Iraq, against three answers of other questions of the same section (countries with countries,
plurals with plurals).

Items are drawn deterministically and in turn from the 14 sections (capitals, currencies, states,
family words, and nine grammatical relations), so that world knowledge and morphology weigh alike;
the distractors are never a word of the question. Scored by log-likelihood of each choice after the
prompt, as lm-eval's multiple-choice tasks are; chance is 25%.
"""

from __future__ import annotations

import random
from pathlib import Path

from secateur.data.archives import GENSIM, TEST_DATA
from secateur.tasks.local import write_multiple_choice

TASK = "secateur_analogy"
CHOICES = 4
MEMBER = TEST_DATA + "questions-words.txt"


def parse_questions(lines: list[str]) -> dict[str, list[tuple[str, str, str, str]]]:
    """section name -> its questions (a, b, c, d): a is to b as c is to d."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in lines:
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
        elif line.strip() and current is not None:
            words = line.split()
            if len(words) == 4:
                current.append(tuple(words))
    return sections


def build_items(sections: dict[str, list[tuple[str, str, str, str]]], n: int = 500, seed: int = 0) -> list[dict]:
    """`n` items {id, section, question, choices, answer}, taken in turn from the sections."""
    rng = random.Random(seed)
    queues = {}
    for name in sorted(sections):
        order = list(sections[name])
        rng.shuffle(order)
        queues[name] = order
    answers = {name: sorted({q[3] for q in questions}) for name, questions in sections.items()}
    items: list[dict] = []
    while len(items) < n and any(queues.values()):
        for name in sorted(queues):
            if not queues[name] or len(items) == n:
                continue
            a, b, c, d = queues[name].pop()
            used = {w.lower() for w in (a, b, c, d)}
            pool = [w for w in answers[name] if w.lower() not in used]
            if len(pool) < CHOICES - 1:
                continue
            choices = [d, *rng.sample(pool, CHOICES - 1)]
            rng.shuffle(choices)
            items.append({"id": f"{name}:{a}:{b}:{c}", "section": name, "question": f"{a} is to {b} as {c} is to",
                          "choices": choices, "answer": choices.index(d)})  # fmt: skip
    return items


def write_task(directory: Path, n: int = 500, seed: int = 0, text: str | None = None) -> Path:
    """Generate the task's items and its lm-eval task YAML into `directory` (its --include-path)."""
    text = text if text is not None else GENSIM.read(MEMBER).decode("utf-8")
    items = build_items(parse_questions(text.splitlines()), n, seed)
    return write_multiple_choice(directory, TASK, items, "the Google analogy test set (Mikolov et al. 2013), gensim 4.4.0")
