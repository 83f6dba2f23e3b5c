"""`secateur report`: the page holds every section, its figures exist, its numbers are the inputs'."""

from __future__ import annotations

import json

import secateur
from secateur.cli import main
from secateur.evaluate import evaluate_model
from secateur.report import pareto


def test_pareto_front_by_hand():
    points = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 3.5), (5, 1)]
    assert pareto(points) == [0, 1, 3]  # (3, 4) loses to (2, 3); (2, 3.5) too; (5, 1) to (4, 1)


def test_report_has_every_section_and_the_inputs_numbers(model_dir, text_file, tmp_path, capsys):
    dense = model_dir("llama")
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--out", str(pruned),
                 "--eval", str(text_file), "--eval-seq-len", "32", "--eval-windows", "2"]) == 0
    narrow = tmp_path / "narrow"
    assert main(["prune", str(dense), "--method", "angular", "--remove-blocks", "1", "--calib", str(text_file),
                 "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(narrow), "--eval", str(text_file),
                 "--eval-seq-len", "32", "--eval-windows", "2"]) == 0
    perplexity = json.loads((pruned / "secateur.json").read_text())["evaluation"]["perplexity"]
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"model": str(pruned), "tasks": {"probe": {"metrics": {"acc": 0.625}}}}))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [{"model": str(pruned), "decode_tokens_per_second": 41.5,
                                              "prefill_seconds": 0.123, "file_bytes": 2_000_000}]}))
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps({"model": str(pruned), "samples": [{"prompt": "Say hi", "reference": "hi there",
                                                                       "model": "hi hi"}]}))
    out = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", str(dense), str(pruned), str(narrow), "--out", str(out), "--tasks-results", str(tasks),
                 "--bench", str(bench), "--samples", str(samples)]) == 0
    page = (out / "index.html").read_text()
    markdown = (out / "report.md").read_text()
    for section in ("id='summary'", "id='removed'", "id='samples'"):
        assert section in page
    for text in (page, markdown):
        assert f"{perplexity:.2f}" in text and "0.625" in text and "41.5" in text and "123" in text
        assert "hi there" in text and "hi hi" in text and "blocks [" in text  # the removed block is named
    images = [line.split('src="')[1].split('"')[0] for line in page.split("<img")[1:]]
    assert {"blocks.png", "pareto.png", "sparsity-1.png"} == set(images)  # a heat map where there are zeros
    assert all((out / png).stat().st_size > 1000 for png in images)
    # each stage's section, as its kind writes it; the heat map sits under the sparsity section
    assert "### Stage 1: Sparsity (magnitude 0.5 unstructured)" in markdown
    assert markdown.index("Stage 1: Sparsity") < markdown.index("sparsity-1.png") < markdown.index("Stage 1: Depth")
    assert "| step | removed | score | parameters |" in markdown and "No secateur stages" in markdown
    # the original's perplexity, measured on the windows the others were evaluated on
    model, tokenizer = secateur.load(dense)
    expected = evaluate_model(model, tokenizer, str(text_file), 32, 2)["perplexity"]
    dense_row = next(line for line in markdown.splitlines() if line.startswith(f"| {dense.name} |"))
    assert f"| {expected:.2f}* |" in dense_row and "* measured by `secateur report`" in markdown
    assert main(["report", str(dense), "--out", str(out)]) == 2 and "already exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2
    assert not (tmp_path / "r2").exists()


def test_report_measures_speed_when_asked(model_dir, tmp_path, capsys):
    dense = model_dir("llama")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": []}))
    assert main(["report", str(dense), "--out", str(tmp_path / "r0"), "--bench", str(bench), "--measure-speed"]) == 2
    assert "--measure-speed applies only with no --bench file" in capsys.readouterr().err
    out = tmp_path / "r"
    assert main(["report", str(dense), "--out", str(out), "--measure-speed"]) == 0
    markdown = (out / "report.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {dense.name} |")).split(" | ")
    assert float(row[-3]) > 0 and float(row[-2]) > 0  # decode tok/s, prefill ms
    assert "speed measured by `secateur report`" in markdown
