"""Llama family: Llama 2/3, SmolLM, Mistral (separate q/k/v, SwiGLU MLP)."""

from secateur.models.base import MLP, Adapter, Attention, Hidden, Width, register

LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA_ATTENTION = Attention("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
SWIGLU = MLP(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")

LLAMA = register(
    Adapter("llama", ("llama",), "model.layers", LLAMA_GROUPS,
            width=Width(SWIGLU, LLAMA_ATTENTION, bias_flags=(("attention", "attention_bias"), ("mlp", "mlp_bias")),
                        hidden=Hidden()))
)
MISTRAL = register(
    Adapter("mistral", ("mistral",), "model.layers", LLAMA_GROUPS, width=Width(SWIGLU, LLAMA_ATTENTION, hidden=Hidden()))
)
