"""Per-block shapes for stock transformers: a small module saved beside the weights.

A stock config holds one width per kind and one expert count, so a model whose blocks differ
(adaptive width allocation, global expert allocation) cannot be built by stock code from its config
alone. The pruned model records, in its config, every layer whose shape differs from what stock code
builds (`secateur_layers`: kind, out, in, bias), every other tensor of another shape
(`secateur_tensors`: shape and whether it is a parameter, e.g. a router's weight or fused experts),
and every integer module attribute that differs (`secateur_attributes`, e.g. an MLP's
`intermediate_size`, an experts module's `num_experts`), and points `auto_map` at
`modeling_secateur.py`, saved with the weights. That module subclasses the stock
model class and replaces those layers after the stock `__init__`, so

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

builds the pruned shapes and loads the weights; the module needs transformers and torch only.
"""

from __future__ import annotations

from torch import nn

MODULE = "modeling_secateur"
_SIZE_ATTRIBUTES = {"in_features", "out_features", "nf", "nx"}  # carried by the replaced layers themselves

_SOURCE = '''"""Written by secateur: the stock {base} with per-block layer shapes read from the config
(`secateur_layers`, `secateur_tensors`, `secateur_attributes`). Load with
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)."""

import torch
from torch import nn
from transformers import {base} as _Stock
from transformers.pytorch_utils import Conv1D


class {name}(_Stock):
    def __init__(self, config):
        super().__init__(config)
        for path, (kind, out_features, in_features, bias) in config.secateur_layers.items():
            parent, _, child = path.rpartition(".")
            if kind == "conv1d":
                layer = Conv1D(out_features, in_features)
            else:
                layer = nn.Linear(in_features, out_features, bias=bias)
            setattr(self.get_submodule(parent), child, layer)
        for path, (shape, parameter) in getattr(config, "secateur_tensors", {{}}).items():
            parent, _, name = path.rpartition(".")
            module = self.get_submodule(parent)
            old = getattr(module, name)
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if parameter:
                setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(name, new, persistent=name not in module._non_persistent_buffers_set)
        for path, value in config.secateur_attributes.items():
            module, _, attribute = path.rpartition(".")
            setattr(self.get_submodule(module), attribute, value)
'''


def _layer_record(layer: nn.Module) -> list | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):
        return ["conv1d", layer.nf, layer.weight.shape[0], True]
    if isinstance(layer, nn.Linear):
        return ["linear", layer.out_features, layer.in_features, layer.bias is not None]
    return None


def declare_reshaped(model: nn.Module) -> bool:
    """Record in `model.config` what stock code must change to build this model, and point `auto_map`
    at the saved module. Returns False (and records nothing) when a module differs in more than
    shape (a removed sublayer, another class): `secateur.load` still rebuilds those."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    _forget(model.config)  # a stale declaration (the input was itself such an output) never survives
    with init_empty_weights(include_buffers=False):
        stock = AutoModelForCausalLM.from_config(model.config)
    stock_modules = dict(stock.named_modules())
    layers, tensors, attributes = {}, {}, {}
    for path, module in model.named_modules():
        reference = stock_modules.pop(path, None)
        if reference is None or type(reference) is not type(module):
            return False
        record = _layer_record(module)
        if record is not None and record != _layer_record(reference):
            layers[path] = record
        elif record is None:
            changed = _tensor_records(module, reference)
            if changed is None:
                return False
            tensors.update({f"{path}.{name}": shape for name, shape in changed.items()})
        for attribute, value in vars(module).items():
            if (isinstance(value, int) and not isinstance(value, bool) and not attribute.startswith("_")
                    and attribute not in _SIZE_ATTRIBUTES and getattr(reference, attribute, None) != value):  # fmt: skip
                attributes[f"{path}.{attribute}"] = value
    if stock_modules or not (layers or tensors or attributes):  # modules gone, or nothing for stock code to change
        return False
    model.config.secateur_layers = layers
    model.config.secateur_tensors = tensors
    model.config.secateur_attributes = attributes
    model.config.auto_map = {"AutoModelForCausalLM": f"{MODULE}.{_subclass_name(_stock_class(model))}"}
    return True


def _tensor_records(module: nn.Module, reference: nn.Module) -> dict[str, list] | None:
    """A module's own tensors whose shape differs from the stock module's: {name: [shape, is a
    parameter]}; None when they differ in more than shape (a tensor added or gone)."""
    own = {**{n: (t, False) for n, t in module._buffers.items()}, **{n: (t, True) for n, t in module._parameters.items()}}
    stock = {**{n: (t, False) for n, t in reference._buffers.items()},
             **{n: (t, True) for n, t in reference._parameters.items()}}  # fmt: skip
    if own.keys() != stock.keys():
        return None
    changed = {}
    for name, (tensor, parameter) in own.items():
        theirs = stock[name][0]
        if (tensor is None) != (theirs is None) or parameter != stock[name][1]:
            return None
        if tensor is not None and tuple(tensor.shape) != tuple(theirs.shape):
            changed[name] = [list(tensor.shape), parameter]
    return changed


def _stock_class(model: nn.Module) -> type:
    """The transformers class the model is (or, loaded through this module, derives from)."""
    return next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))


def _subclass_name(stock: type) -> str:
    return f"Secateur{stock.__name__}"


def _forget(config) -> None:
    for key in ("secateur_layers", "secateur_tensors", "secateur_attributes", "auto_map"):
        if hasattr(config, key) and (key != "auto_map" or _declared(config)):
            delattr(config, key)


def _declared(config) -> bool:
    return (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM", "").startswith(f"{MODULE}.")


def save_files(model: nn.Module) -> dict[str, str]:
    """The files saved beside the weights of a model with per-block shapes (called before the config is
    written, which `prepare_module` completes)."""
    source = prepare_module(model)
    return {f"{MODULE}.py": source} if source else {}


def prepare_module(model: nn.Module) -> str | None:
    """Before saving: re-derive the declaration of a model whose config declares one (later pruning
    cannot leave it stale) and return the text of `modeling_secateur.py`, or None when there is none.
    A model loaded through the module becomes an instance of the stock class again (the subclass adds
    nothing but its `__init__`), so transformers neither copies the old module nor writes the
    subclass into `architectures`."""
    stock = model.__class__ = _stock_class(model)
    if not _declared(model.config) or not declare_reshaped(model):
        return None
    return _SOURCE.format(base=stock.__name__, name=_subclass_name(stock))
