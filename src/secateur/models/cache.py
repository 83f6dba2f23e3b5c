"""The KV cache under whichever name the installed transformers gives it: `cache` from 5.x releases
that renamed it (the old `past_key_values` still works there, with a deprecation warning per call
site, and goes in 5.40), `past_key_values` before."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.cache
def _name(model_type: type) -> str:
    parameters = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword arguments that hand `cache` to `model`'s forward (with `use_cache=True`)."""
    return {_name(type(model)): cache, "use_cache": True}


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
