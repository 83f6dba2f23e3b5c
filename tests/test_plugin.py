"""A stage kind is a plugin: a toy kind defined here, and nowhere else in the project, goes through
`secateur prune` (flag and TOML stage), the manifest, replay, `secateur.load`, `info`, `report` and the
order check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from conftest import make_kind
from transformers import AutoModelForCausalLM

import secateur
from secateur.cli import main
from secateur.recipe import KINDS, Structure, register
from secateur.schema import option


@dataclass(frozen=True)
class LastRowsConfig:
    """Zero the last `rows` output rows of every attention output projection."""

    name: ClassVar[str] = "lastrows"

    rows: int = option(1, "lastrows: how many of the last output rows of every o_proj to zero")

    @property
    def method_name(self) -> str:
        return self.name


def _run(model, config: LastRowsConfig, calibration, ctx) -> dict[str, Any]:
    zeroed = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("self_attn.o_proj"):
                rows = list(range(module.weight.shape[0] - config.rows, module.weight.shape[0]))
                module.weight[rows] = 0
                zeroed[name] = rows
    return {"zeroed": zeroed}


TOY = make_kind(
    "lastrows", LastRowsConfig, _run,
    summary=lambda record: f"lastrows: zeroed rows of {len(record['result']['zeroed'])} projections",
    describe=lambda result: f"last rows of {len(result.get('zeroed', {}))} o_proj",
    leaves_zeros=lambda settings: True,
)


@pytest.fixture
def toy_kind():
    register(TOY)
    yield TOY
    KINDS.pop(TOY.name)


def _o_proj_rows(model, rows):
    return [module.weight[-rows:] for name, module in model.named_modules() if name.endswith("self_attn.o_proj")]


def test_a_kind_defined_in_a_test_runs_everywhere(toy_kind, model_dir, text_file, tmp_path, capsys):
    source = model_dir("llama")
    out = tmp_path / "flagged"
    assert main(["prune", str(source), "--method", "lastrows", "--rows", "2", "--out", str(out)]) == 0
    assert "lastrows: zeroed rows of 2 projections" in capsys.readouterr().out
    manifest = json.loads((out / "secateur.json").read_text())
    record = manifest["history"][-1]
    assert record["kind"] == "lastrows" and record["settings"] == {"method": "lastrows", "rows": 2}
    assert record["result"]["zeroed"]["model.layers.0.self_attn.o_proj"] == [62, 63]
    model, _ = secateur.load(out)
    assert all(bool((rows == 0).all()) for rows in _o_proj_rows(model, 2))

    replay = tmp_path / "replayed"  # from the manifest's recipe
    assert main(["prune", str(source), "--recipe", str(out / "secateur.json"), "--out", str(replay)]) == 0
    again, _ = secateur.load(replay)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    recipe = tmp_path / "recipe.toml"  # a [[stage]] table, before a sparsity stage
    recipe.write_text('[[stage]]\nmethod = "lastrows"\nrows = 1\n\n[[stage]]\nmethod = "magnitude"\nsparsity = 0.25\n')
    staged = tmp_path / "staged"
    assert main(["prune", str(source), "--recipe", str(recipe), "--out", str(staged)]) == 0
    kinds = [h["kind"] for h in json.loads((staged / "secateur.json").read_text())["history"]]
    assert kinds == ["lastrows", "sparsity"]

    capsys.readouterr()
    assert main(["info", str(staged)]) == 0
    assert "stage 1: lastrows: zeroed rows of 2 projections" in capsys.readouterr().out
    assert main(["report", str(staged), "--out", str(tmp_path / "report")]) == 0
    assert "last rows of 2 o_proj; magnitude" in (tmp_path / "report" / "report.md").read_text()


def test_the_order_check_reads_the_kinds_properties(toy_kind, model_dir, text_file, tmp_path, capsys):
    """The toy leaves zeros, so depth compensation after it is refused, in one run and across runs."""
    source = model_dir("llama")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nmethod = "lastrows"\n\n[[stage]]\nmethod = "angular"\nremove_blocks = 1\n'
                      "compensate = true\n")  # fmt: skip
    assert main(["prune", str(source), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "fill the zeros" in capsys.readouterr().err and not (tmp_path / "o").exists()
    first = tmp_path / "first"
    assert main(["prune", str(source), "--method", "lastrows", "--out", str(first)]) == 0
    assert main(["prune", str(first), "--method", "angular", "--remove-blocks", "1", "--compensate", "--calib",
                 str(text_file), "--calib-samples", "2", "--calib-seq-len", "16", "--out", str(tmp_path / "o2")]) == 2
    assert "fill the zeros" in capsys.readouterr().err


def test_a_history_of_an_unknown_kind_is_shown_not_a_crash(toy_kind, model_dir, tmp_path, capsys):
    """An output made with a kind this secateur does not have: info and report still read it."""
    out = tmp_path / "out"
    assert main(["prune", str(model_dir("llama")), "--method", "lastrows", "--out", str(out)]) == 0
    KINDS.pop(TOY.name)
    try:
        capsys.readouterr()
        assert main(["info", str(out)]) == 0
        assert "stage 1: lastrows: {'method': 'lastrows', 'rows': 1}" in capsys.readouterr().out
        assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    finally:
        register(TOY)


# --- a kind that leaves a shape the stock config cannot express -------------------------------------


@dataclass(frozen=True)
class NoNormConfig:
    """Replace one block's input norm by the identity (stock code would build the norm again)."""

    name: ClassVar[str] = "nonorm"

    block: int = option(0, "nonorm: the block whose input norm goes")

    @property
    def method_name(self) -> str:
        return self.name


