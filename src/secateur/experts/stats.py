"""Per-expert calibration statistics of one MoE block, fed with what its router and experts see.

An expert is measured only on the tokens routed to it (its top-k slot), as the block runs it: an
expert scored on tokens it never receives would be scored by the wrong formula. All sums run in
float64 on the block's device.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Act = Callable[[Tensor], Tensor]


def expert_activation(gate_up: Tensor, act: Act, x: Tensor) -> Tensor:
    """One expert's channels on tokens `x` (n, hidden): act(gate x) * up x, (n, width).
    gate_up: (2 x width, hidden), gate rows first."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)  # (n, width) each
    return act(gate) * up


def expert_output(gate_up: Tensor, down: Tensor, act: Act, x: Tensor) -> Tensor:
    """One expert on tokens `x` (n, hidden): down(act(gate x) * up x), without the gate weight.
    down: (hidden, width)."""
    return expert_activation(gate_up, act, x) @ down.T  # (n, hidden)


class ExpertStats:
    """Sums over calibration tokens for every routed expert of one block.

    count[j]: tokens routed to j; gate[j]: the sum of the weights j's output was multiplied by there;
    reap[j]: the sum of weight x ||f_j(x)||_2 there (REAP's numerator); norm[j]: the sum of
    ||f_j(x)||_2; probability[j]: the router's softmax probability of j summed over all tokens;
    channels[j, c]: the sum of weight x |a_c(x)|, expert j's channel c's activation scaled as the
    block scales j's output (expert width scores)."""

    def __init__(self, experts: int, device: torch.device | str, width: int = 0) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.count, self.gate, self.reap, self.norm, self.probability = (zeros(experts) for _ in range(5))
        self.channels = zeros(experts, width)
        self.tokens = 0

    def update(self, x: Tensor, logits: Tensor, indices: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor,
               act: Act) -> Tensor:  # fmt: skip
        """x: (tokens, hidden) entering the experts; logits: (tokens, experts); indices, weights:
        (tokens, top_k), the experts each token is routed to and the weights their outputs get.
        Returns what the experts module returns, the weighted sum of the routed experts' outputs
        (tokens, hidden): each expert runs once for both."""
        out = torch.zeros_like(x)
        self.tokens += x.shape[0]
        self.probability += logits.double().softmax(dim=-1).sum(dim=0)
        for j in indices.unique().tolist():
            token, slot = torch.where(indices == j)  # the tokens routed to j and in which top-k slot
            w = weights[token, slot].double()  # (n,)
            activation = expert_activation(gate_up[j], act, x[token])  # (n, width)
            output = activation @ down[j].T  # (n, hidden)
            out.index_add_(0, token, (output * weights[token, slot, None]).to(out.dtype))
            norm = output.double().norm(dim=-1)  # (n,)
            if self.channels.shape[1]:
                self.channels[j] += (w[:, None] * activation.double().abs()).sum(dim=0)
            self.count[j] += len(token)
            self.gate[j] += w.sum()
            self.norm[j] += norm.sum()
            self.reap[j] += (w * norm).sum()
        return out

    def mean(self, total: Tensor) -> Tensor:
        """`total` per routed token (0 for an expert no token reached)."""
        return torch.where(self.count > 0, total / self.count.clamp(min=1), torch.zeros_like(total))

    def to_dict(self) -> dict[str, list[float]]:
        return {"tokens_routed": self.count.tolist(), "mean_gate": self.mean(self.gate).tolist(),
                "mean_output_norm": self.mean(self.norm).tolist(),
                "mean_probability": (self.probability / max(self.tokens, 1)).tolist()}  # fmt: skip
