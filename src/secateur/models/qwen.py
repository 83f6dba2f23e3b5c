"""Qwen2 and Qwen3 (Qwen3 adds q/k RMSNorms, which hold no prunable linear layer; their size is the
head size, which width pruning never changes)."""

from secateur.models.base import Adapter, Hidden, Width, register
from secateur.models.llama import LLAMA_ATTENTION, LLAMA_GROUPS, SWIGLU

# Qwen2's o_proj has no bias flag, so bias compensation is not offered for either
QWEN = register(
    Adapter("qwen", ("qwen2", "qwen3"), "model.layers", LLAMA_GROUPS, width=Width(SWIGLU, LLAMA_ATTENTION, hidden=Hidden()))
)
