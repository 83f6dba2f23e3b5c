"""What a model's blocks are made of, read from their weights: query / key-value heads and MLP
channels per block (None where a branch is absent). Width pruning changes these, depth pruning can
empty a branch, and export and the manifest read them whatever did it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from secateur.models.base import MLP, Adapter, Attention, Width, read_weight


@dataclass(frozen=True)
class LayerWidth:
    """One block's widths (None: the branch is absent, e.g. removed by depth pruning)."""

    attention_heads: int | None
    key_value_heads: int | None
    channels: int | None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def submodule(block: nn.Module, name: str) -> nn.Module | None:
    """The layer, or None where its branch was removed by depth pruning."""
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def attention_heads(block: nn.Module, attention: Attention, size: int) -> tuple[int, int] | None:
    """(query heads, key/value heads) of a block, read from its weights; None if it has no attention."""
    o = submodule(block, attention.o)
    if o is None:
        return None
    q_heads = read_weight(o).shape[1] // size
    rows = read_weight(block.get_submodule(attention.k)).shape[0]
    kv_heads = (rows - q_heads * size) // (2 * size) if attention.fused else rows // size
    return q_heads, kv_heads


def mlp_channels(block: nn.Module, mlp: MLP) -> int | None:
    consumer = submodule(block, mlp.consumer)
    return None if consumer is None else read_weight(consumer).shape[1]


def layer_width(block: nn.Module, width: Width, size: int) -> LayerWidth:
    heads = attention_heads(block, width.attention, size) if width.attention else None
    return LayerWidth(heads[0] if heads else None, heads[1] if heads else None, mlp_channels(block, width.mlp))


def widths_of(model: nn.Module, adapter: Adapter) -> list[LayerWidth]:
    """Every block's widths, read from its weights."""
    size = head_dim(model.config)
    return [layer_width(b, adapter.width, size) for b in adapter.block_list(model)]
