"""GPT-NeoX / Pythia: fused query_key_value; parallel residual (attention and MLP read the block input)."""

from secateur.models.base import MLP, Adapter, Branches, Width, register

GPT_NEOX = register(
    Adapter(
        "gpt_neox",
        ("gpt_neox",),
        "gpt_neox.layers",
        (
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
        branches=Branches(("attention", "input_layernorm"), ("mlp", "post_attention_layernorm")),
        width=Width(MLP(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")),  # head size is hidden / heads: no head pruning
    )
)
