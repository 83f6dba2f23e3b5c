"""`secateur bench`: the timing protocol runs on any saved model and refuses bad paths."""

from __future__ import annotations

import json
import statistics

import pytest

from secateur.bench import SpeedResult, bench, file_bytes, measure, table
from secateur.cli import main
from secateur.errors import ConfigError


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


# --- the llama.cpp engine (a stand-in llama-bench: tests never need llama.cpp) ----------------------

FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
p, n, r = int(args["-p"]), int(args["-n"]), int(args["-r"])
tests = [{"n_prompt": p, "n_gen": 0, "avg_ts": 1000.0, "samples_ts": [1000.0, 800.0, 1250.0][:r]},
         {"n_prompt": 0, "n_gen": n, "avg_ts": 40.0, "samples_ts": [40.0, 50.0, 30.0][:r]}]
print(json.dumps([t for t in tests if t["n_prompt"] or t["n_gen"]]))  # like llama-bench: a length of 0 is no test
"""


def _fake_llamacpp(tmp_path):
    binary = tmp_path / "bin" / "llama-bench"
    binary.parent.mkdir()
    binary.write_text(FAKE_LLAMA_BENCH)
    binary.chmod(0o755)
    return binary.parent


def _gguf(tmp_path, model_dir):
    from secateur.export import export_gguf
    from test_export import bpe_tokenizer

    from secateur.io import load, save

    model, _ = load(model_dir("llama"))
    save(model, bpe_tokenizer(), tmp_path / "m", {})
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", kind="f32")
    return tmp_path / "m.gguf", sum(p.numel() for p in model.parameters())


def test_llamacpp_engine_reads_llama_bench_per_repetition(tmp_path, model_dir, capsys):
    from secateur.bench import measure_llamacpp

    bin_dir = _fake_llamacpp(tmp_path)
    path, parameters = _gguf(tmp_path, model_dir)
    result = measure_llamacpp(path, binary=bin_dir / "llama-bench", prompt=512, new_tokens=128, repeats=3, threads=2)
    assert result.prefill_runs == [512 / 1000.0, 512 / 800.0, 512 / 1250.0]
    assert result.prefill_seconds == 512 / 1000.0 and result.decode_tokens_per_second == 40.0
    assert result.parameters == parameters  # the tied LM head counted once, as in the HF model
    assert result.peak_memory_bytes > 1e6  # the child's own peak (a Python process)
    assert main(["bench", str(path), str(path), "--engine", "llama.cpp", "--llama-cpp", str(bin_dir),
                 "--rounds", "2", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp" in out and "| 40.0 | 1.00 | 1.00 |" in out


def test_llamacpp_engine_times_one_metric_when_asked(tmp_path, model_dir):
    """A decode-only run (the planner's checks of a decode target) skips llama-bench's prefill test."""
    import math

    from secateur.bench import measure_llamacpp
    from secateur.plan.costs import LlamaCppEngine

    bin_dir = _fake_llamacpp(tmp_path)
    path, _ = _gguf(tmp_path, model_dir)
    result = measure_llamacpp(path, binary=bin_dir / "llama-bench", prompt=0, new_tokens=128, repeats=3)
    assert result.prefill_runs == [] and math.isnan(result.prefill_seconds) and result.decode_runs == [40.0, 50.0, 30.0]
    engine = LlamaCppEngine(bin_dir / "llama-bench", None, repeats=3)
    decode_only, prefill_only = engine.run(path, "decode"), engine.run(path, "prefill")
    assert decode_only.decode == 1 / 50.0 and math.isnan(decode_only.prefill)
    assert prefill_only.prefill == 512 / 1250.0 and math.isnan(prefill_only.decode)
    assert engine.run(path) == type(decode_only)(1 / 50.0, 512 / 1250.0)


def test_llamacpp_engine_refusals(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.delenv("SECATEUR_LLAMA_CPP", raising=False)
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))  # no build of `secateur llama-cpp` either
    monkeypatch.setenv("PATH", str(tmp_path))
    bin_dir = _fake_llamacpp(tmp_path)
    path, _ = _gguf(tmp_path, model_dir)
    assert main(["bench", str(path), "--engine", "llama.cpp"]) == 2
    assert "llama-bench not found on PATH: run `secateur llama-cpp` once" in capsys.readouterr().err
    assert main(["bench", str(model_dir("llama")), "--engine", "llama.cpp", "--llama-cpp", str(bin_dir)]) == 2
    assert "secateur export" in capsys.readouterr().err
    assert main(["bench", str(path), "--engine", "llama.cpp", "--llama-cpp", str(bin_dir), "--dtype", "float16"]) == 2
    assert "--dtype applies only with --engine hf" in capsys.readouterr().err
    assert main(["bench", str(model_dir("llama")), "--threads", "2"]) == 2
    assert "--threads applies only with --engine llama.cpp" in capsys.readouterr().err
    monkeypatch.undo()  # PATH back (the stand-in needs python3 on it)
    monkeypatch.setenv("SECATEUR_LLAMA_CPP", str(bin_dir))
    assert main(["bench", str(path), "--engine", "llama.cpp", "--rounds", "1", "--repeats", "1"]) == 0


def test_the_build_of_secateur_llama_cpp_is_found_and_not_rebuilt(tmp_path, monkeypatch, capsys):
    from secateur.bench import llama_bench_binary
    from secateur.export import llamacpp

    monkeypatch.delenv("SECATEUR_LLAMA_CPP", raising=False)
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="secateur llama-cpp"):
        llama_bench_binary(None)
    where = llamacpp.bin_dir()
    where.mkdir(parents=True)
    for name in ("llama-bench", "llama-perplexity", "libllama.so"):  # a build from before the decoding tools
        (where / name).write_text("")
    assert llama_bench_binary(None) == where / "llama-bench"
    assert llamacpp.built() is None  # `secateur llama-cpp` completes it
    for name in llamacpp.TOOLS:
        (where / name).write_text("")
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a complete build"))
    assert main(["llama-cpp"]) == 0 and str(where) in capsys.readouterr().out


FAKE_COMPLETION = """#!/usr/bin/env python3
import sys
args = sys.argv[1:]
prompt = args[args.index("-p") + 1]
print(prompt + " one two three four")
print("common_perf_print: prompt eval time = 10.00 ms / 8 tokens (1.25 ms per token, 800.00 tokens per second)",
      file=sys.stderr)
print("common_perf_print:        eval time = 40.00 ms / 3 runs (13.3 ms per token, 75.00 tokens per second)",
      file=sys.stderr)
"""

FAKE_SPECULATIVE = """#!/usr/bin/env python3
import os, sys
args = sys.argv[1:]
prompt = args[args.index("-p") + 1]
assert args[args.index("--spec-type") + 1] == "draft-simple" and args[args.index("--spec-draft-n-max") + 1] == "2"
tail = " one two FIVE" if os.environ.get("FAKE_DIFFER") else " one two three four five"
print(prompt + tail)
print("I encoded    8 tokens in    0.010 seconds, speed:  800.000 t/s", file=sys.stderr)
print("I decoded    6 tokens in    0.040 seconds, speed:  150.000 t/s", file=sys.stderr)
print("I n_draft   = 2", file=sys.stderr)
print("I n_drafted = 4", file=sys.stderr)
print("I n_accept  = 3", file=sys.stderr)
"""


def test_llamacpp_draft_runs_llama_cpp_s_own_speculative_decoding(tmp_path, model_dir, text_file, capsys, monkeypatch):
    path, _ = _gguf(tmp_path, model_dir)
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, script in (("llama-completion", FAKE_COMPLETION), ("llama-speculative-simple", FAKE_SPECULATIVE)):
        (tools / name).write_text(script)
        (tools / name).chmod(0o755)
    args = ["bench", str(path), "--draft", str(path), "--engine", "llama.cpp", "--llama-cpp", str(tools), "--prompt",
            "8", "--new-tokens", "4", "--draft-tokens", "2", "--repeats", "2", "--prompt-text", str(text_file)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert result["plain_tokens_per_second"] == 75.0 and result["speculative_tokens_per_second"] == 150.0
    assert result["speedup"] == 2.0 and result["acceptance"] == 0.75
    assert result["tokens_per_round"] == 3.0  # 6 new tokens over 4 / 2 verifications
    assert result["identical"]  # the speculative loop ran past the plain one's end: a prefix
    monkeypatch.setenv("FAKE_DIFFER", "1")
    assert main(args) == 1
    assert "DIFFERS" in capsys.readouterr().out
    assert main([*args[:3], str(text_file), *args[4:]]) == 2
    assert "times .gguf files, the model and its draft" in capsys.readouterr().err
    assert main(["bench", str(path), "--draft", str(path), "--engine", "llama.cpp", "--llama-cpp",
                 str(tmp_path / "none")]) == 2  # fmt: skip
    assert "llama-completion not found" in capsys.readouterr().err
