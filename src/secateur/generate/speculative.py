"""Greedy decoding, and greedy speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a
draft model that shares the target's vocabulary: the draft proposes `k` tokens one by one, the
target scores them all in one forward, the longest prefix that matches the target's own greedy
choices is accepted, and the target's token after it is added. The output is the target's greedy
output token for token, whatever the draft; only the time changes, by how many proposals are
accepted. Both models keep a KV cache that is cut back to the accepted tokens after every round."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secateur.errors import SecateurError
from secateur.models.cache import cache_of, with_cache


@dataclass
class Decoded:
    tokens: list[int]  # the new tokens, after the prompt
    seconds: float  # prefill and decoding together
    proposed: int = 0  # draft tokens proposed (speculative only)
    accepted: int = 0  # of them, the ones the target agreed with
    target_calls: int = 0  # target forwards after the prefill
    accepted_per_round: list[int] = field(default_factory=list)
    first_token_seconds: float = 0.0  # the prefill, up to the first new token (greedy only)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _cut(cache, tokens: int) -> None:
    """Drop the last `tokens` positions of a KV cache."""
    if tokens <= 0:
        return
    try:
        cache.crop(-tokens)
    except (RuntimeError, ValueError) as exc:
        raise SecateurError(f"speculative decoding rolls the KV cache back, which this model's cache refuses ({exc}); "
                            "use a family without sliding-window caches") from None


@torch.inference_mode()
def greedy(model: nn.Module, prompt: Tensor, new_tokens: int) -> Decoded:
    """`new_tokens` greedy tokens after `prompt` (1, length), one forward per token with the KV cache."""
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    tokens = [int(out.logits[0, -1].argmax())]
    first = time.perf_counter() - start
    cache = cache_of(out)
    while len(tokens) < new_tokens:
        out = model(input_ids=prompt.new_tensor([[tokens[-1]]]), **with_cache(model, cache))
        cache = cache_of(out)
        tokens.append(int(out.logits[0, -1].argmax()))
    return Decoded(tokens, time.perf_counter() - start, target_calls=len(tokens) - 1, first_token_seconds=first)


@torch.inference_mode()
def speculative(target: nn.Module, draft: nn.Module, prompt: Tensor, new_tokens: int, k: int = 4) -> Decoded:
    """The target's `new_tokens` greedy tokens after `prompt` (1, length), with `draft` proposing `k`
    tokens per round."""
    if k < 1:
        raise SecateurError(f"the draft proposes at least 1 token per round, got {k}")
    if draft.get_output_embeddings().out_features != target.get_output_embeddings().out_features:
        raise SecateurError("the draft must share the target's vocabulary (a vocabulary-pruned draft does not)")
    start = time.perf_counter()
    out = target(input_ids=prompt, use_cache=True, logits_to_keep=1)
    target_cache, tokens = cache_of(out), [int(out.logits[0, -1].argmax())]  # target cache: prompt
    draft_cache, drafted = cache_of(draft(input_ids=prompt, use_cache=True, logits_to_keep=1)), 0
    for cache in (target_cache, draft_cache):  # sliding-window layers keep what a rollback needs (after the
        if hasattr(cache, "activate_past_recording"):  # prefill: recording it would hold the whole prompt)
            cache.activate_past_recording()
    result = Decoded(tokens, 0.0)
    while len(tokens) < new_tokens:
        # the draft catches up on the tokens it has not seen, then proposes k tokens
        pending = tokens[drafted:]
        proposals: list[int] = []
        for _ in range(k):
            out = draft(input_ids=prompt.new_tensor([pending]), **with_cache(draft, draft_cache))
            draft_cache, pending = cache_of(out), [int(out.logits[0, -1].argmax())]
            proposals.append(pending[0])
        # the target scores the last accepted token and the k proposals in one forward
        scored = target(input_ids=prompt.new_tensor([[tokens[-1], *proposals]]), **with_cache(target, target_cache))
        target_cache, choices = cache_of(scored), scored.logits[0].argmax(-1).tolist()  # (k + 1,)
        accepted = 0
        while accepted < k and proposals[accepted] == choices[accepted]:
            accepted += 1
        _cut(target_cache, k - accepted)  # keep the target's cache up to the last accepted proposal
        seen = len(tokens) + k - 1  # what the draft's cache holds beyond the prompt
        tokens.extend([*proposals[:accepted], choices[accepted]])
        drafted = min(seen, len(tokens) - 1)  # its cache keeps only what was accepted
        _cut(draft_cache, seen - drafted)
        result.proposed += k
        result.accepted += accepted
        result.target_calls += 1
        result.accepted_per_round.append(accepted)
    result.tokens, result.seconds = tokens[:new_tokens], time.perf_counter() - start
    return result
