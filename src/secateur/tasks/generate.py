"""Greedy continuations of a fixed set of prompts: what a pruned model says, next to its original."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, you",
    "Photosynthesis is the process by which",
)


def prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """(1, tokens): the prompt as a user turn in the tokenizer's chat template where it has one,
    else as plain text (with the special tokens the tokenizer adds by default)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.inference_mode()
def continuations(model: nn.Module, tokenizer: Any, prompts: tuple[str, ...] = PROMPTS, new_tokens: int = 32,
                  device: str | torch.device = "cpu") -> list[str]:  # fmt: skip
    """Greedy continuation of each prompt (the new tokens only, special tokens dropped)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt).to(device)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=pad)  # fmt: skip
        out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out
