"""The vocabulary stage from disk to disk: the same weights, tokenizer and generation files as the stage
in memory (both BPE styles, tied and untied heads), one block resident at a time, a recipe that
calibrates a later streamed stage on the new ids, and a kill followed by --resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateur.calibrate.disk import DiskBlocks
from test_disk_depth import both_ways, cli, interrupted, resumed, same
from test_vocabulary import CORPUS, TOKENIZERS, model_for

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _model(tmp_path, style: str, tied: bool):
    tokenizer = TOKENIZERS[style]()
    model = model_for(tokenizer)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # a list, renumbered too
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS * 3)
    return path, text


def _args(path, text, *extra):
    return ["prune", path, "--method", "vocabulary", "--keep-tokens", "400", "--calib", text, "--calib-samples", "8",
            "--calib-seq-len", "64", "--eval-windows", "4", "--eval-seq-len", "32", *extra]  # fmt: skip


@pytest.mark.parametrize("style", list(TOKENIZERS))
@pytest.mark.parametrize("tied", [False, True])
def test_a_streamed_vocabulary_equals_the_in_memory_stage(tmp_path, capsys, style, tied):
    path, text = _model(tmp_path, style, tied)
    memory, disk, _ = both_ways(_args(path, text), tmp_path, capsys)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "memory" / name).read_text() == (tmp_path / "disk" / name).read_text(), name
    assert disk["history"][-1]["result"] == memory["history"][-1]["result"]
    assert disk["structure"] == memory["structure"] and disk["offload"] == "disk"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path / "disk"), AutoTokenizer.from_pretrained(tmp_path / "disk")
    assert model.config.vocab_size == len(tokenizer) == 400
    assert model.config.tie_word_embeddings == tied and model.generation_config.eos_token_id == [
        tokenizer.eos_token_id, tokenizer.pad_token_id]  # fmt: skip
    ids = tokenizer(CORPUS[:300], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # it runs, on the ids its own tokenizer gives
        assert torch.isfinite(model(ids).logits).all()


def test_a_streamed_recipe_calibrates_its_later_stage_on_the_new_ids(tmp_path, capsys):
    path, text = _model(tmp_path, "byte-level", False)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nmethod = "vocabulary"\nkeep_tokens = 400\n\n[[stage]]\nmethod = "wanda"\n'
                      'sparsity = 0.5\n')  # fmt: skip
    args = ["prune", path, "--recipe", recipe, "--calib", text, "--calib-samples", "8", "--calib-seq-len", "64",
            "--eval-windows", "4", "--eval-seq-len", "32"]  # fmt: skip
    memory, disk, _ = both_ways(args, tmp_path, capsys)
    assert [h["kind"] for h in disk["history"]] == ["vocabulary", "sparsity"]
    assert disk["history"][-1]["calibration"]["tokens"] == memory["history"][-1]["calibration"]["tokens"]
    assert (tmp_path / "disk" / "tokenizer.json").read_text() == (tmp_path / "memory" / "tokenizer.json").read_text()


def test_the_blocks_are_copied_not_run_and_a_killed_run_resumes(tmp_path, capsys, monkeypatch):
    path, text = _model(tmp_path, "byte-fallback", False)
    args = _args(path, text, "--offload", "disk")
    entered = []
    monkeypatch.setattr(DiskBlocks, "enter", lambda self, i, d: entered.append(i))
    code, _, err = cli([*args, "--out", tmp_path / "full"], capsys)
    assert code == 0 and entered == [], err  # no block is run: each is copied as it is
    monkeypatch.undo()
    original = DiskBlocks.write_blocks

    def killed(self, order, patches=None):  # the first block copied, then the run is killed
        original(self, order[:1], patches)
        raise KeyboardInterrupt

    interrupted(args, tmp_path / "out", capsys, monkeypatch, "write_blocks", killed)
    resumed(args, tmp_path / "out", capsys, monkeypatch)
    same(tmp_path / "full", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "secateur.json").read_text())
    assert manifest["history"][-1]["result"]["tokens_after"] == 400


def test_a_head_stored_under_another_name_is_cut_too(tmp_path, capsys):
    """GPT-NeoX stores its untied head as embed_out (transformers names it lm_head on load): the
    streamed stage cuts its rows under the stored name, as save_pretrained writes them."""
    from transformers import GPTNeoXConfig

    tokenizer = TOKENIZERS[next(iter(TOKENIZERS))]()
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    path = tmp_path / "model"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS * 3)
    memory, disk, _ = both_ways(_args(path, text, "--eval", text), tmp_path, capsys)
    assert disk["structure"] == memory["structure"]
    for key in ("mean_nll", "changed_tokens", "bits_per_byte"):  # --eval: the output read from disk once more
        assert disk["evaluation"][key] == memory["evaluation"][key], key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
    assert model.get_output_embeddings().weight.shape[0] == model.config.vocab_size == 400
