"""The CLI: a full prune -> info -> eval round trip, recipes, and bad inputs that write nothing."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, FalconConfig, FalconForCausalLM

from secateur.cli import main

PRUNE_SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "4", "--eval-seq-len", "32"]


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_info_eval_round_trip(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run(
        ["prune", model_dir("llama"), "--method", "sparsegpt", "--pattern", "2:4", "--calib", text_file,
         "--out", out, "--eval", text_file, *PRUNE_SMALL],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "sparsity 0.5000" in stdout and "perplexity" in stdout
    manifest = json.loads((out / "secateur.json").read_text())
    [stage] = manifest["recipe"]["stage"]
    assert stage["method"] == "sparsegpt" and stage["pattern"] == "2:4" and stage["calib_samples"] == 4
    [record] = manifest["history"]
    assert record["calibration"]["calib_samples"] == 4 and record["calibration"]["seed"] == 0
    assert len(manifest["source"]["sha256"]) == 64 and manifest["origin"] == manifest["source"]
    assert manifest["evaluation"]["windows"] == 4 and manifest["evaluation"]["perplexity"] > 1
    assert all(layer["sparsity"] == 0.5 for layer in record["result"]["layers"])
    assert manifest["structure"]["target_sparsity"] == pytest.approx(0.5)
    assert {"load", "prune"} <= set(manifest["timings"])
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".pruned.partial-*"))

    code, stdout, _ = run(["info", out, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and abs(info["target_sparsity"] - 0.5) < 1e-6
    assert info["manifest"]["recipe"]["stage"][0]["pattern"] == "2:4"
    code, stdout, _ = run(["info", out], capsys)
    assert "q_proj" in stdout and "0.5000" in stdout

    code, stdout, _ = run(["eval", out, "--data", text_file, "--seq-len", "32", "--windows", "4", "--json"], capsys)
    result = json.loads(stdout)
    assert code == 0 and result["perplexity"] == pytest.approx(manifest["evaluation"]["perplexity"], rel=1e-5)
    assert result["predicted_tokens"] == 4 * 31 and "protocol" in result


def sparsity_of(out):
    return json.loads((out / "secateur.json").read_text())["history"][-1]["result"]["sparsity"]


def test_recipe_mirrors_flags_and_flags_win(model_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'method = "wanda"\nsparsity = 0.6\ncalib = "{text_file}"\ncalib-samples = 4\ncalib_seq_len = 32\n'
                      'eval_windows = 4\neval_seq_len = 32\n')  # fmt: skip
    code, _, err = run(["prune", model_dir("llama"), "--recipe", recipe, "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert sparsity_of(tmp_path / "a") == pytest.approx(0.6, abs=1e-3)
    code, _, err = run(["prune", model_dir("llama"), "--recipe", recipe, "--sparsity", "0.25", "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert sparsity_of(tmp_path / "b") == pytest.approx(0.25, abs=1e-3)


def test_overwrite_replaces_atomically(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", model_dir("llama"), "--method", "magnitude", "--sparsity", "0.3", "--out", out]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert run([*args[:-2], "--sparsity", "0.4", "--out", out, "--overwrite"], capsys)[0] == 0
    assert sparsity_of(out) == pytest.approx(0.4, abs=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture
def falcon_dir(tmp_path):
    path = tmp_path / "falcon"
    config = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    FalconForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sparsity", "1.0"], "[0, 1)"),
        (["--sparsity", "-0.2"], "[0, 1)"),
        (["--pattern", "4:4"], "N must be < M"),
        (["--pattern", "2-4"], "N:M"),
        (["--sparsity", "0.5", "--pattern", "2:4"], "not both"),
        (["--method", "magnitude", "--block-size", "64"], "--block-size belongs to sparsity (sparsegpt)"),
        (["--calib-samples", "100000"], "calibration needs"),
        (["--calib", "no-such-source"], "unknown text source"),
        (["--pattern", "2:4", "--allocation", "owl"], "N:M pattern is the same"),
        (["--sparsity", "0.5", "--permute"], "--permute"),
        (["--allocation", "adaptive"], "allocation must be one of"),
        (["--method", "width", "--remove-fraction", "0.2", "--ignore", "*.mlp.*"], "--ignore belongs to sparsity"),
        (["--refine", "retrain"], "unknown refinement"),
        (["--module-sparsity", "attention=0.99", "--sparsity", "0.2", "--eval-windows", "2", "--calib-samples", "2"],
         "keep it in"),
        (["--method", "width", "--remove-fraction", "0.2", "--refine", "dsnot"], "not to width"),
        (["--method", "block-influence", "--remove-blocks", "1", "--owl-m", "3"], "not to block-influence"),
        (["--method", "angular", "--remove-blocks", "1", "--sparsity", "0.5"], "--sparsity belongs to sparsity"),
    ],
)
def test_bad_settings_fail_clearly_and_write_nothing(extra, message, model_dir, text_file, tmp_path, capsys):
    args = ["prune", model_dir("llama"), "--out", tmp_path / "out", "--calib", text_file, "--calib-seq-len", "32", *extra]
    code, _, err = run(args, capsys)
    assert code == 2 and message in err
    assert not list(tmp_path.iterdir())


def test_bad_model_paths_fail_clearly(tmp_path, falcon_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_text("x")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "no config.json"),
        (tmp_path / "file.bin", "not a .gguf"),
        (falcon_dir, "unsupported architecture 'falcon'; secateur supports: deepseek_v3, gemma3_text, gpt2"),
    ]
    for path, message in cases:
        code, _, err = run(["prune", path, "--method", "magnitude", "--out", tmp_path / "out"], capsys)
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()


def test_text_too_short_for_the_windows(model_dir, text_file, capsys):
    code, _, err = run(["eval", model_dir("llama"), "--data", text_file, "--seq-len", "64", "--windows", "1000"], capsys)
    assert code == 2 and "the text has" in err and "--windows" in err


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "secateur.cli", "eval", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_input_model_is_never_modified(model_dir, text_file, tmp_path, capsys):
    from secateur.io import content_hash

    source = model_dir("gpt2")
    before = content_hash(source)
    code, _, err = run(["prune", source, "--method", "wanda", "--calib", text_file, "--out", tmp_path / "o", *PRUNE_SMALL], capsys)
    assert code == 0, err
    assert content_hash(source) == before
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert float((reloaded.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.5)
    assert torch.isfinite(reloaded.lm_head.weight).all()


def test_owl_refined_prune_records_allocation_and_collapse_check(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "owl"
    code, stdout, err = run(["prune", model_dir("llama"), "--method", "sparsegpt", "--sparsity", "0.6", "--allocation",
                             "owl", "--refine", "reconstruct", "--calib", text_file, "--out", out, *PRUNE_SMALL], capsys)
    assert code == 0, err
    manifest = json.loads((out / "secateur.json").read_text())
    [stage] = manifest["recipe"]["stage"]
    assert stage["allocation"] == "owl" and stage["refine"] == ["reconstruct"]
    result = manifest["history"][-1]["result"]
    assert result["sparsity"] == pytest.approx(0.6, abs=1e-4)  # round(0.6 * weights) / weights
    assert set(result["allocation"]["outlier_ratios"]) == {"0", "1"}
    assert len(result["block_errors"]) == 2 and result["collapsed_blocks"] == []
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.tensor([[1, 5, 6]])).logits.isfinite().all()


@pytest.mark.parametrize("command", ["prune", "train", "eval", "info", "bench", "export", "plan", "report"])
def test_every_command_prints_its_help(command, capsys):
    """Help texts are argparse format strings: a literal % in a generated flag's help (`plan --margin`:
    "up to 6.5%)") made `secateur plan --help` crash."""
    assert main([command, "--help"]) == 0 and f"usage: secateur {command}" in capsys.readouterr().out
