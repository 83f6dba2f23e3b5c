"""Mixture-of-experts families (transformers 5 layout: fused 3-D experts behind a top-k router).

Their attention is Llama's (Qwen2-MoE adds q/k/v biases, Qwen3-MoE and OLMoE q/k norms), or
DeepSeek-V3's multi-head latent attention (low-rank query and key/value projections); blocks and
branches go as in dense families, sparsity and width reach only what is an `nn.Linear` and refuse
the fused experts, which the experts stage prunes. The linear groups name the dense MLP of a dense
block (Qwen MoE's `mlp_only_layers`, DeepSeek-V3's first blocks) and the shared expert; a name a
block lacks is skipped (DeepSeek-V3's q_proj exists only without a query rank).
"""

from secateur.models.base import Adapter, Experts, register

ATTENTION_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
DENSE_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
SHARED_EXPERT = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"),
                 ("mlp.shared_expert.down_proj",))  # fmt: skip

QWEN3_MOE = register(Adapter(
    "qwen3_moe", ("qwen3_moe",), "model.layers", ATTENTION_GROUPS + DENSE_MLP,
    experts=Experts("num_experts", "moe_intermediate_size", dense_key="mlp_only_layers", step_key="decoder_sparse_step"),
))  # fmt: skip
QWEN2_MOE = register(Adapter(
    "qwen2_moe", ("qwen2_moe",), "model.layers", ATTENTION_GROUPS + DENSE_MLP + SHARED_EXPERT,
    experts=Experts("num_experts", "moe_intermediate_size", dense_key="mlp_only_layers", step_key="decoder_sparse_step",
                    shared="mlp.shared_expert", shared_width_key="shared_expert_intermediate_size",
                    shared_gate="mlp.shared_expert_gate"),
))  # fmt: skip
MIXTRAL = register(Adapter("mixtral", ("mixtral",), "model.layers", ATTENTION_GROUPS,
                           experts=Experts("num_local_experts", "intermediate_size", stored_module="block_sparse_moe",
                                           stored_projections=("w1", "w3", "w2"))))
OLMOE = register(Adapter("olmoe", ("olmoe",), "model.layers", ATTENTION_GROUPS,
                         experts=Experts("num_experts", "intermediate_size")))

# multi-head latent attention: q_a (or q, without a query rank) and kv_a read the block's input,
# q_b and kv_b the normalised low-rank states
MLA_GROUPS = (("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
              ("self_attn.kv_b_proj",), ("self_attn.o_proj",))  # fmt: skip
SHARED_EXPERTS = (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"), ("mlp.shared_experts.down_proj",))
DEEPSEEK_V3 = register(Adapter(
    "deepseek_v3", ("deepseek_v3",), "model.layers", MLA_GROUPS + DENSE_MLP + SHARED_EXPERTS,
    experts=Experts("n_routed_experts", "moe_intermediate_size", dense_prefix_key="first_k_dense_replace",
                    shared="mlp.shared_experts", group_key="n_group", shared_tied=True),
))  # fmt: skip
