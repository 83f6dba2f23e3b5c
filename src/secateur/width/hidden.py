"""The hidden (embedding) dimension: one set of residual-stream channels shared by the whole model.

A channel j is the embedding's column j, column j of every layer reading the residual stream
(q/k/v, gate/up: the readers), row j of every layer writing it (o, down: the writers), entry j of
every norm over the hidden size, and column j of the LM head. Removing it slices all of them.

RMSNorm families only. If channel j carries zeros, RMSNorm over the d' = d - removed channels left
gives the same output once each norm weight is multiplied by sqrt(d/d') and eps by d/d':

    w_j x_j / sqrt(Σx²/d + eps) = w_j sqrt(d/d') x_j / sqrt(Σx²/d' + eps·d/d')

(Gemma's (1 + w) weights scale as a whole). The model's config holds one eps for all its RMSNorms,
so the per-head q/k norms of Qwen3 and Gemma 3 get the scaled eps too (a change of order eps).
LayerNorm subtracts the mean over all channels, so no such rescaling exists and those families
are refused. Gemma scales embeddings by sqrt(hidden size); the embedding is rescaled so its output is
unchanged, and the final norm absorbs what that does to a tied LM head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from secateur.models import Adapter, Width, read_weight
from secateur.width.scores import Importance
from secateur.models.shapes import submodule
from secateur.width.structure import WidthError, slice_layer


def readers(width: Width) -> list[str]:
    names = list(width.mlp.producers)
    if width.attention is not None:
        a = width.attention
        names = list(dict.fromkeys((a.q, a.k, a.v))) + names
    return names


def writers(width: Width) -> list[str]:
    return ([width.attention.o] if width.attention is not None else []) + [width.mlp.consumer]


def block_norms(adapter: Adapter) -> list[str]:
    """Block-relative names of the norms over the hidden size (every branch module but the first)."""
    return [*adapter.branches.attention[1:], *adapter.branches.mlp[1:]]


def check_hidden(model: nn.Module, adapter: Adapter) -> None:
    """Raise unless the model's hidden dimension can be sliced exactly (RMSNorm everywhere)."""
    width, model_type = adapter.width, model.config.model_type
    if width is None or width.hidden is None:
        raise WidthError(f"{model_type} normalises with LayerNorm, which subtracts the mean over all hidden channels, "
                         "so removing channels changes every norm's output; hidden-dimension pruning needs an "
                         "RMSNorm family (Llama, Mistral, Qwen, Gemma 3, Phi-3)")  # fmt: skip
    if width.attention is None:
        raise WidthError(f"{model_type}: hidden-dimension pruning needs the attention projections in the adapter")


def hidden_count(hidden: int, fraction: float, multiple: int) -> int:
    """Channels kept: (1 - fraction) of `hidden`, rounded half up to a multiple of `multiple` (the
    rounding and the saved head count: stock configs want hidden_size divisible by the heads), at
    least one multiple."""
    kept = math.floor(hidden * (1 - fraction) / multiple + 0.5) * multiple
    return min(max(kept, multiple), hidden)


def hidden_scores(model: nn.Module, adapter: Adapter, importance: Importance, stats: dict, grads: dict) -> Tensor:
    """Score of each hidden channel: the sum, over every block, of the importance's column scores of
    the readers and row scores of the writers (what the channel owns in the blocks). No bias takes up
    a removed hidden channel's mean, so readers are scored without compensation (for fluctuation,
    the second moment instead of the variance)."""
    width = adapter.width
    total: Tensor | None = None
    for index, block in enumerate(adapter.block_list(model)):
        prefix = f"{adapter.blocks}.{index}"
        for names, fn in ((readers(width), importance.columns_without_compensation), (writers(width), importance.rows)):
            for name in names:
                layer = submodule(block, name)
                if layer is None:  # a branch removed by depth pruning
                    continue
                full = f"{prefix}.{name}"
                part = fn(read_weight(layer).float(), stats.get(full), grads.get(full)).double().cpu()
                total = part if total is None else total + part
    if total is None:
        raise WidthError("no block holds a layer that reads or writes the hidden dimension")
    return total


def hidden_channel_parameters(model: nn.Module, adapter: Adapter) -> int:
    """Block parameters one hidden channel holds: a column of every reader, a row (and bias entry) of
    every writer, an entry of every norm."""
    width, total = adapter.width, 0
    for block in adapter.block_list(model):
        total += sum(read_weight(layer).shape[0] for name in readers(width) if (layer := submodule(block, name)) is not None)
        total += sum(read_weight(layer).shape[1] + (layer.bias is not None)
                     for name in writers(width) if (layer := submodule(block, name)) is not None)  # fmt: skip
        total += sum(1 for name in block_norms(adapter) if getattr(submodule(block, name), "weight", None) is not None)
    return total


def _scale_norm(norm: nn.Module, keep: Tensor, factor: float, offset: float) -> None:
    weight = norm.weight.data[keep]
    norm.weight = nn.Parameter(((weight.double() + offset) * factor - offset).to(weight.dtype).contiguous(),
                               requires_grad=norm.weight.requires_grad)  # fmt: skip


@torch.no_grad()
def keep_hidden(model: nn.Module, adapter: Adapter, keep: Tensor) -> None:
    """Keep hidden channels `keep` (ascending) across the embedding, every block, the final norm and
    the LM head; rescale norms and eps so that zero channels leave the function unchanged. A stock
    config must stay valid: the caller keeps a count divisible by the saved query-head count."""
    check_hidden(model, adapter)
    width, spec = adapter.width, adapter.width.hidden
    config = model.config
    d, d_new = getattr(config, spec.size_key), len(keep)
    factor = math.sqrt(d / d_new)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    embed_factor = 1.0
    if hasattr(embedding, "embed_scale"):  # Gemma: the stock code will scale by sqrt(new hidden size)
        embed_factor = float(embedding.embed_scale) / math.sqrt(d_new)
        embedding.scalar_embed_scale = math.sqrt(d_new)
        embedding.embed_scale.fill_(math.sqrt(d_new))
    weight = embedding.weight.data[:, keep] * embed_factor
    embedding.weight = nn.Parameter(weight.contiguous(), requires_grad=embedding.weight.requires_grad)
    embedding.embedding_dim = d_new
    if tied:
        head.weight = embedding.weight
        head.in_features = d_new
    elif head is not None:
        slice_layer(head, columns=keep)
    for block in adapter.block_list(model):
        for name in readers(width):
            if (layer := submodule(block, name)) is not None:
                slice_layer(layer, columns=keep)
        for name in writers(width):
            if (layer := submodule(block, name)) is not None:
                slice_layer(layer, rows=keep)
        for name in block_norms(adapter):
            if (norm := submodule(block, name)) is not None and hasattr(norm, "weight"):
                _scale_norm(norm, keep, factor, spec.norm_offset)
    # a tied head now reads embed_factor x the old columns: the final norm takes it back
    _scale_norm(model.get_submodule(spec.final_norm), keep, factor / (embed_factor if tied else 1.0), spec.norm_offset)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, getattr(module, attr) * d / d_new)
    setattr(config, spec.eps_key, getattr(config, spec.eps_key) * d / d_new)
    if width.attention is not None and not getattr(config, "head_dim", None):
        config.head_dim = d // config.num_attention_heads  # stock code would derive it from the new hidden size
    setattr(config, spec.size_key, d_new)
