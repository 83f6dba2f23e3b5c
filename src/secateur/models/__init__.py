"""Adapters for the supported model families; importing this package registers them all."""

from . import gemma, gpt2, gpt_neox, llama, moe, opt, phi3, qwen  # noqa: F401  (registration)
from secateur.models.base import (
    ADAPTERS,
    MLP,
    Adapter,
    Attention,
    Branches,
    Experts,
    Hidden,
    UnsupportedModelError,
    Width,
    adapter_for,
    read_weight,
    refuse_experts,
    supported,
    write_weight,
)

__all__ = [
    "ADAPTERS", "MLP", "Adapter", "Attention", "Branches", "Experts", "Hidden", "UnsupportedModelError", "Width", "adapter_for",
    "read_weight", "refuse_experts", "supported", "write_weight",
]  # fmt: skip