def _drop_norms(model, blocks) -> None:
    for index in blocks:
        model.model.layers[index].input_layernorm = nn.Identity()


def _dropped(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if isinstance(layer.input_layernorm, nn.Identity)]


NONORM = make_kind(
    "nonorm", NoNormConfig,
    lambda model, config, calibration, ctx: (_drop_norms(model, [config.block]), {"block": config.block})[1],
    structure=Structure(
        record=lambda model: {"dropped_norms": _dropped(model)},
        needed=lambda section: section.get("dropped_norms") or None,
        rebuild=_drop_norms,
        problem=lambda section: (None if all(isinstance(i, int) for i in section.get("dropped_norms", []))
                                 else "structure.dropped_norms is not a list of blocks"),
        show=lambda section: f"input norms dropped: {section['dropped_norms']}" if section.get("dropped_norms") else None,
    ),
)


@pytest.fixture
def nonorm_kind():
    register(NONORM)
    yield NONORM
    KINDS.pop(NONORM.name)


def test_a_kinds_structure_is_recorded_checked_and_rebuilt(nonorm_kind, model_dir, tmp_path, capsys):
    """The manifest records what the toy left, `secateur.load` rebuilds it over an empty model (stock
    `from_pretrained` builds the norm again and computes something else), `info` shows it, and a
    malformed record is refused in one line."""
    source = model_dir("llama")
    out = tmp_path / "out"
    assert main(["prune", str(source), "--method", "nonorm", "--block", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "secateur.json").read_text())
    assert manifest["structure"]["dropped_norms"] == [1]
    assert not any("input_layernorm" in k and ".1." in k for k in
                   json.loads((out / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
                       (out / "model.safetensors").read_bytes()[:8], "little")]))  # the norm's weight is not saved

    expected, _ = secateur.load(source)
    _drop_norms(expected, [1])
    loaded, _ = secateur.load(out)
    assert _dropped(loaded) == [1]
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
        stock = AutoModelForCausalLM.from_pretrained(out)
        assert not torch.allclose(stock(ids).logits, expected(ids).logits)

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "input norms dropped: [1]" in capsys.readouterr().out

    manifest["structure"]["dropped_norms"] = ["one"]
    (out / "secateur.json").write_text(json.dumps(manifest))
    assert main(["info", str(out)]) == 2
    assert "structure.dropped_norms is not a list of blocks" in capsys.readouterr().err
