"""Distillation across a pruned vocabulary: the teacher (the model before vocabulary pruning) seen
through the student's ids. A student id stands for the same token string as one teacher id, so the
teacher reads the student's windows in its own ids and its logits are taken at the student's tokens
(the softmax then runs over the kept tokens only, the distribution the student can express)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from secateur.vocabulary.bpe import VocabularyError


def teacher_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> Tensor:
    """(student vocabulary,) the teacher's id of every student token, matched by token string."""
    theirs = teacher_tokenizer.get_vocab()
    ours = sorted(student_tokenizer.get_vocab().items(), key=lambda item: item[1])
    missing = [t for t, _ in ours if t not in theirs]
    if missing:
        raise VocabularyError(f"the teacher's tokenizer lacks {len(missing)} of the student's tokens (first "
                              f"{missing[0]!r}): distillation needs a teacher whose vocabulary holds the student's")
    if [i for _, i in ours] != list(range(len(ours))):
        raise VocabularyError("the student's token ids are not contiguous")
    return torch.tensor([theirs[t] for t, _ in ours], dtype=torch.long)


class KeptVocabulary(nn.Module):
    """`teacher` reading and predicting the student's vocabulary: `ids[i]` is the teacher's id of
    student id i. Hidden states are the teacher's own."""

    def __init__(self, teacher: nn.Module, ids: Tensor) -> None:
        super().__init__()
        if isinstance(teacher, KeptVocabulary):  # a second pruning: compose
            teacher, ids = teacher.teacher, teacher.ids[ids]
        self.teacher = teacher
        self.register_buffer("ids", ids.to(torch.long), persistent=False)

    @property
    def config(self) -> Any:
        return self.teacher.config

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Any:
        out = self.teacher(input_ids=self.ids[input_ids], **kwargs)
        out.logits = out.logits[..., self.ids]  # (batch, seq, student vocabulary)
        return out
