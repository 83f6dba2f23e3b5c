"""Distillation across a pruned vocabulary: the teacher (the model before vocabulary pruning) seen
through the student's vocabulary.

A student id stands for the same token string as one teacher id, so the teacher reads the student's
windows in its own ids. What it predicts is folded onto the student's tokens: a kept token keeps its
probability, and a removed token's probability goes to the first token the pruned tokenizer splits
its text into (the next token the student has to produce for that text). The target is then the
teacher's own distribution of the student's next token, not the teacher renormalised over the kept
tokens, which would teach the student that removed words never come."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.models.head import Head, hidden_out
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


def first_pieces(student_tokenizer: Any, teacher_tokenizer: Any, rows: int) -> Tensor:
    """(rows,) for every teacher id, the student id its probability goes to: itself where kept, else the
    first token of its text in the student's tokenizer (BPE run on the token's symbols); -1 for ids
    no token holds and for special tokens the student lacks."""
    ours = student_tokenizer.get_vocab()
    model = student_tokenizer.backend_tokenizer.model
    specials = {t.content for t in getattr(teacher_tokenizer, "added_tokens_decoder", {}).values() if t.special}
    fold = torch.full((rows,), -1, dtype=torch.long)
    for token, i in teacher_tokenizer.get_vocab().items():
        if i >= rows:
            continue
        if token in ours:
            fold[i] = ours[token]
        elif token not in specials:
            pieces = model.tokenize(token)
            fold[i] = pieces[0].id if pieces else -1
    return fold


class KeptVocabulary(nn.Module):
    """`teacher` reading and predicting the student's vocabulary. Its `logits` are the log of the folded
    distribution (a softmax of them gives it back); hidden states are the teacher's own."""

    def __init__(self, teacher: nn.Module, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        super().__init__()
        if isinstance(teacher, KeptVocabulary):  # a second pruning: from the first teacher's own vocabulary
            teacher, teacher_tokenizer = teacher.teacher, teacher.teacher_tokenizer
        self.teacher, self.teacher_tokenizer = teacher, teacher_tokenizer
        rows = teacher.get_output_embeddings().out_features
        fold = first_pieces(student_tokenizer, teacher_tokenizer, rows)
        self.register_buffer("ids", teacher_ids(student_tokenizer, teacher_tokenizer), persistent=False)
        self.register_buffer("sources", (fold >= 0).nonzero().flatten(), persistent=False)
        self.register_buffer("targets", fold[fold >= 0], persistent=False)
        self.size = len(self.ids)
        self.hidden = False  # inside `hidden_out`: the teacher's last hidden states pass through

    @property
    def config(self) -> Any:
        return self.teacher.config

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Any:
        out = self.teacher(input_ids=self.ids[input_ids], **kwargs)
        if not self.hidden:
            out.logits = self.fold(out.logits)
        return out

    def fold(self, logits: Tensor) -> Tensor:
        """(..., teacher vocabulary) logits -> (..., student vocabulary) log-probabilities, folded."""
        probabilities = F.softmax(logits.float(), dim=-1)[..., self.sources]  # (..., folded ids)
        folded = probabilities.new_zeros(*probabilities.shape[:-1], self.size)
        folded.index_add_(folded.dim() - 1, self.targets, probabilities)  # (..., student vocabulary)
        return folded.clamp_min(torch.finfo(folded.dtype).tiny).log()

    @contextmanager
    def hidden_out(self) -> Iterator[Head]:
        """The teacher's last hidden states out of the forward; the head folds its logits."""
        with hidden_out(self.teacher) as head:
            self.hidden = True
            try:
                yield Head(head.weight, head.bias, head.softcap, fold=self.fold)
            finally:
                self.hidden = False
