"""`secateur bench`: the timing protocol runs on any saved model and refuses bad paths."""

from __future__ import annotations

import statistics

from secateur.bench import SpeedResult, bench, file_bytes, measure, table
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


def _result(prefill: list[float], decode: list[float], repeats: int) -> SpeedResult:
    return SpeedResult(model="m", device="cpu", threads=1, parameters=1, file_bytes=1, prompt=8, new_tokens=4,
                       prefill_seconds=0.0, decode_tokens_per_second=0.0, peak_memory_bytes=1, repeats=repeats,
                       rounds=len(prefill) // repeats, prefill_runs=prefill, decode_runs=decode)  # fmt: skip


def test_speedup_is_the_median_of_per_round_ratios():
    # round medians: base prefill 1, 2, 4 and decode 10, 5, 2.5 (the machine slows down);
    # the model is exactly twice as fast in every round, although its pooled medians are not
    # twice the base's pooled medians: the per-round pairing removes the drift.
    base = _result([1, 1, 2, 2, 4, 4], [10, 10, 5, 5, 2.5, 2.5], repeats=2)
    fast = _result([0.5, 0.5, 1, 1, 2, 2], [20, 20, 10, 10, 5, 5], repeats=2)
    assert fast.per_round(fast.prefill_runs) == [0.5, 1, 2]
    assert fast.speedup(base) == (2.0, 2.0)
    # with an outlier round, the median over rounds ignores it where a mean would not
    odd = _result([0.5, 0.5, 1, 1, 0.4, 0.4], [20, 20, 10, 10, 25, 25], repeats=2)
    assert odd.speedup(base) == (2.0, 2.0)


def test_bench_pools_rounds_per_model(model_dir):
    path = model_dir("llama")
    seen = []
    results = bench([path, path], rounds=2, repeats=2, prompt=8, new_tokens=4,
                    progress=lambda r, i, _: seen.append((r, i)))  # fmt: skip
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]  # the models in turn, round after round
    for r in results:
        assert r.rounds == 2 and len(r.prefill_runs) == len(r.decode_runs) == 4
        assert r.decode_tokens_per_second == statistics.median(r.decode_runs)
    assert "decode tok/s" in table(results)


def test_bench_refuses_zero_rounds(model_dir, capsys):
    assert main(["bench", str(model_dir("llama")), "--rounds", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
