"""What the user asks of the plan: a decode or prefill speedup in an engine, a parameter count, or a
file size, parsed from `--target metric=value` (each reads one number off a candidate's costs); or
`--target draft`: the fastest speculative draft of the model itself (plan/draft.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from secateur.errors import ConfigError

SPEED = ("decode-speedup", "prefill-speedup")
METRICS = (*SPEED, "params", "file")
DRAFT = "draft"
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}
_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Target:
    """`metric` at least (speedups) or at most (params, file bytes) `value`."""

    metric: str
    value: float

    @property
    def speed(self) -> bool:
        return self.metric in SPEED

    @property
    def draft(self) -> bool:
        return self.metric == DRAFT

    @property
    def timed(self) -> bool:
        """Timed in an engine: a speed target, or a draft (its cost per token)."""
        return self.speed or self.draft

    @property
    def speed_index(self) -> int:
        """Where a timed target reads a (decode, prefill) pair (a draft: its decode speed)."""
        return 0 if self.draft else SPEED.index(self.metric)

    def __str__(self) -> str:
        if self.draft:
            return DRAFT
        if self.metric == "params":
            return f"params<={self.value / 1e6:g}M" if self.value >= 1e5 else f"params<={self.value:g}"
        if self.metric == "file":
            return f"file<={self.value / 1e6:g}MB" if self.value >= 1e5 else f"file<={self.value:g}B"
        return f"{self.metric}>={self.value:g}"

    def met(self, achieved: float, margin: float = 0.0) -> bool:
        """Whether `achieved` (a speedup, a count, bytes) meets the target with a relative `margin`
        to spare (the cost model's error, so that the measured figure meets it too)."""
        if self.speed:
            return achieved >= self.value * (1 + margin)
        return achieved <= self.value * (1 - margin)


def parse_target(text: str) -> Target:
    """`decode-speedup=1.6`, `prefill-speedup=2`, `params=80M`, `file=200MB` (also KB, GB, KiB, MiB,
    GiB; a bare number counts units); `draft` (no value: the fastest draft)."""
    metric, sep, value = text.partition("=")
    metric = metric.strip().lower()
    if metric == DRAFT:
        if sep:
            raise ConfigError(f"--target {text!r}: the draft target takes no value (the plan looks for the fastest "
                              "draft); write --target draft")
        return Target(DRAFT, 0.0)
    if not sep or metric not in METRICS:
        raise ConfigError(f"--target {text!r}: write METRIC=VALUE with METRIC one of {', '.join(METRICS)} "
                          "(e.g. decode-speedup=1.6, params=80M, file=200MB), or draft")
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", value.lower())
    units = _BYTES if metric == "file" else _COUNT if metric == "params" else {"": 1, "x": 1}
    if match is None or match.group(2) not in units:
        raise ConfigError(f"--target {text!r}: the value must be a number{' with a unit: ' + ', '.join(u for u in units if u) if len(units) > 2 else ''}")
    number = float(match.group(1)) * units[match.group(2)]
    if metric in SPEED and number <= 1:
        raise ConfigError(f"--target {text!r}: a speedup above 1 (the dense model is 1)")
    if number <= 0:
        raise ConfigError(f"--target {text!r}: the value must be positive")
    return Target(metric, number)
