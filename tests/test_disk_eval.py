"""Perplexity of a model larger than memory (`secateur eval --offload disk`): the windows' hidden
states carried through one block at a time, read from the safetensors, then the model's own final
norm and head; the same figure as the model loaded, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES, calibration_ids, tiny_model, tiny_tokenizer
from test_disk_depth import cli, deep
from test_disk_experts import deep_moe
from transformers import AutoModelForCausalLM

from secateur.calibrate.disk import DiskBlocks
from secateur.evaluate import perplexity
from secateur.offload import perplexity_on_disk

SMALL = ["--windows", "4", "--seq-len", "32"]


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_moe", "mixtral"])
def test_perplexity_on_disk_equals_the_loaded_model_bit_for_bit(tmp_path, family, monkeypatch):
    """Every family (GPT-NeoX's head is stored as embed_out, tied heads are not stored), and only the
    block in work and the next one hold weights at a time."""
    path = deep_moe(tmp_path, family, blocks=3) if family in MOE_FAMILIES else deep(tmp_path, family, blocks=3)
    windows = calibration_ids(6, 32)
    loaded = perplexity(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), windows)
    seen, enter = [], DiskBlocks.enter

    def watch(self, index, device):
        block = enter(self, index, device)
        seen.append([i for i, b in enumerate(self.adapter.block_list(self.model))
                     if any(not p.is_meta for p in b.parameters())])  # fmt: skip
        return block

    monkeypatch.setattr(DiskBlocks, "enter", watch)
    store = DiskBlocks.open(path, torch.float32)
    try:
        streamed = perplexity_on_disk(store, windows)
    finally:
        store.close()
    assert streamed["mean_nll"] == loaded["mean_nll"] and streamed["predicted_tokens"] == loaded["predicted_tokens"]
    assert seen == [[0], [1], [2]] and streamed["offload"] == "disk"


@pytest.fixture
def deep_llama(tmp_path):
    path = tmp_path / "deep"
    tiny_model("llama", num_hidden_layers=4).save_pretrained(path), tiny_tokenizer().save_pretrained(path)
    return path


def test_eval_offload_disk_on_the_command_line_equals_the_loaded_run_on_every_domain(deep_llama, text_file, tmp_path,
                                                                                    capsys):  # fmt: skip
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))
    args = ["eval", deep_llama, "--data", f"{text_file},{other}", *SMALL, "--json"]
    code, loaded, err = cli([*args, "--offload", "none"], capsys)
    assert code == 0, err
    code, streamed, err = cli([*args, "--offload", "disk"], capsys)
    assert code == 0, err
    loaded, streamed = json.loads(loaded), json.loads(streamed)
    assert streamed["mean_nll"] == loaded["mean_nll"] and len(streamed["domains"]) == 2
    for name, domain in loaded["domains"].items():
        assert streamed["domains"][name]["mean_nll"] == domain["mean_nll"]
        assert streamed["domains"][name]["bits_per_byte"] == domain["bits_per_byte"]


def test_eval_offload_auto_streams_when_the_weights_do_not_fit_and_says_so(deep_llama, text_file, capsys, monkeypatch):
    import secateur.offload as offload

    args = ["eval", deep_llama, "--data", text_file, *SMALL, "--json"]
    code, fits, err = cli(args, capsys)
    assert code == 0 and "from disk" not in err and "offload" not in json.loads(fits)
    monkeypatch.setattr(offload, "available_memory", lambda: 1000)
    code, streamed, err = cli(args, capsys)
    assert code == 0, err
    assert "reading the blocks from disk one at a time" in err and json.loads(streamed)["offload"] == "disk"
    assert json.loads(streamed)["mean_nll"] == json.loads(fits)["mean_nll"]


@pytest.mark.parametrize("extra, message", [
    (["--generate"], "--offload applies only with perplexity without --filter-layer"),
    (["--filter-layer", "1"], "--offload applies only with perplexity without --filter-layer"),
])  # fmt: skip
def test_eval_offload_that_does_not_apply_is_refused(deep_llama, text_file, capsys, extra, message):
    code, _, err = cli(["eval", deep_llama, *extra, "--offload", "disk"], capsys)
    assert code == 2 and message in err


def test_eval_offload_disk_of_a_model_without_safetensors_is_refused(deep_llama, text_file, tmp_path, capsys):
    (deep_llama / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    code, _, err = cli(["eval", deep_llama, "--data", text_file, *SMALL, "--offload", "disk"], capsys)
    assert code == 2 and "--offload disk:" in err and err.count("error") == 1


def test_a_streamed_prune_with_eval_records_the_in_memory_evaluation(deep_llama, text_file, tmp_path, capsys):
    """`--eval` of a run streamed from disk: the output's blocks read once more, the same record as the
    run in memory (perplexity on every domain, bit for bit)."""
    from test_disk_depth import both_ways

    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))
    args = ["prune", deep_llama, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", text_file,
            "--calib-samples", "6", "--calib-seq-len", "16", "--eval", f"{text_file},{other}", "--eval-windows", "4",
            "--eval-seq-len", "32", "--check-windows", "0"]  # fmt: skip
    memory, disk, _ = both_ways(args, tmp_path, capsys)
    assert disk["evaluation"]["mean_nll"] == memory["evaluation"]["mean_nll"]
    assert {name: d["mean_nll"] for name, d in disk["evaluation"]["domains"].items()} == \
        {name: d["mean_nll"] for name, d in memory["evaluation"]["domains"].items()}  # fmt: skip
    assert [d["offload"] for d in disk["evaluation"]["domains"].values()] == ["disk", "disk"]
