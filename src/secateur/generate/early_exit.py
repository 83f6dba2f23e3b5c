"""Dynamic depth at decoding time, two ways.

- **Early exit** (CALM, Schuster et al. 2022): at each new token, after each block in `exits` a
  confidence is read at the last position; when it exceeds `threshold`, that block's hidden state
  is the token's final state. Two of CALM's confidence measures: `softmax`, the LM head's top-1
  probability (through the final norm; it costs a pass through the LM head at every check, for
  SmolLM2 as much memory traffic as 8 blocks), and `saturation`, the cosine similarity of the
  block's output with its input (nearly free). The blocks after it do not run
  their MLP; they run only their attention branch on the exited state, so their key/value caches
  hold an entry for the token and later tokens attend to it (CALM's state propagation). The prompt
  always runs through every block. Not lossless: the output can differ from the model's.
- **Self-speculation** (LayerSkip's draft-and-verify without its training): the first `blocks`
  blocks with the final norm and LM head, sharing the model's weights, draft tokens that the whole
  model verifies (`speculative`). Lossless: the output is the model's greedy output.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secateur.errors import ConfigError
from secateur.generate.speculative import Decoded, speculative
from secateur.models.cache import cache_of, with_cache
from secateur.models.head import Head


def shallow_view(model: nn.Module, blocks: int) -> nn.Module:
    """The model's first `blocks` blocks with its embeddings, final norm and LM head, sharing every
    weight with `model` (which is left as it is)."""
    from secateur.depth.structure import remove_blocks
    from secateur.models import adapter_for

    adapter = adapter_for(model)
    total = len(adapter.block_list(model))
    if not 1 <= blocks < total:
        raise ConfigError(f"a shallow draft keeps 1..{total - 1} of the model's {total} blocks, got {blocks}")
    config = copy.deepcopy(model.config)
    view = _copy_module(model, model.config, config)
    node = view
    for name in adapter.blocks.split(".")[:-1]:  # the modules on the way to the block list get their own copies
        node._modules[name] = _copy_module(node._modules[name], model.config, config)
        node = node._modules[name]
    parent, _, name = adapter.blocks.rpartition(".")
    view.get_submodule(parent)._modules[name] = nn.ModuleList(list(adapter.block_list(model)))
    remove_blocks(view, adapter, range(blocks, total))  # a prefix: the kept blocks keep their indices
    return view


def _copy_module(module: nn.Module, old_config, new_config) -> nn.Module:
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    if getattr(module, "config", None) is old_config:
        twin.config = new_config
    return twin


def self_speculative(model: nn.Module, prompt: Tensor, new_tokens: int, blocks: int, k: int = 4) -> Decoded:
    """The model's `new_tokens` greedy tokens, drafted `k` at a time by its first `blocks` blocks."""
    return speculative(model, shallow_view(model, blocks), prompt, new_tokens, k)


@dataclass
class Exited(Decoded):
    exit_blocks: list[int] = field(default_factory=list)  # per decoded token (after the first): blocks run in full
    nll: list[float] = field(default_factory=list)  # teacher forcing: each fed token's negative log-likelihood


MEASURES = ("softmax", "saturation")


@dataclass
class _Exit:
    measure: str
    threshold: float
    exits: frozenset[int]
    head: Head  # the LM head with the family's final soft-capping, as the model's own logits have it
    norm: nn.Module
    active: bool = False  # decoding (the prompt runs through every block)
    state: Tensor | None = None  # the exited hidden state of the current token
    block: int | None = None


@contextlib.contextmanager
def _exiting(model: nn.Module, threshold: float, exits: Sequence[int], measure: str = "softmax") -> Iterator[_Exit]:
    from secateur.depth.structure import Removed
    from secateur.models import adapter_for

    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    if adapter.width is None or adapter.experts is not None:
        raise ConfigError(f"early exit skips a block's MLP, which the {adapter.family} adapter does not locate")
    if adapter.width.hidden is None:
        raise ConfigError(f"early exit reads the final norm, which the {adapter.family} adapter does not name")
    output = model.get_output_embeddings()
    head = Head(output.weight, output.bias, getattr(model.config, "final_logit_softcapping", None))
    run = _Exit(measure, threshold, frozenset(exits), head, model.get_submodule(adapter.width.hidden.final_norm))
    parent, _, slot = adapter.branches.of("mlp")[0].rpartition(".")
    skipped = Removed("mlp")  # adds nothing to the residual stream

    def forward_of(index: int, block: nn.Module):
        original = block.forward
        owner = block.get_submodule(parent) if parent else block
        mlp = owner._modules[slot]

        def forward(hidden_states, *args, **kwargs):
            if run.state is not None:  # exited: fill this block's cache from the exited state, skip its MLP
                owner._modules[slot] = skipped
                try:
                    original(run.state, *args, **kwargs)
                finally:
                    owner._modules[slot] = mlp
                return run.state
            out = original(hidden_states, *args, **kwargs)
            if run.active and index in run.exits and run.threshold < 1.0:  # 1: never (a cosine can round above)
                hidden = out[0] if isinstance(out, tuple) else out
                if run.measure == "saturation":
                    confidence = torch.cosine_similarity(hidden[0, -1].float(), hidden_states[0, -1].float(), dim=0)
                else:
                    confidence = run.head(run.norm(hidden[:, -1:])).float().softmax(-1).amax()
                if confidence.item() > run.threshold:
                    run.state, run.block = hidden, index + 1
            return out

        return forward

    for index, block in enumerate(blocks):
        block.forward = forward_of(index, block)
    try:
        yield run
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


@torch.inference_mode()
def early_exit(model: nn.Module, prompt: Tensor, new_tokens: int, threshold: float, exits: Sequence[int],
               forced: Sequence[int] | None = None, measure: str = "softmax") -> Exited:  # fmt: skip
    """`new_tokens` greedy tokens after `prompt` (1, length), each leaving the stack after the first
    block of `exits` (0-based) where the confidence `measure` exceeds `threshold`; a threshold of 1
    never exits (the model's greedy output). With `forced`, those tokens are fed instead of the
    model's choices (teacher forcing) and `nll` holds each one's negative log-likelihood."""
    from secateur.models import adapter_for

    total = len(adapter_for(model).block_list(model))
    if measure not in MEASURES:
        raise ConfigError(f"the exit confidence is one of {', '.join(MEASURES)}, got {measure!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"the exit threshold lies in 0..1, got {threshold}")
    if not exits or any(not 0 <= e < total - 1 for e in exits):
        raise ConfigError(f"exit blocks lie in 0..{total - 2} (after the last block there is nothing to skip), "
                          f"got {list(exits)}")
    if forced is not None:
        new_tokens = len(forced)
    start = time.perf_counter()
    with _exiting(model, threshold, exits, measure) as run:
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
        result = Exited([], 0.0, first_token_seconds=time.perf_counter() - start)
        while True:
            logits = out.logits[0, -1].float()
            token = int(logits.argmax()) if forced is None else int(forced[len(result.tokens)])
            if forced is not None:
                result.nll.append(float(-logits.log_softmax(-1)[token]))
            result.tokens.append(token)
            if len(result.tokens) >= new_tokens:
                break
            run.state, run.block, run.active = None, None, True
            out = model(input_ids=prompt.new_tensor([[token]]), **with_cache(model, cache))
            cache = cache_of(out)
            result.exit_blocks.append(run.block or total)
            result.target_calls += 1
        run.state = None
    result.seconds = time.perf_counter() - start
    return result

