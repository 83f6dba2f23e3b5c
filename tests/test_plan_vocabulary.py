"""secateur plan's vocabulary axis: candidates that keep fewer tokens (the vocabulary stage, last),
their exact parameter counts, their score by hand (KL plus the cross-entropy the vocabulary adds on
the re-tokenized text), a whole plan whose recipe runs, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from secateur.cli import main
from secateur.errors import ConfigError
from secateur.io import load
from secateur.plan.costs import ArchShape, Timing
from secateur.plan.proxy import Proxy
from secateur.plan.space import Candidate, candidates, parse_vocabulary
from secateur.vocabulary import VocabularyConfig, choose_vocabulary
from test_plan import refuses
from test_vocabulary import CORPUS, byte_level_tokenizer, model_for, windows_of


def test_a_vocabulary_candidate_is_keyed_named_and_pruned_last():
    c = Candidate(1, 0.25, vocabulary=400)
    assert c.key == "d1-w0.25-h0-v400" and c.kind == "depth + width + vocabulary"
    assert Candidate(0, 0.0, vocabulary=400).kind == "vocabulary"
    assert Candidate(1, 0.25).key == "d1-w0.25-h0"  # keys of plans without the axis are unchanged (their caches)
    stages = c.stages({"calib": "text.txt", "calib_samples": 8})
    assert [s["method"] for s in stages] == ["angular", "width", "vocabulary"]
    assert stages[-1] == {"method": "vocabulary", "keep_tokens": 400, "calib": "text.txt", "calib_samples": 8}
    assert c.stage == Candidate(0, 0.25)  # the width stage's shape does not depend on the vocabulary
    grid = candidates((0, 1), (0.0,), (0.0,), vocabularies=parse_vocabulary("500,400", 600))
    assert sorted(g.key for g in grid) == ["d0-w0-h0-v400", "d0-w0-h0-v500", "d1-w0-h0", "d1-w0-h0-v400",
                                           "d1-w0-h0-v500"]  # fmt: skip
    assert parse_vocabulary("", 600) == (0,)
    for text, message in (("abc", "give token counts"), ("600", "fewer than the model's 600"), ("0", "more than 0")):
        with pytest.raises(ConfigError, match=message):
            parse_vocabulary(text, 600)


@pytest.fixture(scope="module")
def bpe_model():
    tokenizer = byte_level_tokenizer()
    return model_for(tokenizer), tokenizer


def test_a_text_that_keeps_its_tokens_scores_the_probability_the_removed_ones_gave_back(bpe_model):
    """Every token of the windows is kept, so the re-tokenized text is the same ids (renumbered) and
    the cross-entropy changes at each position by log(sum of the kept tokens' probabilities): by hand
    from the dense logits, it is the whole score of the dense model with that vocabulary."""
    model, tokenizer = bpe_model
    windows = windows_of(tokenizer, CORPUS)[:3]
    kept, pruned, _ = choose_vocabulary(model, tokenizer, VocabularyConfig(coverage=1.0), windows)
    assert len(kept) < model.config.vocab_size and set(windows.flatten().tolist()) <= set(kept)
    proxy = Proxy(model, windows, windows, torch.device("cpu"), tokenizer=tokenizer, bos=None,
                  vocabularies={len(kept): (kept, pruned)})  # fmt: skip
    scores = proxy.measure(copy.deepcopy(model), range(3), len(kept))
    for window, score in zip(windows, scores):
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0, :-1].double()
        by_hand = float((logits[:, kept].logsumexp(-1) - logits.logsumexp(-1)).mean())
        assert by_hand < 0 and score["vocabulary"] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
        assert score["kl"] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)  # the dense model's own KL is 0
    # a vocabulary that splits the text's tokens costs more than it gives back
    small, pruned_small, _ = choose_vocabulary(model, tokenizer, VocabularyConfig(keep_tokens=300), windows)
    proxy.vocabularies[300] = (small, pruned_small)
    split = proxy.measure(copy.deepcopy(model), range(3), 300)
    assert all(s["vocabulary"] > 0 for s in split)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-vocabulary")
    tokenizer = byte_level_tokenizer()
    model_for(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text(CORPUS * 3)
    return root / "model", root / "text.txt"


def _flags(text: Path, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4",
            "--eval-windows", "4", "--eval-seq-len", "32", "--depth", "0", "--width", "0,0.25", "--hidden", "0",
            "--vocabulary-samples", "8", "--vocabulary-seq-len", "64", *extra]  # fmt: skip


def test_a_plan_with_the_vocabulary_axis_counts_exactly_and_its_recipe_runs(bpe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = bpe_dir
    dense = sum(p.numel() for p in load(model)[0].parameters())
    target = dense - 2 * 150 * 64  # 150 rows of the embedding and of the (untied) LM head: 450 tokens, or width
    assert main(["plan", str(model), "--target", f"params={target}", "--exhaustive",
                 *_flags(text, tmp_path / "plan", "--vocabulary", "300,450")]) == 0  # fmt: skip
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    rows = {r["key"]: r for r in record["candidates"]}
    assert {"d0-w0-h0-v300", "d0-w0-h0-v450", "d0-w0.25-h0-v450", "d0-w0.25-h0"} <= rows.keys()
    assert rows["d0-w0-h0-v450"]["params"] == target and rows["d0-w0-h0-v450"]["feasible"]
    assert all(rows[k]["kl"] is not None for k in rows)  # --exhaustive: every candidate scored
    chosen = record["chosen"]
    assert "front.md" in {p.name for p in (tmp_path / "plan").iterdir()}
    assert "re-tokenized" in (tmp_path / "plan" / "front.md").read_text()
    recipe = (tmp_path / "plan" / "plan.toml").read_text()
    out = tmp_path / "pruned"
    assert main(["prune", str(model), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(out),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    pruned, pruned_tokenizer = load(out)
    assert sum(p.numel() for p in pruned.parameters()) == chosen["params"] <= target
    assert not rows["d0-w0.25-h0"]["feasible"] and chosen["vocabulary"]  # only a smaller vocabulary meets it
    assert 'method = "vocabulary"' in recipe and len(pruned_tokenizer) == chosen["vocabulary"]
    manifest = json.loads((out / "secateur.json").read_text())
    assert [h["kind"] for h in manifest["history"]] == [s["method"].replace("angular", "depth") for s in record["stages"]]
    assert manifest["history"][-1]["result"]["tokens_after"] == chosen["vocabulary"]


@pytest.mark.parametrize("target, extra, message", [
    ("draft", ("--vocabulary", "400"), "--vocabulary applies only with a params=, file= or speed target"),
    ("params=10k", ("--vocabulary", "many"), "give token counts to keep"),
    ("params=10k", ("--vocabulary", "5000"), "fewer than the model's 600"),
    ("params=10k", ("--vocabulary", "20"), "is fewer than the"),
])  # fmt: skip
def test_bad_vocabulary_plans_fail_with_one_line_and_write_nothing(bpe_dir, tmp_path, monkeypatch, capsys, target,
                                                                  extra, message):  # fmt: skip
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = bpe_dir
    refuses(["plan", str(model), "--target", target, *_flags(text, tmp_path / "plan"), *extra], capsys,
            tmp_path / "plan", message)  # fmt: skip
    assert not (tmp_path / "cache").exists()


def test_counting_options_need_the_axis_and_a_word_level_tokenizer_is_refused(model_dir, text_file, tmp_path,
                                                                             monkeypatch, capsys):  # fmt: skip
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model = model_dir("llama")
    base = ["plan", str(model), "--target", "params=10k", "--out", str(tmp_path / "plan"), "--calib", str(text_file)]
    assert main([*base, "--vocabulary-samples", "8"]) == 2
    assert "--vocabulary-samples applies only with --vocabulary" in capsys.readouterr().err
    assert main([*base, "--vocabulary", "100"]) == 2
    assert "rewrites BPE tokenizers only" in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_families_with_per_layer_attention_types_are_counted_at_every_depth(family):
    """Gemma 3 and Qwen3 configs list an attention type per layer: the planner grows one-block copies
    back to any depth (this used to fail before any work on Gemma 3)."""
    from conftest import CONFIGS
    from secateur.plan.costs import parameter_count, with_layers
    from secateur.plan.planner import stage_counts

    base = CONFIGS[family]()
    base.num_hidden_layers, base.layer_types = 4, [base.layer_types[0]] * 3 + ["full_attention"]
    counts = stage_counts(with_layers(base, 1))
    for layers in (1, 3, 6):
        grown = with_layers(with_layers(base, 1), layers)
        assert len(grown.layer_types) == layers and counts(layers) == parameter_count(grown)
    assert with_layers(base, 2).layer_types == base.layer_types[:2]


def _law(shape: ArchShape) -> Timing:
    """A fake engine whose decoding reads every weight once a token, the LM head's like the blocks'."""
    head = shape.hidden * (shape.vocab or 600)
    weights = shape.layers * (shape.attention_params + shape.mlp_params) + head
    return Timing(decode=1e-8 * weights, prefill=1e-3 + 3e-7 * shape.layers * 1e3)


def test_a_speed_plan_predicts_the_head_a_vocabulary_drops_and_times_the_winner(bpe_dir, tmp_path, monkeypatch):
    from secateur.io import load_config
    from secateur.plan import PlanConfig, plan
    from secateur.plan.costs import TableEngine, shape_of, with_layers
    from secateur.plan.planner import block_shapes, with_tokens
    from secateur.schema import fill

    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    model, text = bpe_dir
    base = load_config(model)
    table = {}
    for cfg in block_shapes(base, [Candidate(0, w, 0.0, 8) for w in (0.0, 0.25)]).values():
        for layers in (1, 2):
            for tokens in (0, 300, 450):
                shape = shape_of(with_tokens(with_layers(cfg, layers), tokens), tokens)
                table[shape] = _law(shape)
    engine = TableEngine(table, vocab=base.vocab_size)
    settings = {"target": "decode-speedup=1.2", "calib": str(text), "calib_seq_len": 32, "calib_samples": 4,
                "eval_windows": 4, "eval_seq_len": 32, "depth": "0", "width": "0,0.25", "hidden": "0",
                "engine": "hf", "margin": 0.02, "round_to": 8, "vocabulary": "300,450", "vocabulary_samples": 8,
                "vocabulary_seq_len": 64, "exhaustive": True}  # fmt: skip
    record = plan(model, fill(PlanConfig, settings), tmp_path / "plan", engine=engine, progress=False)
    dense = _law(shape_of(base))
    rows = {r["key"]: r for r in record["candidates"]}
    for key in ("d0-w0-h0-v300", "d0-w0-h0-v450", "d0-w0.25-h0-v300"):  # predicted from the blocks-only fit less
        truth = dense.decode / _law(shape_of_row(rows[key])).decode  # the head at dense seconds per weight
        assert rows[key]["decode_speedup"] == pytest.approx(truth, rel=0.03)
    assert not rows["d0-w0.25-h0"]["feasible"] and not rows["d0-w0-h0-v300"]["feasible"]  # 1.17x and 1.18x alone
    chosen = record["chosen"]
    assert chosen["measured"] and chosen["vocabulary"] and chosen["decode_speedup"] >= 1.2 * 1.02
    assert any(s.vocab for s in engine.calls)  # the winner's own shape, vocabulary included, was timed
    assert main(["prune", str(model), "--recipe", str(tmp_path / "plan" / "plan.toml"), "--out", str(tmp_path / "p"),
                 "--calib", str(text), "--calib-seq-len", "32", "--calib-samples", "4", "--eval-windows", "4",
                 "--eval-seq-len", "32"]) == 0  # fmt: skip
    pruned, _ = load(tmp_path / "p")
    assert shape_of(pruned.config, pruned.config.vocab_size) == shape_of_row(chosen)


def shape_of_row(row: dict) -> ArchShape:
    return ArchShape(**row["shape"])


def test_the_shapes_of_a_family_with_attention_types_keep_the_models_pattern():
    from conftest import CONFIGS
    from secateur.plan.costs import with_layers
    from secateur.plan.planner import block_shapes

    base = CONFIGS["gemma3_text"]()
    base.num_hidden_layers, base.layer_types = 6, ["sliding_attention"] * 5 + ["full_attention"]
    for config in block_shapes(base, [Candidate(0, 0.0), Candidate(0, 0.25, round_to=8)]).values():
        assert with_layers(config, 6).layer_types == base.layer_types  # timed as the model runs, not all local
        assert with_layers(config, 4).layer_types == base.layer_types[:4]
