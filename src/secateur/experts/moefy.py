"""MoEfication (Zhang et al. 2022): a dense Llama-family model rewritten as a stock mixture-of-experts
checkpoint (Mixtral, or Qwen2-MoE when some channels form a shared expert).

No pretrained mixture of experts is available offline, so expert pruning is measured on one built
from real weights: with `shared` > 0, every block's `shared` most important MLP channels (mean
|activation| x down-column norm over calibration tokens) form an always-on shared expert (Qwen2-MoE;
its sigmoid gate is held at 0.5 by a zero weight and folded into its down projection); the other
channels are split into `experts` equal groups by balanced k-means on their co-activation over the
calibration tokens (channels that fire together go together); expert j is the dense MLP restricted
to its channels, so the shared expert plus all routed experts is the dense MLP exactly. A linear
router is fitted per block by least squares to the log of each expert's output norm on the same
tokens, times `temperature`, and every token goes to its `top_k` experts; Mixtral multiplies their
outputs by the top-k softmax weights, which sum to 1, so the experts' down projections are scaled by
`top_k` (equal weights then give the sum of the chosen experts). With top_k = experts and
temperature 0 the output equals the dense model's (up to rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from secateur.calibrate.stream import run_block, stream_blocks
from secateur.models import adapter_for


def balanced_kmeans(features: Tensor, groups: int, iterations: int = 20, seed: int = 0) -> Tensor:
    """Group labels of the rows of `features` (n, d) into `groups` groups of n / groups rows each,
    by cosine similarity to the groups' centroids; each round assigns rows greedily, most similar
    (row, group) pairs first, to groups that still have room."""
    n = features.shape[0]
    if n % groups:
        raise ValueError(f"{n} channels do not split into {groups} equal experts")
    size = n // groups
    rows = nn.functional.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = rows[torch.randperm(n, generator=generator)[:groups]]
    for _ in range(iterations):
        similarity = rows @ centroids.T  # (n, groups)
        assigned, room = [-1] * n, [size] * groups
        for flat in similarity.flatten().argsort(descending=True).tolist():
            row, group = divmod(flat, groups)
            if assigned[row] < 0 and room[group]:
                assigned[row], room[group] = group, room[group] - 1
        labels = torch.tensor(assigned)
        centroids = nn.functional.normalize(torch.stack([rows[labels == g].mean(0) for g in range(groups)]), dim=1)
    return labels


def fit_router(x: Tensor, targets: Tensor, damp: float = 1e-3) -> Tensor:
    """Router weight (experts, hidden) whose logits x W^T best match `targets` (tokens, experts) in
    least squares, ridge `damp` x the mean Gram diagonal; targets are centred per token first."""
    x, targets = x.double(), targets.double()
    targets = targets - targets.mean(dim=1, keepdim=True)
    gram = x.T @ x
    gram += damp * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ targets).T.float()  # (experts, hidden)


def _config(source, experts: int, top_k: int, shared: int):
    """The MoE config holding `source`'s attention, norms and embeddings unchanged."""
    common = dict(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads, num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None), hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings, rms_norm_eps=source.rms_norm_eps,
        rope_parameters=source.rope_parameters, tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
        num_experts_per_tok=top_k, router_aux_loss_coef=0.0,
    )  # fmt: skip
    routed = (source.intermediate_size - shared) // experts
    if not shared:
        return MixtralConfig(**common, intermediate_size=routed, num_local_experts=experts, sliding_window=None)
    return Qwen2MoeConfig(**common, intermediate_size=source.intermediate_size, moe_intermediate_size=routed,
                          shared_expert_intermediate_size=shared, num_experts=experts, norm_topk_prob=True,
                          qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)


@torch.no_grad()
def moefy(model: nn.Module, calibration: Tensor, experts: int = 8, top_k: int = 2, temperature: float = 1.0,
          shared: int = 0, tokens: int = 16384, batch_size: int = 4, device: str | torch.device = "cpu") -> nn.Module:
    """A mixture of experts with `model`'s weights, every MLP split into `experts` routed experts of
    equal width (and a shared expert of `shared` channels)."""
    adapter = adapter_for(model)
    if adapter.family not in ("llama", "mistral"):
        raise ValueError(f"MoEfication rewrites Llama-family models, not {adapter.family}")
    if (model.config.intermediate_size - shared) % experts:
        raise ValueError(f"{model.config.intermediate_size} - {shared} shared channels do not split into {experts} experts")
    moe = AutoModelForCausalLM.from_config(_config(model.config, experts, top_k, shared),
                                           dtype=next(model.parameters()).dtype)  # fmt: skip
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    missing = set(moe.load_state_dict(state, strict=False).missing_keys)
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, torch.device(device), "moefy"):
        seen: list[Tensor] = []
        handle = block.mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0].flatten(0, -2)))
        try:
            inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]
        finally:
            handle.remove()
        x = torch.cat(seen)[:tokens].float()  # (tokens, hidden)
        target = moe.model.layers[index].mlp
        _split(block.mlp, target, x, experts, top_k, temperature, shared)
        missing -= {f"model.layers.{index}.mlp.{name}" for name, _ in target.named_parameters()}
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"MoEfication left weights unset: {sorted(missing)[:5]}")
    return moe.eval()


def _split(mlp: nn.Module, target: nn.Module, x: Tensor, experts: int, top_k: int, temperature: float,
           shared: int) -> None:  # fmt: skip
    gate, up, down = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
    activation = mlp.act_fn(x @ gate.T) * (x @ up.T)  # (tokens, channels)
    rest = torch.arange(activation.shape[1])
    if shared:
        importance = activation.abs().mean(dim=0) * down.norm(dim=0)  # (channels,)
        order = importance.argsort(descending=True)
        common, rest = order[:shared].sort().values, order[shared:].sort().values
        target.shared_expert.gate_proj.weight.copy_(gate[common])
        target.shared_expert.up_proj.weight.copy_(up[common])
        target.shared_expert.down_proj.weight.copy_(down[:, common] * 2)  # sigmoid(0) = 0.5 in front of it
        target.shared_expert_gate.weight.zero_()
    labels = balanced_kmeans(activation[:, rest].abs().T, experts)
    groups = [rest[labels == j] for j in range(experts)]
    outputs = torch.stack([activation[:, g] @ down[:, g].T for g in groups], dim=1)  # (tokens, experts, hidden)
    router = fit_router(x, outputs.norm(dim=-1).clamp(min=1e-6).log()) * temperature
    dtype = target.experts.gate_up_proj.dtype
    target.experts.gate_up_proj.copy_(torch.stack([torch.cat([gate[g], up[g]]) for g in groups]).to(dtype))
    target.experts.down_proj.copy_(torch.stack([down[:, g] * top_k for g in groups]).to(dtype))
    target.gate.weight.copy_(router.to(dtype))
