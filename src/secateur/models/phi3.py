"""Phi-3: fused qkv_proj and gate_up_proj (each is one layer with one input)."""

from secateur.models.base import MLP, Adapter, Attention, Hidden, Width, register

PHI3 = register(
    Adapter(
        "phi3",
        ("phi3",),
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
        width=Width(MLP(("mlp.gate_up_proj",), "mlp.down_proj", stacked=2),
                    Attention("self_attn", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj"),
                    hidden=Hidden()),
    )
)
