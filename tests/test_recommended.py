"""The README's recommended recipe of each kind runs on every supported family (with the family's
variant where one differs, recorded with the reason), and its output saves, reloads and runs."""

import pytest
import torch
from conftest import FAMILIES, calibration_ids, tiny_model, tiny_tokenizer

import secateur
from secateur.manifest import build_manifest
from secateur.settings import plan_stage, RunOptions
from secateur.recipe import build_stage

RECOMMENDED = {  # the README's flags, as recipe keys
    "sparsity-50": {"method": "sparsegpt", "sparsity": 0.5, "steps": 4, "refine": "reconstruct"},
    "sparsity-2:4": {"method": "sparsegpt", "pattern": "2:4", "permute": True, "refine": "reconstruct"},
    "width": {"method": "width", "remove_fraction": 0.3},
    "depth": {"method": "angular", "remove_fraction": 0.5},  # compensated where the family allows it
}


@pytest.mark.parametrize("recipe", list(RECOMMENDED))
@pytest.mark.parametrize("family", FAMILIES)
def test_recommended_recipe_runs_on_every_family(family, recipe, tmp_path):
    model = tiny_model(family)
    stage = build_stage(RECOMMENDED[recipe])
    report = secateur.prune(model, stage, calibration_ids())
    result = report.stages[0]["result"]
    if recipe == "width":  # the family's variant, and why, where it differs from the default
        assert (result["variant"] is None) == (result["bias_compensation"] and result["heads"] == "kv-groups")
    if recipe == "depth":  # compensated on every family: the MLP output projection, or the norm after it
        assert result["compensated"] and report.stages[0]["settings"]["compensate"] and result["variant"] is None
    manifest = build_manifest("unused", model, [plan_stage(stage)], report.stages, RunOptions(), "cpu", {"source": {}})
    secateur.save(model, tiny_tokenizer(), tmp_path / "out", manifest)
    reloaded, _ = secateur.load(tmp_path / "out")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
