"""OPT: separate q/k/v with biases, out_proj, fc1/fc2 MLP."""

from secateur.models.base import MLP, Adapter, Branches, Width, register

OPT = register(
    Adapter(
        "opt",
        ("opt",),
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        branches=Branches(("self_attn", "self_attn_layer_norm"), ("fc1", "fc2", "final_layer_norm")),
        width=Width(MLP(("fc1",), "fc2", size_key="ffn_dim")),  # head size is hidden / heads: no head pruning
    )
)
