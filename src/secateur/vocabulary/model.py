"""Slicing a model's vocabulary: the embedding and LM head rows of the kept ids (tied or not), and the
config's vocabulary size and special ids renumbered with them."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from secateur.vocabulary.bpe import VocabularyError

ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "mask_token_id",
             "decoder_start_token_id")  # fmt: skip


def special_ids(config: Any) -> set[int]:
    """The ids a config or generation config names (BOS, EOS lists, padding ...)."""
    found: set[int] = set()
    for name in ID_FIELDS:
        value = getattr(config, name, None)
        found |= set(value) if isinstance(value, (list, tuple)) else {value} if isinstance(value, int) else set()
    return found


def renumber_ids(config: Any, new_id: dict[int, int]) -> None:
    """Rewrite the special ids of a config (or generation config) in the kept numbering."""
    for name in ID_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, [new_id[v] for v in value])
        elif isinstance(value, int):
            setattr(config, name, new_id[value])


def slice_vocabulary(model: nn.Module, kept: Sequence[int]) -> None:
    """Keep the embedding and LM head rows of `kept` (old ids, ascending) in place; config ids follow."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = torch.as_tensor(kept, dtype=torch.long)
    if rows.numel() == 0 or int(rows.max()) >= embedding.num_embeddings:
        raise VocabularyError(f"kept ids reach {int(rows.max())}, beyond the embedding's {embedding.num_embeddings} rows")
    new_id = {old: new for new, old in enumerate(kept)}
    generation = getattr(model, "generation_config", None)
    missing = (special_ids(model.config) | (special_ids(generation) if generation is not None else set())) - new_id.keys()
    if missing:
        raise VocabularyError(f"the special ids {sorted(missing)} of the model's config are not kept")
    tied = head is not None and head.weight is embedding.weight
    embedding.weight = nn.Parameter(embedding.weight.data[rows].clone(), requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = len(kept)
    if getattr(embedding, "padding_idx", None) is not None:
        embedding.padding_idx = new_id.get(embedding.padding_idx)
    if head is not None:
        if tied:
            head.weight = embedding.weight
        else:
            head.weight = nn.Parameter(head.weight.data[rows].clone(), requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias.data[rows].clone(), requires_grad=head.bias.requires_grad)
        head.out_features = len(kept)
    model.config.vocab_size = len(kept)
    renumber_ids(model.config, new_id)
    if generation is not None:
        renumber_ids(generation, new_id)
