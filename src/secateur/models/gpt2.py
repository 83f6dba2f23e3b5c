"""GPT-2: Conv1D layers (weights stored transposed: (in, out)); c_attn fuses q/k/v."""

from secateur.models.base import MLP, Adapter, Branches, Width, register

GPT2 = register(
    Adapter("gpt2", ("gpt2",), "transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
            branches=Branches(("attn", "ln_1"), ("mlp", "ln_2")),
            width=Width(MLP(("mlp.c_fc",), "mlp.c_proj", size_key="n_inner")))  # head size is n_embd / n_head: no head pruning
)
