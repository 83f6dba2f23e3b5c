"""A causal LM's output head apart from the model: run the model up to its last hidden state, then
apply the head (output embeddings, bias, the family's final logit soft-capping) to any rows of it.

What needs the head's logits over a whole batch (a distillation loss, a perplexity) can then compute
them a chunk of positions at a time: batch x sequence x vocabulary floats never exist at once. For
SmolLM2 at 4 x 512 tokens they are 400 MB per float32 copy, and a loss makes several.

`hidden_out(model)` makes the model's forward return the last hidden state (after the final norm)
in `.logits` for the duration, by making the head module an identity and switching soft-capping off
in the config (the forward applies it to whatever the head returned); the module tree, the
parameters and their sharing are untouched. What it yields, a `Head`, applies both back. A model
that wraps another (a teacher seen through a pruned vocabulary) brings its own `hidden_out`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.errors import SecateurError


@dataclass(frozen=True)
class Head:
    """logits = fold(softcap · tanh((hidden Wᵀ + b) / softcap)); soft-capping only where the family has
    it, `fold` only for a wrapped model (it maps the logits to another vocabulary, no gradient)."""

    weight: Tensor  # (vocabulary, hidden)
    bias: Tensor | None
    softcap: float | None = None
    fold: Callable[[Tensor], Tensor] | None = None

    def __call__(self, hidden: Tensor) -> Tensor:
        """(..., hidden) -> (..., vocabulary)."""
        logits = F.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return self.fold(logits) if self.fold is not None else logits

    def chunks(self, hidden: Tensor, positions: int) -> Iterator[tuple[int, Tensor]]:
        """(start, logits) of `positions` rows of `hidden` (n, hidden) at a time."""
        for start in range(0, len(hidden), positions):
            yield start, self(hidden[start : start + positions])


CHUNK_LOGITS = 2**24  # logits computed at once by default: 64 MiB in float32 (341 positions of SmolLM2's 49,152)


def chunk_positions(model: nn.Module, logits: int = CHUNK_LOGITS) -> int:
    """Positions per chunk so that a chunk holds about `logits` logits of the model's vocabulary."""
    return max(1, logits // model.get_output_embeddings().weight.shape[0])


def _identity(hidden: Tensor) -> Tensor:
    return hidden


def splittable(model: nn.Module) -> bool:
    """Whether `hidden_out` can take the model's head apart: a linear layer holding its own weights (not
    one that accelerate's hooks load on the fly), or a wrapper that brings its own."""
    if hasattr(model, "hidden_out"):
        return True
    module = getattr(model, "get_output_embeddings", lambda: None)()
    return isinstance(module, nn.Linear) and not hasattr(module, "_hf_hook")


@contextmanager
def hidden_out(model: nn.Module) -> Iterator[Head]:
    """While inside, `model(...).logits` is the last hidden state; yields the head that turns it into
    the logits the model would have returned."""
    own = getattr(model, "hidden_out", None)
    if own is not None:
        with own() as head:
            yield head
        return
    module = model.get_output_embeddings()
    if not splittable(model):
        raise SecateurError(f"{type(model).__name__}'s output head ({type(module).__name__}) is not a linear layer "
                            f"with its own weights: its logits cannot be computed apart from the model")
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    previous = module.__dict__.get("forward")  # an instance attribute of its own, if any
    module.forward = _identity
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield Head(module.weight, module.bias, softcap)
    finally:
        if previous is None:
            del module.forward  # the class's forward comes back
        else:
            module.forward = previous
        if softcap is not None:
            config.final_logit_softcapping = softcap
