"""Gemma 3 text models (Gemma3ForCausalLM): Llama-shaped layers, sandwich norms, BOS required."""

from secateur.models.base import Adapter, register
from secateur.models.llama import LLAMA_GROUPS

GEMMA3 = register(Adapter("gemma3", ("gemma3_text",), "model.layers", LLAMA_GROUPS, needs_bos=True))
