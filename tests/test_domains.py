"""Several text domains: the offline corpora, the training mixture (proportions, seeds, hold-outs),
evaluation on several sources, and recovery's validation per corpus."""

from __future__ import annotations

import importlib
import json
import math
import pickle
import random

import pytest
import torch
from conftest import WORDS, calibration_ids, tiny_model, tiny_tokenizer

import secateur
from secateur.cli import main
from secateur.config import CalibConfig
from secateur.data import DataError, tokenize
from secateur.data import mixture
from secateur.data.calibration import calibration_data, evaluation_data
from secateur.data.corpora import _Unpickler, post_body
from secateur.evaluate import evaluate_model, evaluate_sources, perplexity, split_sources
from secateur.train import TrainConfig, train

PARTS = 3
SEQ = 16


def test_shares_by_largest_remainder_hand_counted():
    assert mixture.shares(10, (0.4, 0.2, 0.2, 0.2)) == [4, 2, 2, 2]
    # 264 x (0.4, 0.2, 0.2, 0.2) = 105.6, 52.8, 52.8, 52.8: floors 105, 52, 52, 52 (261); the three
    # largest remainders (.8, .8, .8) take the three left
    assert mixture.shares(264, (0.4, 0.2, 0.2, 0.2)) == [105, 53, 53, 53]
    assert mixture.shares(3, (0.4, 0.2, 0.2, 0.2)) == [1, 1, 1, 0]  # ties of .6 go to the earlier parts
    assert mixture.shares(7, (0.5, 0.5)) == [4, 3]


def test_interleave_keeps_every_prefix_in_proportion():
    assert mixture.interleave([2, 1, 1]) == [0, 1, 2, 0]
    order = mixture.interleave([105, 53, 53, 53])
    assert [order.count(i) for i in range(4)] == [105, 53, 53, 53]
    for end in range(1, len(order) + 1):
        for part, count in enumerate([105, 53, 53, 53]):
            assert abs(order[:end].count(part) - count * end / 264) < 1.0 + 1e-9


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    """Three text files of disjoint words (a window's words say its file) and a mixture of them."""
    files = []
    for i in range(PARTS):
        words = WORDS[i * 40 : (i + 1) * 40]
        rng = random.Random(i)
        path = tmp_path / f"part{i}.txt"
        path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
        files.append(str(path))
    monkeypatch.setitem(mixture.MIXTURES, "test-mix", mixture.Mixture(
        ((files[0], 0.5), (files[1], 0.25), (files[2], 0.25)), "three files"))  # fmt: skip
    return files


