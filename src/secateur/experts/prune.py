"""Removing experts: every tensor of the router and of the fused experts with one row per expert is
sliced to the kept rows (router weight and bias, DeepSeek's score-correction bias, gate_up_proj,
down_proj and their biases), the modules' expert counts follow, and the config's count with them."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from secateur.models import Adapter
from secateur.width.structure import slice_layer


class ExpertsError(ValueError):
    pass


def _recount(module: nn.Module, experts: int) -> None:
    """The module's own expert count (routers and experts modules keep one), where it has one."""
    if isinstance(getattr(module, "num_experts", None), int):
        module.num_experts = experts


def _slice_rows(module: nn.Module, experts: int, kept: Tensor) -> None:
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if tensor is not None and tensor.ndim >= 1 and tensor.shape[0] == experts:
            tensor.data = tensor.data[kept.to(tensor.device)].contiguous()
    _recount(module, len(kept))


def keep_experts(block: nn.Module, adapter: Adapter, kept: Sequence[int]) -> None:
    """Keep only experts `kept` (in this order) of `block`'s router and experts, in place."""
    spec = adapter.experts
    router, experts = block.get_submodule(spec.router), block.get_submodule(spec.experts)
    count = router.weight.shape[0]
    index = torch.tensor(sorted(kept), dtype=torch.long)
    if len(index) == 0 or len(set(kept)) != len(kept) or not all(0 <= j < count for j in kept):
        raise ExpertsError(f"kept experts {list(kept)} are not distinct indices below {count}")
    top_k = getattr(router, "top_k", None)
    if isinstance(top_k, int) and top_k > len(index):
        raise ExpertsError(f"a block routing every token to {top_k} experts cannot keep only {len(index)}")
    _slice_rows(router, count, index)
    _slice_rows(experts, count, index)


def router_over(router: nn.Module, kept: Sequence[int]) -> nn.Module:
    """A copy of `router` that routes among `kept` only, as it will after the removal (the family's
    own routing: softmax or sigmoid, top-k, renormalisation)."""
    sliced = copy.deepcopy(router)
    _slice_rows(sliced, router.weight.shape[0], torch.tensor(sorted(kept), dtype=torch.long))
    return sliced


def routed_output(outputs: Tensor, indices: Tensor, weights: Tensor, kept: Sequence[int]) -> Tensor:
    """The experts module's output from every expert's output on every token. outputs: (experts,
    tokens, hidden); indices, weights: (tokens, top_k), indices numbered among `kept`."""
    original = torch.tensor(sorted(kept), device=indices.device)[indices]  # (tokens, top_k) numbered as before
    token = torch.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
    return (outputs[original, token] * weights[..., None].to(outputs.dtype)).sum(dim=1)  # (tokens, hidden)


def set_count(model: nn.Module, adapter: Adapter, count: int) -> None:
    """The config's expert count, once every MoE block holds `count` experts (a stock config holds one)."""
    setattr(model.config, adapter.experts.count_key, count)


def slim_experts(block: nn.Module, adapter: Adapter, kept: Tensor) -> None:
    """Keep channels `kept` (experts, channels), the same number in every expert, of `block`'s
    experts: their gate and up rows and their down-projection columns."""
    experts = block.get_submodule(adapter.experts.experts)
    width = experts.down_proj.shape[2]
    gate_up, down = experts.gate_up_proj.data, experts.down_proj.data  # (E, 2w, h), (E, h, w)
    rows = torch.cat([kept, kept + width], dim=1).to(gate_up.device)  # (E, 2k): gate rows, then up rows
    experts.gate_up_proj.data = torch.stack([gate_up[j, rows[j]] for j in range(len(kept))])
    experts.down_proj.data = torch.stack([down[j][:, kept[j].to(down.device)] for j in range(len(kept))])
    if isinstance(getattr(experts, "intermediate_dim", None), int):
        experts.intermediate_dim = kept.shape[1]


def slim_shared(mlp: nn.Module, kept: Tensor) -> None:
    """Keep channels `kept` (ascending) of a shared expert (a gated MLP: gate_proj, up_proj rows,
    down_proj columns), its width attribute with them."""
    for name in ("gate_proj", "up_proj"):
        slice_layer(mlp.get_submodule(name), rows=kept.to(mlp.get_submodule(name).weight.device))
    slice_layer(mlp.down_proj, columns=kept.to(mlp.down_proj.weight.device))
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(kept)


def merge_experts(block: nn.Module, adapter: Adapter, clusters: Sequence[Sequence[int]], weights: Tensor) -> None:
    """Merge every cluster of `block`'s experts into one: the experts' tensors averaged with
    `weights` (experts,) within the cluster, the router's rows taken from the cluster's heaviest
    member. Clusters are kept in the order given."""
    spec = adapter.experts
    router, experts = block.get_submodule(spec.router), block.get_submodule(spec.experts)
    count = router.weight.shape[0]
    members = sorted(j for cluster in clusters for j in cluster)
    if members != list(range(count)):
        raise ExpertsError(f"clusters {list(map(list, clusters))} do not partition the {count} experts")
    lead = torch.tensor([max(cluster, key=lambda j: (float(weights[j]), -j)) for cluster in clusters])
    share = torch.zeros(len(clusters), count, dtype=torch.float64)  # (clusters, experts): averaging weights
    for c, cluster in enumerate(clusters):
        w = weights[list(cluster)].double()
        share[c, list(cluster)] = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(cluster))
    for name, tensor in list(experts.named_parameters(recurse=False)):
        if tensor.shape[0] == count:
            flat = tensor.data.double().reshape(count, -1)
            tensor.data = (share.to(flat.device) @ flat).reshape(len(clusters), *tensor.shape[1:]).to(tensor.dtype)
    _recount(experts, len(clusters))
    _slice_rows(router, count, lead)
