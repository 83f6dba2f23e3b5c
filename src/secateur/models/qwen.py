"""Qwen2 and Qwen3 (Qwen3 adds q/k RMSNorms, which hold no prunable linear layer)."""

from secateur.models.base import Adapter, register
from secateur.models.llama import LLAMA_GROUPS

QWEN = register(Adapter("qwen", ("qwen2", "qwen3"), "model.layers", LLAMA_GROUPS))