def _part_of(window: torch.Tensor) -> int:
    [part] = {(int(t) - 4) // 40 for t in window}
    return part


def test_mixture_windows_proportions_seeds_and_holdouts(corpora):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    calib = CalibConfig(source="test-mix", samples=20, seq_len=SEQ, seed=3, holdout_windows=8, holdout_seq_len=SEQ)
    windows = calibration_data(model, tokenizer, calib)
    parts = [_part_of(w) for w in windows]
    assert [parts.count(i) for i in range(PARTS)] == [10, 5, 5]
    assert [f"{corpora[p]}" for p in parts] == mixture.labels("test-mix", 20)
    assert torch.equal(windows, calibration_data(model, tokenizer, calib))
    assert not torch.equal(windows, calibration_data(model, tokenizer, CalibConfig(**{**calib.__dict__, "seed": 4})))
    for i, path in enumerate(corpora):  # no window of any corpus overlaps that corpus's evaluation region
        held_out = evaluation_data(model, tokenizer, path, SEQ, 8).flatten().tolist()
        stream = tokenize(tokenizer, open(path).read()).tolist()
        for window in (w.tolist() for w, p in zip(windows, parts) if p == i):
            start = next(s for s in range(len(stream)) if stream[s : s + SEQ] == window)
            assert start >= len(held_out)
    # each corpus drew its share as it would alone, with the seed plus its place in the mixture
    alone = calibration_data(model, tokenizer, CalibConfig(source=corpora[1], samples=5, seq_len=SEQ, seed=4,
                                                           holdout_windows=8, holdout_seq_len=SEQ))  # fmt: skip
    assert torch.equal(windows[[p == 1 for p in parts]], alone)


def test_mixture_needs_room_in_every_corpus(corpora):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    calib = CalibConfig(source="test-mix", samples=400, seq_len=SEQ, holdout_windows=8, holdout_seq_len=SEQ)
    with pytest.raises(DataError, match="part0.txt: calibration needs 200 windows"):
        calibration_data(model, tokenizer, calib)
    with pytest.raises(DataError, match="is a mixture"):
        evaluation_data(model, tokenizer, "test-mix", SEQ, 2)


def test_evaluation_on_several_sources_equals_separate_runs(corpora):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    assert split_sources("test-mix") == corpora
    assert split_sources(f"{corpora[2]}, test-mix") == [corpora[2], corpora[0], corpora[1]]
    both = evaluate_sources(model, tokenizer, corpora[:2], SEQ, 4)
    alone = [evaluate_model(model, tokenizer, path, SEQ, 4) for path in corpora[:2]]
    for path, one in zip(corpora, alone):
        assert both["domains"][path]["perplexity"] == one["perplexity"]
    assert both["perplexity"] == pytest.approx(math.sqrt(alone[0]["perplexity"] * alone[1]["perplexity"]))
    assert evaluate_sources(model, tokenizer, corpora[:1], SEQ, 4)["perplexity"] == alone[0]["perplexity"]


def test_eval_cli_reports_each_source_and_the_mean(corpora, model_dir, capsys):
    assert main(["eval", str(model_dir("llama")), "--data", "test-mix", "--seq-len", str(SEQ), "--windows", "4",
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert list(result["domains"]) == corpora
    nll = sum(d["mean_nll"] for d in result["domains"].values()) / PARTS
    assert result["perplexity"] == pytest.approx(math.exp(nll))
    assert main(["eval", str(model_dir("llama")), "--data", f"{corpora[0]},missing.txt", "--windows", "2"]) == 2
    assert "unknown text source 'missing.txt'" in capsys.readouterr().err


def test_validation_per_corpus_equals_perplexity_on_each():
    model, teacher = tiny_model("llama"), tiny_model("llama")
    validation = calibration_ids(6, SEQ, seed=1)
    names = ["a", "b", "a", "c", "b", "a"]
    config = TrainConfig(tokens=16 * SEQ, train_seq_len=SEQ, micro_batch=4, val_windows=6, eval_every=1, lr=1e-4)
    record = train(model, config, calibration_ids(16, SEQ), validation, teacher=teacher, progress=False,
                   validation_domains=names).record  # fmt: skip
    last = next(v for v in record["validation"] if v["step"] == record["best"]["step"])  # the weights left
    assert list(last["domains"]) == ["a", "b", "c"]
    for name, value in last["domains"].items():
        rows = [i for i, n in enumerate(names) if n == name]
        assert value == pytest.approx(perplexity(model, validation[rows])["perplexity"], rel=1e-6)
    assert last["perplexity"] == pytest.approx(perplexity(model, validation)["perplexity"], rel=1e-6)
    with pytest.raises(Exception, match="3 domain names for 6 validation windows"):
        train(model, config, calibration_ids(16, SEQ), validation, teacher=teacher, progress=False,
              validation_domains=names[:3])  # fmt: skip


def test_cli_train_on_a_mixture_records_validation_per_corpus(corpora, model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["train", str(model_dir("llama")), "--out", str(out), "--calib", "test-mix", "--tokens", str(8 * SEQ),
                 "--train-seq-len", str(SEQ), "--val-windows", "4", "--eval-seq-len", str(SEQ),
                 "--check-windows", "2"]) == 0  # fmt: skip
    record = json.loads((out / "secateur.json").read_text())["history"][-1]
    assert record["calibration"]["calib"] == "test-mix"
    # 12 windows: shares 6, 3, 3; the last four (validation) in interleaved order
    assert set(record["result"]["validation"][-1]["domains"]) == set(mixture.labels("test-mix", 12)[8:])
    lines = [json.loads(line) for line in (out / record["result"]["metrics"]).read_text().splitlines()]
    assert any("val_domains" in line for line in lines)
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0  # a column per corpus
    markdown = (tmp_path / "report" / "report.md").read_text()
    last = record["result"]["validation"][-1]
    head = next(line for line in markdown.splitlines() if line.startswith("| step | tokens | validation perplexity |"))
    assert all(name in head for name in last["domains"])
    assert all(f"{value:.3f}" in markdown for value in last["domains"].values())


def test_newsgroup_headers_are_dropped_and_the_pickle_reader_is_narrow():
    post = "From: a@b\nSubject: hi\nLines: 2\n\nThe body.\n\n> quoted\n"
    assert post_body(post) == "The body.\n\n> quoted"
    assert post_body("no header at all") == "no header at all"
    evil = pickle.dumps(print)  # names builtins.print: refused, never called
    with pytest.raises(pickle.UnpicklingError, match="not read"):
        _Unpickler(__import__("io").BytesIO(evil)).load()


def test_a_run_evaluates_on_several_sources_and_the_report_compares_on_them(corpora, model_dir, tmp_path, capsys):
    dense, out = model_dir("llama"), tmp_path / "out"
    assert main(["prune", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--eval",
                 f"{corpora[0]},{corpora[2]}", "--eval-seq-len", str(SEQ), "--eval-windows", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    evaluation = json.loads((out / "secateur.json").read_text())["evaluation"]
    assert list(evaluation["domains"]) == [corpora[0], corpora[2]] and evaluation["source"] == f"{corpora[0]},{corpora[2]}"
    model, tokenizer = secateur.load(out)
    for path in (corpora[0], corpora[2]):
        alone = evaluate_model(model, tokenizer, path, SEQ, 2)["perplexity"]
        assert evaluation["domains"][path]["perplexity"] == pytest.approx(alone, rel=1e-6)
        assert any(f"perplexity {alone:.3f}," in line and f"({path}," in line for line in printed.splitlines())
    assert "mean over 2 domains" in printed
    assert main(["report", str(dense), str(out), "--out", str(tmp_path / "report")]) == 0
    original, tokenizer = secateur.load(dense)
    expected = evaluate_sources(original, tokenizer, [corpora[0], corpora[2]], SEQ, 2)["perplexity"]
    assert f"{expected:.2f}*" in (tmp_path / "report" / "report.md").read_text()
    assert main(["prune", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "o2"),
                 "--eval", f"{corpora[0]},nope.txt"]) == 2  # fmt: skip
    assert "unknown text source 'nope.txt'" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_no_training_batch_holds_an_evaluation_or_validation_window(corpora, model_dir, tmp_path, monkeypatch):
    """Every window a recovery step trains on, as the loss sees it, lies after its corpus's evaluation
    region (64 windows of --eval-seq-len) and is none of the validation windows."""
    loop = importlib.import_module("secateur.train.loop")

    seen = []

    def recording(out, ids, *args, **kwargs):
        seen.extend(ids.tolist())
        return step_loss(out, ids, *args, **kwargs)

    step_loss = loop.step_loss
    monkeypatch.setattr(loop, "step_loss", recording)
    out = tmp_path / "out"
    assert main(["train", str(model_dir("llama")), "--out", str(out), "--calib", "test-mix", "--tokens", str(16 * SEQ),
                 "--train-seq-len", str(SEQ), "--val-windows", "4", "--eval-seq-len", str(SEQ),
                 "--check-windows", "0"]) == 0  # fmt: skip
    assert len(seen) == 16
    tokenizer = tiny_tokenizer()
    streams = [tokenize(tokenizer, open(path).read()).tolist() for path in corpora]
    calib = CalibConfig(source="test-mix", samples=20, seq_len=SEQ, holdout_windows=64, holdout_seq_len=SEQ)
    validation = calibration_data(tiny_model("llama"), tokenizer, calib)[16:].tolist()
    for window in seen:
        stream = streams[_part_of(torch.tensor(window))]
        start = next(s for s in range(len(stream)) if stream[s : s + SEQ] == window)
        assert start >= 64 * SEQ and window not in validation
