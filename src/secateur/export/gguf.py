"""GGUF export for llama.cpp, ollama and LM Studio, written with the `gguf` library.

A model whose blocks all have the same widths is written as its family's own llama.cpp
architecture (`llama`, `qwen2`, `qwen3`), with an explicit head size and the biases bias
compensation added. A model whose blocks differ (adaptive widths, attention or MLP branches removed
from some blocks) is written as llama.cpp's `deci` architecture (DeciLM / Nemotron-NAS): per-layer
arrays of query heads, key/value heads and feed-forward widths, 0 heads for an attention-free block.
What neither can express is refused before anything is written.

The `llama` and `deci` graphs apply rotary embeddings to interleaved pairs, HF's Llama code to the
two halves of each head: query and key rows are reordered per head (as llama.cpp's own converter
does); `qwen2` / `qwen3` / `gemma3` use the halves convention and take the rows as they are.

Gemma 3 is written as llama.cpp's `gemma3`: its RMSNorms scale by 1 + weight, so every norm weight is
written plus one (as llama.cpp's converter does); which blocks use sliding-window attention is an
explicit per-layer array (so a depth-pruned model keeps its pattern), with the sliding layers'
rotary base; llama.cpp scales queries by 1/sqrt(head size) and the embedding by sqrt(hidden size)
itself, so a config whose query scale differs is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from secateur.export.errors import ExportError
from secateur.models.base import Attention

if TYPE_CHECKING:
    from secateur.export.vocab import Vocabulary

log = logging.getLogger(__name__)

MANIFEST_KEY = "secateur.manifest"  # the output's secateur.json, as a JSON string
BLOCK = 32  # values per block of GGML's 8-bit type: a quantized row's length must be a multiple of it


@dataclass(frozen=True)
class Family:
    """How a model family is written: llama.cpp's architecture for uniform widths, whether query /
    key rows are reordered for interleaved rotary pairs, whether per-layer widths may be written
    as `deci` (a Llama-shaped block: no q/k norms, SwiGLU, RMSNorm), what is added to norm weights
    (Gemma's 1 + weight), and the family's own metadata (a writer of further keys, which refuses what
    llama.cpp's graph for it cannot compute)."""

    arch: str
    interleaved_rope: bool
    per_layer: bool
    norm_shift: float = 0.0
    extra: Callable[[Any, Any, "Shape"], None] | None = None
    check: Callable[[Any, "Shape"], None] | None = None  # raises ExportError for what the graph cannot compute
    unlike_deci: str = ""  # what its blocks have that llama.cpp's deci cannot hold (per-layer widths refused)
    head_required: bool = False  # llama.cpp's graph reads output.weight even where the model ties it to the embedding


def _gemma3_check(config, shape: "Shape") -> None:
    """What llama.cpp's gemma3 graph cannot compute."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != shape.head_dim:
        raise ExportError(f"query_pre_attn_scalar {scalar} differs from the head size {shape.head_dim}; llama.cpp's "
                          "gemma3 graph scales queries by 1/sqrt(head size) only")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ExportError("attention logit soft-capping (Gemma 2) is not in llama.cpp's gemma3 graph")
    types = list(getattr(config, "layer_types", None) or [])
    if len(types) != len(shape.heads):
        raise ExportError(f"the config lists {len(types)} layer types for {len(shape.heads)} blocks")
    _rope_theta(config, "sliding_attention")


def _gemma3(writer, config, shape: "Shape") -> None:
    """Gemma 3's keys: the sliding window, which layers use it, their rotary base, logit soft-capping."""
    types = list(config.layer_types)
    if getattr(config, "sliding_window", None) and "sliding_attention" in types:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _phi3_check(config, shape: "Shape") -> None:
    """llama.cpp's phi3 graph holds queries of the hidden size (its output projection is hidden x hidden)
    and rotates whole heads."""
    hidden = int(config.hidden_size)
    if shape.heads[0] * shape.head_dim != hidden:
        raise ExportError(f"llama.cpp's phi3 expects query heads x head size = hidden size ({hidden}); this model has "
                          f"{shape.heads[0]} x {shape.head_dim}: export Phi-3 with its attention heads whole (prune the "
                          "MLP width, blocks or vocabulary only)")
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise ExportError(f"partial rotary embeddings (factor {factor}) are not exported yet")


MOE_ATTENTION = Attention("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


Check = Callable[[Any, "Shape"], None]


def _moe_check(renormalised: bool, *more: Check) -> Check:
    """What llama.cpp's graph for a mixture of experts cannot compute: it renormalises the top-k
    weights or not by architecture (qwen3moe and llama do, qwen2moe and olmoe do not); then the
    architecture's own checks `more`."""

    def check(config, shape: "Shape") -> None:
        ours = bool(getattr(config, "norm_topk_prob", True))  # Mixtral has no flag: it always renormalises
        if ours != renormalised:
            raise ExportError(f"norm_topk_prob is {ours}, but llama.cpp's {shape.arch} graph "
                              f"{'always' if renormalised else 'never'} renormalises the top-k routing weights")
        for extra in more:
            extra(config, shape)

    return check


def _shared_expert(config, shape: "Shape") -> None:
    if not getattr(config, "shared_expert_intermediate_size", 0):
        raise ExportError("llama.cpp's qwen2moe graph needs the shared expert, and this model has none")


def _no_grouped_query(config, shape: "Shape") -> None:
    if shape.kv_heads[0] != shape.heads[0]:
        raise ExportError(f"llama.cpp's olmoe graph normalises keys over the hidden size, so it holds no grouped-query "
                          f"attention; this model has {shape.kv_heads[0]} key/value heads for {shape.heads[0]} "
                          "query heads")


def _moe(writer, config, shape: "Shape") -> None:
    """A mixture of experts' keys: experts, experts per token, an expert's width, the shared expert's."""
    from secateur.models import adapter_for

    experts = adapter_for(config).experts
    writer.add_expert_count(int(getattr(config, experts.count_key)))
    writer.add_expert_used_count(int(getattr(config, experts.top_k_key)))
    writer.add_expert_feed_forward_length(shape.channels[0])
    if getattr(config, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))


FAMILIES = {
    "llama": Family("llama", interleaved_rope=True, per_layer=True),
    "mistral": Family("llama", interleaved_rope=True, per_layer=True),
    "qwen2": Family("qwen2", interleaved_rope=False, per_layer=True),
    "qwen3": Family("qwen3", interleaved_rope=False, per_layer=False, unlike_deci="q/k norms"),
    "gemma3_text": Family("gemma3", interleaved_rope=False, per_layer=False, norm_shift=1.0, extra=_gemma3,
                          check=_gemma3_check, unlike_deci="q/k norms, post-norms and GELU"),
    "phi3": Family("phi3", interleaved_rope=False, per_layer=False, check=_phi3_check,
                   unlike_deci="fused qkv and gate_up projections"),
    # mixtures of experts: every block routes to experts of one width and count
    "qwen2_moe": Family("qwen2moe", interleaved_rope=False, per_layer=False, extra=_moe,
                        check=_moe_check(False, _shared_expert), head_required=True),
    "qwen3_moe": Family("qwen3moe", interleaved_rope=False, per_layer=False, extra=_moe, check=_moe_check(True)),
    "mixtral": Family("llama", interleaved_rope=True, per_layer=False, extra=_moe, check=_moe_check(True)),
    "olmoe": Family("olmoe", interleaved_rope=False, per_layer=False, extra=_moe,
                    check=_moe_check(False, _no_grouped_query), head_required=True),
}
PER_LAYER_ARCH = "deci"


@dataclass(frozen=True)
class GGUFType:
    tensor: str  # GGMLQuantizationType name for 2-D weights
    file_type: str  # LlamaFileType name, written as general.file_type


TYPES = {
    "f32": GGUFType("F32", "ALL_F32"),
    "f16": GGUFType("F16", "MOSTLY_F16"),
    "bf16": GGUFType("BF16", "MOSTLY_BF16"),
    "q8_0": GGUFType("Q8_0", "MOSTLY_Q8_0"),
}


@dataclass(frozen=True)
class Shape:
    """What the exported file says about the model: its llama.cpp architecture and the per-layer
    query heads, key/value heads and MLP widths (0: the branch is absent)."""

    arch: str
    heads: list[int]
    kv_heads: list[int]
    channels: list[int]
    head_dim: int
    stub_mlps: list[int]  # blocks whose removed MLP is written as one zero channel (see `stub_mlp`)

    @property
    def uniform(self) -> bool:
        return self.arch != PER_LAYER_ARCH


# --- what the file can express --------------------------------------------------------------------


def family_of(model: nn.Module) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ExportError(f"GGUF export supports the {', '.join(sorted(FAMILIES))} families; {model_type} models "
                          "cannot be exported yet (save the HF directory and use another engine)")
    return FAMILIES[model_type]


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    """The rotary base (of `layer_type`'s layers where the config holds one per layer type, as Gemma 3's)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if isinstance(parameters.get(layer_type), dict):
        for kind in parameters:
            if isinstance(parameters[kind], dict) and parameters[kind].get("rope_type", "default") != "default":
                raise ExportError(f"rotary scaling {parameters[kind]['rope_type']!r} ({kind} layers) is not exported "
                                  "yet; only unscaled rotary embeddings are")
        parameters = parameters[layer_type]
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ExportError(f"rotary scaling {kind!r} is not exported yet; only unscaled rotary embeddings are")
    return float(parameters.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def model_shape(model: nn.Module) -> Shape:
    """The file layout for `model`; raises ExportError for what no layout expresses."""
    from secateur.models import adapter_for
    from secateur.models.shapes import head_dim, layer_width

    family, adapter = family_of(model), adapter_for(model)
    size = head_dim(model.config)
    if adapter.experts is not None:
        return _checked(model, family, _moe_shape(model, family, adapter, size))
    widths = [layer_width(block, adapter.width, size) for block in adapter.block_list(model)]
    heads = [w.attention_heads or 0 for w in widths]
    kv_heads = [w.key_value_heads or 0 for w in widths]
    channels = [w.channels or 0 for w in widths]
    uniform = len(set(heads)) == len(set(kv_heads)) == len(set(channels)) == 1 and heads[0] > 0 and channels[0] > 0
    if not uniform and not family.per_layer:
        raise ExportError(f"blocks differ in width or lack a branch, which llama.cpp reads only for Llama-shaped "
                          f"models (its deci architecture); {model.config.model_type} blocks have "
                          f"{family.unlike_deci or 'parts'} it cannot hold: prune with uniform widths and whole "
                          "blocks to export")
    _rope_theta(model.config)
    stubs = [i for i, (h, c) in enumerate(zip(heads, channels)) if h > 0 and c == 0]
    channels = [1 if i in stubs else c for i, c in enumerate(channels)]
    return _checked(model, family, Shape(family.arch if uniform else PER_LAYER_ARCH, heads, kv_heads, channels, size,
                                         stubs))  # fmt: skip


def _checked(model: nn.Module, family: Family, shape: Shape) -> Shape:
    if family.check is not None:
        family.check(model.config, shape)
    return shape


def _moe_shape(model: nn.Module, family: Family, adapter, size: int) -> Shape:
    """A mixture of experts as llama.cpp holds it: every block routes to the same number of experts of
    one width, behind attention of one shape."""
    from secateur.models.shapes import attention_heads

    blocks = adapter.block_list(model)
    sparse = adapter.experts.sparse_blocks(blocks)
    if len(sparse) != len(blocks):
        raise ExportError(f"blocks {[i for i in range(len(blocks)) if i not in sparse]} hold a dense MLP or none; "
                          f"llama.cpp's {family.arch} graph routes every block to experts")
    heads = {attention_heads(block, MOE_ATTENTION, size) for block in blocks}
    experts = [block.get_submodule(adapter.experts.experts) for block in blocks]
    layout = {(e.gate_up_proj.shape[0], e.down_proj.shape[2]) for e in experts}  # (experts, width) per block
    counts = list(adapter.experts.counts(blocks).values())
    if len(set(counts)) > 1:
        raise ExportError(f"the MoE blocks hold different expert counts ({', '.join(map(str, counts))}: global "
                          f"allocation); llama.cpp's {family.arch} graph holds one count for every block: prune with "
                          "--allocation uniform to export")
    if None in heads or len(heads) != 1 or len(layout) != 1:
        raise ExportError("blocks differ in attention heads or in their experts' count or width (or lack attention); "
                          f"llama.cpp's {family.arch} graph holds one shape for every block")
    (q, kv), ((_, width),) = heads.pop(), layout
    n = len(blocks)
    _rope_theta(model.config)
    return Shape(family.arch, [q] * n, [kv] * n, [width] * n, size, [])


def _unfused(hf_name: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """transformers 5's fused experts (parameters without a .weight suffix) under the names llama.cpp's
    tensor map reads: gate_up_proj (experts, 2 x width, hidden) split into gate_proj and up_proj;
    down_proj as it is."""
    if hf_name.endswith("mlp.experts.gate_up_proj"):
        base = hf_name.removesuffix("gate_up_proj")
        gate, up = tensor.chunk(2, dim=1)  # (experts, width, hidden) each
        return [(base + "gate_proj.weight", gate), (base + "up_proj.weight", up)]
    if hf_name.endswith("mlp.experts.down_proj"):
        return [(hf_name + ".weight", tensor)]
    return [(hf_name, tensor)]


def stub_mlp(block: int, hidden: int) -> list[tuple[str, Tensor]]:
    """A one-channel MLP that adds exactly zero (its up projection is zero), for a block that keeps
    its attention but lost its MLP: llama.cpp's deci graph (as vendored by llama-cpp-python 0.3.36)
    skips the rest of a block with no feed-forward width, attention output included, so a width of
    0 would drop the attention too. Costs 3 x hidden weights per such block."""
    return [(f"blk.{block}.ffn_norm.weight", torch.ones(hidden)),
            (f"blk.{block}.ffn_gate.weight", torch.zeros(1, hidden)),
            (f"blk.{block}.ffn_up.weight", torch.zeros(1, hidden)),
            (f"blk.{block}.ffn_down.weight", torch.zeros(hidden, 1))]  # fmt: skip


# --- tensors --------------------------------------------------------------------------------------


def interleave_rope_rows(weight: Tensor, heads: int) -> Tensor:
    """Reorder each head's rows from HF's halves layout (x1 = rows [0, d/2), x2 = [d/2, d)) to
    GGML's interleaved pairs (row 2i = x1[i], row 2i + 1 = x2[i]); a weight (rows, in) or a bias."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def named_tensors(model: nn.Module, shape: Shape) -> Iterator[tuple[str, Tensor]]:
    """(GGUF tensor name, float32 tensor) for every parameter; query / key rows reordered where the
    architecture rotates interleaved pairs."""
    import gguf

    family = family_of(model)
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == shape.arch)
    names = gguf.get_tensor_name_map(arch, len(shape.heads))
    interleave = family.interleaved_rope or shape.arch == PER_LAYER_ARCH
    tied = getattr(model.config, "tie_word_embeddings", False) and not family.head_required  # else written twice
    state = ((n, t) for hf_name, fused in model.state_dict().items() for n, t in _unfused(hf_name, fused))
    for hf_name, tensor in state:
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for {hf_name}; this model holds tensors llama.cpp does not read")
        tensor = tensor.detach().float().cpu()
        if family.norm_shift and name.endswith("norm.weight"):
            tensor = tensor + family.norm_shift
        if interleave and (".attn_q." in name or ".attn_k." in name):
            block = int(name.split(".")[1])
            heads = shape.heads[block] if ".attn_q." in name else shape.kv_heads[block]
            tensor = interleave_rope_rows(tensor, heads)
        yield name, tensor
    for block in shape.stub_mlps:
        yield from stub_mlp(block, int(model.config.hidden_size))


def encode(name: str, tensor: Tensor, kind: str) -> tuple[np.ndarray, Any]:
    """The tensor's bytes in the requested type: 1-D tensors (norms, biases) and routers stay float32,
    as llama.cpp's converter keeps them; 2-D rows whose length is no multiple of 32 fall back to f16."""
    import gguf

    qtype = gguf.GGMLQuantizationType[TYPES[kind].tensor]
    data = tensor.numpy()
    if data.ndim == 1 or ".ffn_gate_inp" in name:  # routers stay float32 too, as the converter keeps them
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % BLOCK:
        log.info("%s: rows of %d values cannot be 8-bit blocks; written as f16", name, data.shape[-1])
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


# --- metadata -------------------------------------------------------------------------------------


def write_hparams(writer, model: nn.Module, shape: Shape, kind: str) -> None:
    import gguf

    config = model.config
    per_layer = not shape.uniform
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(shape.heads))
    writer.add_feed_forward_length(shape.channels if per_layer else shape.channels[0])
    writer.add_head_count(shape.heads if per_layer else shape.heads[0])
    writer.add_head_count_kv(shape.kv_heads if per_layer else shape.kv_heads[0])
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    family = family_of(model)
    if family.extra is not None:
        family.extra(writer, config, shape)
    writer.add_file_type(int(gguf.LlamaFileType[TYPES[kind].file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model: nn.Module, shape: Shape, path: Path, kind: str, manifest: dict[str, Any] | None,
               vocabulary: Vocabulary, name: str) -> None:
    """Write `model` in layout `shape` (from `model_shape`) to `path`, a new file (a command's output
    goes through `secateur.output`, which hands it a hidden staging path and renames it into place)."""
    import gguf

    if kind not in TYPES:
        raise ExportError(f"--type must be one of {', '.join(TYPES)}, got {kind!r}")
    writer = gguf.GGUFWriter(path, shape.arch)
    try:
        writer.add_name(name)
        write_hparams(writer, model, shape, kind)
        vocabulary.write(writer)
        if manifest is not None:
            writer.add_string(MANIFEST_KEY, json.dumps(manifest, default=str))
        for tensor_name, tensor in named_tensors(model, shape):
            data, qtype = encode(tensor_name, tensor, kind)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def file_bytes(model: nn.Module, kind: str) -> int:
    """About the size of the file: every weight at the type's bytes per value (norms stay f32)."""
    per_value = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}[kind]
    return int(sum(p.numel() * (per_value if p.dim() >= 2 else 4.0) for p in model.parameters()))
