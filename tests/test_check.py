"""The loud check after every stage: the held-out perplexity of each stage's output against the
input's; a stage that leaves it above --check-ratio times the input's is said on the console and in
the manifest, never silent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import make_kind

from secateur.cli import main
from secateur.recipe import KINDS, register
from secateur.schema import option

HELD_OUT = ["--eval-windows", "2", "--eval-seq-len", "16"]


@dataclass(frozen=True)
class SpoilConfig:
    """Multiply the final norm's weight: the logits grow sharp and wrong (a deliberately broken stage)."""

    name: ClassVar[str] = "spoil"

    factor: float = option(50.0, "spoil: what the final norm's weight is multiplied by")

    @property
    def method_name(self) -> str:
        return self.name


def _spoil(model, config, calibration, ctx):
    with torch.no_grad():
        model.model.norm.weight.mul_(config.factor)
    return {"factor": config.factor}


SPOIL = make_kind("spoil", SpoilConfig, _spoil)


@pytest.fixture
def spoil_kind():
    register(SPOIL)
    yield SPOIL
    KINDS.pop(SPOIL.name)


def test_a_broken_stage_is_said_and_recorded(spoil_kind, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(model_dir("llama")), "--method", "spoil", "--eval", str(text_file), *HELD_OUT,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out check: perplexity" in printed and "WARNING: above 3x the input's perplexity" in printed
    check = json.loads((out / "secateur.json").read_text())["history"][-1]["check"]
    assert check["flagged"] and check["ratio"] > 3 and check["windows"] == 2 and check["seq_len"] == 16
    assert check["output"] == pytest.approx(check["ratio"] * check["input"])


def test_a_harmless_stage_passes_and_the_check_can_be_off(spoil_kind, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(model_dir("llama")), "--method", "spoil", "--factor", "1.0", "--eval", str(text_file),
                 *HELD_OUT, "--out", str(out)]) == 0
    assert "WARNING" not in capsys.readouterr().out
    check = json.loads((out / "secateur.json").read_text())["history"][-1]["check"]
    assert not check["flagged"] and check["ratio"] == pytest.approx(1.0)
    off = tmp_path / "off"
    assert main(["prune", str(model_dir("llama")), "--method", "spoil", "--eval", str(text_file), *HELD_OUT,
                 "--check-windows", "0", "--out", str(off)]) == 0
    assert "check" not in json.loads((off / "secateur.json").read_text())["history"][-1]
    assert "held-out check" not in capsys.readouterr().out


def test_every_stage_is_checked_against_the_input(model_dir, text_file, tmp_path):
    """Two stages on calibration text: each record compares its output with the run's input and with
    the stage's own input (the previous stage's output)."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nmethod = "magnitude"\nsparsity = 0.3\n\n[[stage]]\nmethod = "wanda"\nsparsity = 0.5\n'
                      f'calib = "{text_file}"\ncalib_samples = 2\ncalib_seq_len = 16\n')
    out = tmp_path / "out"
    assert main(["prune", str(model_dir("llama")), "--recipe", str(recipe), *HELD_OUT, "--out", str(out)]) == 0
    first, second = (h["check"] for h in json.loads((out / "secateur.json").read_text())["history"])
    assert first["input"] == second["input"] and second["stage_input"] == first["output"]
