"""Llama family: Llama 2/3, SmolLM, Mistral (separate q/k/v, SwiGLU MLP)."""

from secateur.models.base import Adapter, register

LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA = register(Adapter("llama", ("llama", "mistral"), "model.layers", LLAMA_GROUPS))
