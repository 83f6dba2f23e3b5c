"""Physical slicing of heads and MLP channels: weights, module attributes and config change together.

Query head h reads key/value head h // r (r = query heads per key/value head, as `repeat_kv`
expands them), so kept query heads stay in ascending order and every key/value group keeps the same
number of query heads: the ratio stays an integer and stock attention code runs unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from secateur.config import ConfigError
from secateur.models import MLP, Adapter, Attention, Width, read_weight
from secateur.models.shapes import LayerWidth, attention_heads, head_dim, mlp_channels, submodule


class WidthError(ConfigError):
    """The model cannot be width-pruned as asked."""


def head_rows(heads: Tensor, size: int) -> Tensor:
    """Row (or column) indices of whole heads: (heads,) -> (heads * size,)."""
    return (heads[:, None] * size + torch.arange(size, device=heads.device)).flatten()


# --- slicing one layer -------------------------------------------------------------------------


Take = Callable[[Tensor], Tensor]  # a slice, as a function of any tensor shaped like the sliced parameter
Sliced = Callable[[nn.Parameter, nn.Parameter, Take], None]
"""Told of every parameter a slice replaces: (old, new, take), where `take` maps any tensor shaped like
the old parameter (an optimizer's moments, a mask) to the new one's shape."""


def slice_layer(module: nn.Module, rows: Tensor | None = None, columns: Tensor | None = None,
                on_slice: Sliced | None = None) -> None:  # fmt: skip
    """Keep the given output rows and input columns of a linear (or GPT-2 Conv1D) layer and its bias."""
    conv = isinstance(module, Conv1D)

    def take(stored: Tensor) -> Tensor:  # stored layout: (out, in), or (in, out) for Conv1D
        weight = stored.T if conv else stored
        if rows is not None:
            weight = weight[rows]
        if columns is not None:
            weight = weight[:, columns]
        return (weight.T if conv else weight).contiguous()

    old = module.weight
    module.weight = nn.Parameter(take(old.data), requires_grad=old.requires_grad)
    if on_slice is not None:
        on_slice(old, module.weight, take)
    if rows is not None and module.bias is not None:
        old_bias = module.bias

        def take_bias(bias: Tensor) -> Tensor:
            return bias[rows].contiguous()

        module.bias = nn.Parameter(take_bias(old_bias.data), requires_grad=old_bias.requires_grad)
        if on_slice is not None:
            on_slice(old_bias, module.bias, take_bias)
    out_features, in_features = read_weight(module).shape
    if conv:
        module.nf = out_features
    else:
        module.out_features, module.in_features = out_features, in_features


def ensure_bias(module: nn.Module) -> None:
    """Give a bias-free layer a zero bias (the function is unchanged)."""
    if module.bias is None:
        out = read_weight(module).shape[0]
        module.bias = nn.Parameter(module.weight.new_zeros(out), requires_grad=module.weight.requires_grad)


@torch.no_grad()
def compensate(consumer: nn.Module, removed: Tensor, mean: Tensor) -> None:
    """Fold the removed input channels' mean contribution into the consumer's bias (FLAP):
    b += W[:, removed] @ E[x_removed], so the layer's output keeps its mean."""
    weight = read_weight(consumer)  # (out, in)
    consumer.bias.data += (weight[:, removed].float() @ mean[removed].float()).to(consumer.bias.dtype)


# --- slicing a block -----------------------------------------------------------------------------


def keep_heads(block: nn.Module, attention: Attention, size: int, q_keep: Tensor, kv_keep: Tensor,
               on_slice: Sliced | None = None) -> None:
    """Keep query heads `q_keep` and key/value heads `kv_keep` (ascending) of one block's attention."""
    q_heads, kv_heads = attention_heads(block, attention, size)
    if len(q_keep) % len(kv_keep):
        raise WidthError(f"{len(q_keep)} query heads cannot share {len(kv_keep)} key/value heads evenly")
    q_rows, kv_rows = head_rows(q_keep, size), head_rows(kv_keep, size)
    if attention.fused:  # rows: all query heads, all key heads, all value heads
        rows = torch.cat([q_rows, q_heads * size + kv_rows, (q_heads + kv_heads) * size + kv_rows])
        slice_layer(block.get_submodule(attention.q), rows=rows, on_slice=on_slice)
    else:
        slice_layer(block.get_submodule(attention.q), rows=q_rows, on_slice=on_slice)
        slice_layer(block.get_submodule(attention.k), rows=kv_rows, on_slice=on_slice)
        slice_layer(block.get_submodule(attention.v), rows=kv_rows, on_slice=on_slice)
    slice_layer(block.get_submodule(attention.o), columns=q_rows, on_slice=on_slice)
    module = block.get_submodule(attention.module)
    for name, value in (("num_key_value_groups", len(q_keep) // len(kv_keep)), ("num_key_value_heads", len(kv_keep)),
                        ("num_heads", len(q_keep))):  # fmt: skip
        if hasattr(module, name):
            setattr(module, name, value)


def keep_channels(block: nn.Module, mlp: MLP, keep: Tensor, on_slice: Sliced | None = None) -> None:
    """Keep MLP channels `keep` (ascending): producers' rows (each stacked copy) and consumer columns."""
    channels = mlp_channels(block, mlp)
    rows = torch.cat([keep + part * channels for part in range(mlp.stacked)])
    for name in mlp.producers:
        slice_layer(block.get_submodule(name), rows=rows, on_slice=on_slice)
    slice_layer(block.get_submodule(mlp.consumer), columns=keep, on_slice=on_slice)
    module = block.get_submodule(mlp.consumer.rpartition(".")[0])  # "" (no dot) is the block itself
    if hasattr(module, "intermediate_size"):
        module.intermediate_size = len(keep)


# --- biases the config must announce ------------------------------------------------------------


def branch_layers(width: Width, kind: str) -> tuple[str, ...]:
    if kind == "mlp":
        return (*width.mlp.producers, width.mlp.consumer)
    a = width.attention
    return tuple(dict.fromkeys((a.q, a.k, a.v, a.o)))


def bias_flag_needed(model: nn.Module, adapter: Adapter, kind: str) -> str | None:
    """The config flag to set so the branch's output projection has a bias (None: it has one); raises
    when the family cannot hold one."""
    width = adapter.width
    consumer = width.mlp.consumer if kind == "mlp" else width.attention.o
    if all(getattr(submodule(b, consumer), "bias", 0) is not None for b in adapter.block_list(model)):
        return None  # the family already has the bias (absent branches count as fine)
    flag = width.bias_flag(kind)
    if flag is None:
        raise WidthError(f"bias compensation needs a bias on the {kind} output projection, which "
                         f"{model.config.model_type} configs cannot enable; pass --no-bias-compensation")
    return flag


def enable_biases(model: nn.Module, adapter: Adapter, kind: str) -> None:
    """Give every projection of the branch a bias in every block and set the config flag that makes
    stock code create them, so a compensation bias saves and reloads with `from_pretrained`."""
    flag = bias_flag_needed(model, adapter, kind)
    if flag is None:
        return
    setattr(model.config, flag, True)
    for block in adapter.block_list(model):
        for name in branch_layers(adapter.width, kind):
            layer = submodule(block, name)
            if layer is not None:
                ensure_bias(layer)


# --- config ----------------------------------------------------------------------------------------


def write_uniform_config(model: nn.Module, width: Width, widths: list[LayerWidth], size: int) -> None:
    """Every block has the same widths: the stock config describes the model exactly."""
    config = model.config
    heads = {(w.attention_heads, w.key_value_heads) for w in widths if w.attention_heads is not None}
    channels = {w.channels for w in widths if w.channels is not None}
    if len(heads) > 1 or len(channels) > 1:
        raise WidthError("blocks differ in width; a stock config cannot describe them (use secateur.load)")
    if heads and width.attention is not None:
        (q_heads, kv_heads), = heads
        config.head_dim = size  # stock code would otherwise derive it from hidden_size / heads
        config.num_attention_heads, config.num_key_value_heads = q_heads, kv_heads
    if channels:
        setattr(config, width.mlp.size_key, channels.pop())


def apply_widths(model: nn.Module, adapter: Adapter, widths: list[LayerWidth]) -> None:
    """Shape a freshly built model's blocks to recorded widths (their first heads / channels); the
    weights are then loaded over them."""
    width, size = adapter.width, head_dim(model.config)
    for block, target in zip(adapter.block_list(model), widths):
        if target.attention_heads is not None and width.attention is not None:
            keep_heads(block, width.attention, size, torch.arange(target.attention_heads),
                       torch.arange(target.key_value_heads))  # fmt: skip
        if target.channels is not None:
            keep_channels(block, width.mlp, torch.arange(target.channels))
