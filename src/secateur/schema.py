"""One schema for CLI flags, recipe keys and manifest fields, read from the typed config dataclasses.

A dataclass field is an *option* when its metadata has `help` (use `option(...)`). Its key is the
field name, or `key` when the flat name differs (`RefineConfig.steps` is the key `refine`); its type
annotation gives the check and the choices, its default the documented default. A flag is the key
with dashes (`--calib-samples`); a recipe key is the key with dashes or underscores; a manifest
records the keys a config flattens to, so it can be fed back as a recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union, get_args, get_origin

from secateur.errors import ConfigError


class NotFinite(ConfigError):
    """A float option given NaN or an infinity."""


REQUIRED = dataclasses.MISSING  # an option without a default: the config cannot be built without it


@dataclass(frozen=True)
class Requires:
    """The variant of its config an option belongs to: `holds(config)` says whether the built config
    selects it, `what` names it in messages (`--dsnot-cycles applies only with --refine dsnot`)."""

    holds: Callable[[Any], bool]
    what: str


def option(default: Any, help: str, *, key: str | None = None, parse: Callable[[Any], Any] | None = None,
           flatten: Callable[[Any], Any] | None = None, choices: Callable[[], tuple[str, ...]] | None = None,
           requires: Requires | None = None) -> Any:
    """A dataclass field that is also a flag and a recipe key.

    `parse` turns a flag or recipe value into the field's value (after the type check is skipped),
    `flatten` the field's value back into a recipe value; `choices` lists allowed strings of a
    registry (evaluated when flags are built, so registrations made later count); `requires` names
    the variant the option belongs to: set for another variant, it is refused, and a manifest leaves
    it out."""
    metadata = {"help": help, "key": key, "parse": parse, "flatten": flatten, "choices": choices, "requires": requires}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    key: str  # flat name: recipe key, flag without the dashes
    type: Any  # the annotation: bool, int, float, str, Literal[...], tuple[str, ...], X | None
    help: str
    default: Any
    field: str = ""  # the dataclass field it fills ("" for options built by hand)
    parse: Callable[[Any], Any] | None = None
    flatten: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] | None = None
    requires: Requires | None = None

    def check(self, value: Any) -> Any:
        """The value as the field holds it; a wrong type or choice is a ConfigError naming the key."""
        if self.parse is not None:
            return self.parse(value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{flag(self.key)} must be one of {', '.join(self.choices)}, got {value!r}")
        return coerce(self.type, value, self.key)


def flag(key: str) -> str:
    """How messages name a key: as its flag (recipe keys take the same spelling)."""
    return "--" + key.replace("_", "-")


def options_of(config_type: type) -> dict[str, Option]:
    """The options a config dataclass declares, by key."""
    hints = typing.get_type_hints(config_type)
    options = {}
    for field in dataclasses.fields(config_type):
        meta = field.metadata
        if "help" not in meta:
            continue
        key = meta["key"] or field.name
        choices = meta["choices"]() if meta["choices"] else None
        default = None if field.default is REQUIRED else field.default
        options[key] = Option(key, hints[field.name], meta["help"], default, field.name, meta["parse"],
                              meta["flatten"], choices, meta.get("requires"))  # fmt: skip
    return options


def fill(config_type: type, settings: dict[str, Any], **fixed: Any) -> Any:
    """An instance of `config_type` from the settings its options name (others are left alone). A
    config whose options belong to variants refuses them in its `__post_init__` (`refuse_inapplicable`)."""
    values = {o.field: o.check(settings[k]) for k, o in options_of(config_type).items() if settings.get(k) is not None}
    return config_type(**values, **fixed)


def from_flags(config_type: type, flags: dict[str, Any]) -> Any:
    """A config from parsed flags (None: not given); a flag of a variant the config does not select is
    refused even at its default value."""
    config = fill(config_type, flags)
    check_applies(config, [k for k, v in flags.items() if v is not None])
    return config


def refuse_inapplicable(config: Any) -> None:
    """For a config's `__post_init__`: an option of a variant it does not select, set to another value
    than its default, is refused (built from Python as from flags)."""
    check_applies(config, [k for k, o in options_of(type(config)).items() if getattr(config, o.field) != o.default])


def check_finite_options(config: Any) -> None:
    """Every float option of a config (and the configs inside it) is finite: NaN passes every range
    check (`nan < 0` is False) and prunes or trains to garbage."""
    for part in nested(config):
        for key, opt in options_of(type(part)).items():
            value = getattr(part, opt.field)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{flag(key)} must be a finite number, got {value!r}")


def nested(config: Any) -> list[Any]:
    """A config and the option-bearing configs inside it (a sparsity stage's method, allocation, refine)."""
    found = [config]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and options_of(type(value)):
            found += nested(value)
    return found


def check_applies(config: Any, keys: Any) -> None:
    """Refuse any of `keys` that belongs to a variant `config` (or a config inside it) does not select."""
    keys = set(keys)
    for part in nested(config):
        for key, opt in options_of(type(part)).items():
            if key in keys and opt.requires is not None and not opt.requires.holds(part):
                raise ConfigError(f"{flag(key)} applies only with {opt.requires.what}; drop it or select that variant")


def flatten(config: Any) -> dict[str, Any]:
    """The recipe keys of a config's options, with plain (TOML / JSON) values; options of a variant
    the config does not select are left out."""
    out = {}
    for key, option in options_of(type(config)).items():
        if option.requires is not None and not option.requires.holds(config):
            continue
        value = getattr(config, option.field)
        if option.flatten is not None:
            value = option.flatten(value)
        elif isinstance(value, tuple):
            value = list(value)
        if value is not None:
            out[key] = value
    return out


# --- type checks -----------------------------------------------------------------------------------

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {describe(args[0])}s"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`: no string for a bool, no 1.7 for an integer."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, key)
            except NotFinite:
                raise
            except ConfigError:
                pass
    elif origin is Literal:
        if value in args:
            return value
    elif origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            flat = [p.strip() for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
            return tuple(coerce(args[0], item, key) for item in flat if item != "")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise NotFinite(f"{flag(key)} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"option {key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{flag(key)} must be {describe(tp)}, got {value!r} ({type(value).__name__})")


def cli_type(option: Option) -> tuple[Callable[[str], Any] | None, dict[str, Any]]:
    """(argparse `type`, extra keyword arguments) for an option's flag."""
    tp = option.type
    base = next((a for a in get_args(tp) if a is not type(None)), tp) if get_origin(tp) in (Union, types.UnionType) else tp
    if option.parse is not None:
        return str, {}
    if option.choices is not None:
        return str, {"choices": list(option.choices)}
    if base is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if get_origin(base) is tuple:
        return str, {"action": "append"}
    if get_origin(base) is Literal:
        return str, {"choices": list(get_args(base))}
    if base in (int, float, str):
        return base, {}
    raise TypeError(f"option {option.key}: no flag for {tp!r}")
