"""Model adapters: where a family keeps its decoder blocks and which block layers share an input.

An adapter is data, not code: adding an architecture is one small file with one `Adapter(...)` and a
tiny-config test. The engine, the methods and the I/O never look at the family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from secateur.errors import SecateurError


class UnsupportedModelError(SecateurError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Branches:
    """The two residual branches of a decoder block, as block-relative module names.

    Each branch lists every module that exists only to compute it (its norms included), so removing
    the branch replaces all of them; `attention[0]` is the attention module itself (it returns a
    tuple and owns the KV cache entry of the block).
    """

    attention: tuple[str, ...]
    mlp: tuple[str, ...]

    def of(self, kind: str) -> tuple[str, ...]:
        return {"attention": self.attention, "mlp": self.mlp}[kind]


@dataclass(frozen=True)
class Attention:
    """Where a block's attention keeps its projections (block-relative names), for head pruning.

    `q`, `k`, `v` name one fused layer when they are equal (Phi-3's qkv_proj: rows are all query
    heads, then all key heads, then all value heads). Head pruning needs the head size in the config
    (`head_dim`), since the stock code would otherwise derive it from hidden_size / heads.
    """

    module: str
    q: str
    k: str
    v: str
    o: str

    @property
    def fused(self) -> bool:
        return self.q == self.k == self.v


@dataclass(frozen=True)
class MLP:
    """A block's MLP for channel pruning: producers' output rows and the consumer's input columns are
    the channels; a fused producer stacks `stacked` projections of the channels (Phi-3's gate_up_proj)."""

    producers: tuple[str, ...]
    consumer: str
    size_key: str = "intermediate_size"  # the config field holding the channel count
    stacked: int = 1
    post_norm: str | None = None  # a norm between the consumer's output and the residual add (Gemma 3)


@dataclass(frozen=True)
class Hidden:
    """What slicing the hidden (residual-stream) dimension must update besides the block layers, for
    an RMSNorm family: the final norm, the norms' weight convention (Gemma multiplies by 1 + w:
    offset 1) and the config fields of the size and of the norms' eps."""

    final_norm: str = "model.norm"
    norm_offset: float = 0.0
    eps_key: str = "rms_norm_eps"
    size_key: str = "hidden_size"


@dataclass(frozen=True)
class Width:
    """What width pruning may slice in a family, and the config flags that give a branch biases
    (each flag adds a bias to every projection of the branch, in every block)."""

    mlp: MLP
    attention: Attention | None = None  # None: heads cannot be pruned with a stock config
    bias_flags: tuple[tuple[str, str], ...] = ()  # (branch kind, config flag)
    hidden: Hidden | None = None  # None: the hidden dimension cannot be pruned (LayerNorm families)
    # width stages refit the output projections by default (--reconstruct): where bias compensation
    # cannot be held and the refit was measured to help (Gemma 3, docs/benchmarks.md)
    refit: bool = False

    def bias_flag(self, kind: str) -> str | None:
        return dict(self.bias_flags).get(kind)


@dataclass(frozen=True)
class Experts:
    """A block's routed experts, as transformers 5 holds them in every supported mixture-of-experts
    family: the MoE block `module` calls its router `router` (weight (experts, hidden), returning
    (logits, top-k weights, top-k indices)) and then its experts module `experts` with
    (tokens, top-k indices, top-k weights); the experts are fused 3-D parameters, `gate_up_proj`
    (experts, 2 x width, hidden: gate rows then up rows) and `down_proj` (experts, hidden, width).

    Blocks whose `module` has no `experts` are dense (Qwen MoE's `mlp_only_layers`, DeepSeek-V3's
    first blocks). `count_key`, `top_k_key` and `width_key` are the config fields of the expert
    count, the experts per token and an expert's width; `dense_key` / `step_key` say which blocks
    are dense (a list of block indices and the every-n-th-block-is-sparse step) and
    `dense_prefix_key` how many leading blocks are (DeepSeek's first_k_dense_replace), rewritten
    when blocks go; `shared` is an always-on shared expert beside the routed ones (Qwen2-MoE,
    DeepSeek-V3), untouched by expert removal; `group_key` the config field of the router's expert
    groups (DeepSeek-V3's group-limited routing: each group holds count / groups consecutive
    experts, so removal takes the same number from every group)."""

    count_key: str
    width_key: str
    module: str = "mlp"
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    top_k_key: str = "num_experts_per_tok"
    dense_key: str | None = None
    step_key: str | None = None
    dense_prefix_key: str | None = None
    shared: str | None = None
    group_key: str | None = None
    shared_tied: bool = False  # the shared expert's width follows width_key (DeepSeek-V3: x n_shared_experts)
    shared_width_key: str | None = None  # the config field of the shared expert's own width (Qwen2-MoE)
    shared_gate: str | None = None  # the shared expert's scalar gate, sigmoid(gate(x)) x its output (Qwen2-MoE)
    # how checkpoints store the experts (transformers 5 saves them so): one matrix per expert and projection,
    # `{stored_module}.experts.{j}.{gate|up|down}.weight`, the MoE module renamed where they name it otherwise
    stored_module: str | None = None  # Mixtral: block_sparse_moe (None: `module`)
    stored_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    # the norm `module` reads through, in a pre-norm block: the block's output is this norm's input
    # plus `module`'s output (so a block whose experts changed is recomputed from that point)
    norm: str = "post_attention_layernorm"

    def groups(self, config) -> int:
        """How many groups the router splits its experts into (1: no group-limited routing)."""
        return int(getattr(config, self.group_key, None) or 1) if self.group_key else 1

    def sparse_blocks(self, blocks: nn.ModuleList) -> list[int]:
        """The indices of the blocks that route to experts (the others hold a dense MLP)."""
        return [i for i, block in enumerate(blocks) if hasattr(block.get_submodule(self.module), "experts")]

    def counts(self, blocks: nn.ModuleList) -> dict[int, int]:
        """Every MoE block's routed-expert count (its router's rows), by block index."""
        return {i: blocks[i].get_submodule(self.router).weight.shape[0] for i in self.sparse_blocks(blocks)}

    def sync_layers(self, config, blocks: nn.ModuleList) -> None:
        """Rewrite the config's dense-block list from `blocks` as they are (after blocks were removed or
        reordered), so a stock config rebuilds the same mix of dense and sparse blocks."""
        sparse = set(self.sparse_blocks(blocks))
        if self.dense_prefix_key is not None:  # the leading blocks that are not sparse
            setattr(config, self.dense_prefix_key, next((i for i in range(len(blocks)) if i in sparse), len(blocks)))
        if self.dense_key is None:
            return
        setattr(config, self.dense_key, [i for i in range(len(blocks)) if i not in sparse])
        if self.step_key is not None:
            setattr(config, self.step_key, 1)


LLAMA_BRANCHES = Branches(("self_attn", "input_layernorm"), ("mlp", "post_attention_layernorm"))


@dataclass(frozen=True)
class Adapter:
    family: str
    model_types: tuple[str, ...]  # values of config.model_type this adapter handles
    blocks: str  # dotted path from the *ForCausalLM module to the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # block-relative names of linear layers that read one input
    needs_bos: bool = False  # the family is trained with BOS first and degrades without it (Gemma)
    branches: Branches = LLAMA_BRANCHES  # for sublayer (attention / MLP) removal
    per_layer_config: tuple[str, ...] = ("layer_types",)  # config lists with one entry per block
    width: Width | None = None  # for structured width pruning (heads, MLP channels)
    experts: Experts | None = None  # mixture of experts: where the routed experts are (expert pruning)
    full_lr: float | None = None  # recovery's full fine-tuning peak lr where the mode's default diverges (measured)

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def layer_names(self) -> list[str]:
        return [name for group in self.groups for name in group]

    def module_type(self, layer: str) -> str:
        """"attention" or "mlp" for a block-relative layer name (from the branch it belongs to)."""
        for kind in ("attention", "mlp"):
            if any(layer == m or layer.startswith(m + ".") for m in self.branches.of(kind)):
                return kind
        raise ValueError(f"layer {layer!r} is in neither branch of the {self.family} adapter")


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


def refuse_experts(adapter: Adapter, what: str) -> None:
    """`what` works on `nn.Linear` layers only: on a mixture of experts it would leave the fused
    experts (most of the weights) untouched, so it is refused rather than half done."""
    if adapter.experts is not None:
        raise UnsupportedModelError(
            f"{what} does not reach the fused 3-D expert weights of {adapter.family} (a mixture of experts) yet, and "
            f"would prune only attention; remove whole experts with --method experts, or blocks with a depth method")


def supported() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; secateur supports: {', '.join(supported())}"
        )
    return ADAPTERS[model_type]


# --- weights as (outputs, inputs), whatever the module stores -----------------------------------


def read_weight(module: nn.Module) -> Tensor:
    """The weight as (out_features, in_features); GPT-2's Conv1D stores it transposed."""
    weight = module.weight.data
    return weight.T if isinstance(module, Conv1D) else weight


def write_weight(module: nn.Module, weight: Tensor) -> None:
    with torch.no_grad():
        read_weight(module).copy_(weight)
