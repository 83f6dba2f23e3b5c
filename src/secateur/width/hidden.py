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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secateur.models import Adapter, Width, read_weight
from secateur.width.scores import Importance
from secateur.models.shapes import submodule
from secateur.width.structure import WidthError


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


def block_hidden_scores(block: nn.Module, prefix: str, width: Width, importance: Importance, stats: dict,
                        grads: dict) -> Tensor | None:  # fmt: skip
    """One block's share of the hidden channels' scores (`prefix`: its qualified name): the importance's
    column scores of its readers and row scores of its writers, summed in float64 (None: the block holds
    neither). No bias takes up a removed hidden channel's mean, so readers are scored without
    compensation (for fluctuation, the second moment instead of the variance)."""
    total: Tensor | None = None
    for names, fn in ((readers(width), importance.columns_without_compensation), (writers(width), importance.rows)):
        for name in names:
            layer = submodule(block, name)
            if layer is None:  # a branch removed by depth pruning
                continue
            full = f"{prefix}.{name}"
            part = fn(read_weight(layer).float(), stats.get(full), grads.get(full)).double().cpu()
            total = part if total is None else total + part
    return total


def add_scores(total: Tensor | None, part: Tensor | None) -> Tensor | None:
    return part if total is None else total if part is None else total + part


def hidden_scores(model: nn.Module, adapter: Adapter, importance: Importance, stats: dict, grads: dict) -> Tensor:
    """Score of each hidden channel: the sum over every block of `block_hidden_scores` (what the
    channel owns in the blocks)."""
    total: Tensor | None = None
    for index, block in enumerate(adapter.block_list(model)):
        total = add_scores(total, block_hidden_scores(block, f"{adapter.blocks}.{index}", adapter.width, importance,
                                                      stats, grads))  # fmt: skip
    return checked_scores(total)


def checked_scores(total: Tensor | None) -> Tensor:
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


def scaled_norm(weight: Tensor, keep: Tensor, factor: float, offset: float) -> Tensor:
    """A norm's kept entries, its effective weight (offset + w) multiplied by `factor`."""
    weight = weight[keep]
    return ((weight.double() + offset) * factor - offset).to(weight.dtype).contiguous()


@dataclass(frozen=True)
class HiddenCut:
    """Keeping hidden channels `keep`, tensor by tensor (qualified parameter names of the model before
    the cut): the embedding's columns (times `embed_factor`), the readers' and an untied head's
    columns, the writers' rows (weights and biases), each norm's entries scaled. The one definition
    of the cut, for a model in memory (`keep_hidden`) and for tensors read from the input's files
    (a stage streamed from disk)."""

    keep: Tensor
    embedding: str
    embed_factor: float
    columns: frozenset[str]
    rows: frozenset[str]
    norms: dict[str, float]  # a norm's weight -> the factor its effective weight is multiplied by
    offset: float  # the norms' weight offset (Gemma: 1 + w)

    def __call__(self, name: str, tensor: Tensor) -> Tensor:
        """`tensor` (the parameter `name`) as the cut model holds it; the same object where the hidden
        size does not enter."""
        if name == self.embedding:
            return (tensor[:, self.keep] * self.embed_factor).contiguous()
        if name in self.columns:
            return tensor[:, self.keep].contiguous()
        if name in self.rows:
            return tensor[self.keep].contiguous()
        if name in self.norms:
            return scaled_norm(tensor, self.keep, self.norms[name], self.offset)
        return tensor

    def outside(self, blocks: str) -> list[str]:
        """The names it changes outside the blocks (the embedding, the final norm, an untied head)."""
        return [n for n in (self.embedding, *self.columns, *self.norms) if not n.startswith(f"{blocks}.")]


def _tied(model: nn.Module) -> bool:
    """Whether the head reads the embedding's matrix (a streamed model's may sit apart on the meta device)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is not None and (head.weight is embedding.weight or bool(getattr(model.config, "tie_word_embeddings",
                                                                                   False)))  # fmt: skip


def hidden_cut(model: nn.Module, adapter: Adapter, keep: Tensor) -> HiddenCut:
    """The cut keeping hidden channels `keep` (ascending) of `model` as it is now (before the cut)."""
    width, spec = adapter.width, adapter.width.hidden
    d, d_new = getattr(model.config, spec.size_key), len(keep)
    factor = math.sqrt(d / d_new)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = _tied(model)
    # Gemma: the stock code scales by sqrt(new hidden size); the embedding's values make up the difference
    embed_factor = float(embedding.embed_scale) / math.sqrt(d_new) if hasattr(embedding, "embed_scale") else 1.0
    named = {id(module): name for name, module in model.named_modules()}
    columns, rows, norms = set(), set(), {}
    if head is not None and not tied:
        columns.add(f"{named[id(head)]}.weight")
    for index, block in enumerate(adapter.block_list(model)):
        prefix = f"{adapter.blocks}.{index}"
        columns |= {f"{prefix}.{name}.weight" for name in readers(width) if submodule(block, name) is not None}
        for name in writers(width):
            if submodule(block, name) is not None:
                rows |= {f"{prefix}.{name}.weight", f"{prefix}.{name}.bias"}
        norms |= {f"{prefix}.{name}.weight": factor for name in block_norms(adapter)
                  if getattr(submodule(block, name), "weight", None) is not None}  # fmt: skip
    # a tied head reads embed_factor x the old columns: the final norm takes it back
    norms[f"{spec.final_norm}.weight"] = factor / (embed_factor if tied else 1.0)
    return HiddenCut(keep, f"{named[id(embedding)]}.weight", embed_factor, frozenset(columns), frozenset(rows), norms,
                     spec.norm_offset)  # fmt: skip


@torch.no_grad()
def keep_hidden(model: nn.Module, adapter: Adapter, keep: Tensor) -> HiddenCut:
    """Keep hidden channels `keep` (ascending) across the embedding, every block, the final norm and
    the LM head (`HiddenCut`); rescale norms and eps so that zero channels leave the function
    unchanged. A stock config must stay valid: the caller keeps a count divisible by the saved
    query-head count. Works on shapes alone where weights sit on the meta device. Returns the cut."""
    check_hidden(model, adapter)
    spec, config = adapter.width.hidden, model.config
    d, d_new = getattr(config, spec.size_key), len(keep)
    cut = hidden_cut(model, adapter, keep)
    tied = _tied(model)
    for name, param in list(model.named_parameters()):  # a tied head: once, as the embedding
        new = cut(name, param.data)
        if new is not param.data:
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(new, requires_grad=param.requires_grad)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if tied:
        head.weight = embedding.weight
    embedding.embedding_dim = d_new
    if hasattr(embedding, "embed_scale"):  # Gemma
        embedding.scalar_embed_scale = math.sqrt(d_new)
        embedding.embed_scale.fill_(math.sqrt(d_new))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        if type(module).__name__.endswith("RMSNorm"):
            for attr in ("variance_epsilon", "eps"):
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, getattr(module, attr) * d / d_new)
    setattr(config, spec.eps_key, getattr(config, spec.eps_key) * d / d_new)
    if adapter.width.attention is not None and not getattr(config, "head_dim", None):
        config.head_dim = d // config.num_attention_heads  # stock code would derive it from the new hidden size
    setattr(config, spec.size_key, d_new)
    return cut
