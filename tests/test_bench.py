"""`secateur bench`: the timing protocol runs on any saved model and refuses bad paths."""

from __future__ import annotations

from secateur.bench import file_bytes, measure, table
from secateur.cli import main


def test_measure_reports_sizes_and_speed(model_dir):
    path = model_dir("llama")
    result = measure(path, prompt=8, new_tokens=4, repeats=2)
    assert result.parameters > 0 and result.file_bytes == file_bytes(path) > 0
    assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0
    assert result.peak_memory_bytes > 0
    assert "decode tok/s" in table([result, result])


def test_bench_refuses_a_missing_model(tmp_path, model_dir, capsys):
    assert main(["bench", str(model_dir("llama")), str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
