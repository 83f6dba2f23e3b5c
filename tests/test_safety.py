"""Nothing is lost: outputs that would delete an input are refused, interrupted saves leave nothing
behind, and every location and data source is checked before any pruning starts."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from secateur.cli import main
from secateur.io import content_hash

FAST = ["--method", "magnitude", "--sparsity", "0.3"]


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def source(tmp_path, model_dir):
    """A copy of the tiny Llama inside tmp/parent/model, with an unrelated file beside it."""
    import shutil

    parent = tmp_path / "parent"
    shutil.copytree(model_dir("llama"), parent / "model")
    (parent / "notes.txt").write_text("unrelated")
    return parent / "model"


@pytest.mark.parametrize("where,relation", [("self", "is the input"), ("parent", "contains the input"),
                                            ("grandparent", "contains the input"), ("inside", "lies inside the input")])
def test_out_on_the_input_is_refused_even_with_overwrite(where, relation, source, capsys):
    out = {"self": source, "parent": source.parent, "grandparent": source.parent.parent,
           "inside": source / "pruned"}[where]  # fmt: skip
    before = content_hash(source.parent)
    code, err = run(["prune", source, *FAST, "--out", out, "--overwrite"], capsys)
    assert code == 2 and relation in err, err
    assert content_hash(source.parent) == before and not (source / "pruned").exists()


def test_out_holding_a_text_source_is_refused(source, text_file, tmp_path, capsys):
    code, err = run(["prune", source, "--method", "wanda", "--calib", text_file, "--out", text_file.parent, "--overwrite"],
                    capsys)  # fmt: skip
    assert code == 2 and "contains the input" in err and text_file.exists()


def test_library_save_protects_the_manifest_source(source, tmp_path):
    from secateur.errors import OutputError
    from secateur.io import load_model, save

    model, tokenizer = load_model(source)
    with pytest.raises(OutputError, match="contains the input"):
        save(model, tokenizer, source.parent, {"source": {"path": str(source)}}, overwrite=True)
    assert (source / "config.json").exists()


def test_unwritable_out_and_bad_eval_fail_before_pruning(source, tmp_path, capsys, monkeypatch):
    import secateur.pipeline

    def never(*args, **kwargs):
        raise AssertionError("pruning started before the inputs were checked")

    monkeypatch.setattr(secateur.pipeline, "prune", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = run(["prune", source, *FAST, "--out", blocker / "out"], capsys)
    assert code == 2 and "not a writable directory" in err
    code, err = run(["prune", source, *FAST, "--out", tmp_path / "o", "--eval", tmp_path / "missing.txt",
                     "--eval-seq-len", "32"], capsys)  # fmt: skip
    assert code == 2 and "unknown text source" in err and not (tmp_path / "o").exists()


def test_stale_leftovers_are_cleared_and_a_retired_output_restored(source, tmp_path, capsys):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".out.partial-{dead}").mkdir()
    (tmp_path / f".out.partial-{dead}" / "model.safetensors").write_bytes(b"0" * 1000)
    code, err = run(["prune", source, *FAST, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "parent"]
    (tmp_path / "out").rename(tmp_path / f".out.old-{dead}")  # a crash between the two renames
    code, err = run(["prune", source, *FAST, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "already exists" in err  # the old output was put back, and is not overwritten
    assert json.loads((tmp_path / "out" / "secateur.json").read_text())["history"][0]["result"]["sparsity"] == pytest.approx(0.3, abs=1e-3)


SLOW_SAVE = textwrap.dedent("""
    import signal, sys, time
    import secateur.io as io
    from secateur.io import load_model, save
    # a job started in the background by a shell inherits SIGINT ignored; Ctrl-C's default here
    signal.signal(signal.SIGINT, signal.default_int_handler)
    model, tokenizer = load_model(sys.argv[1])
    original = type(model).save_pretrained
    def slow(self, path, **kwargs):
        original(self, path, **kwargs)
        print("writing", flush=True)
        time.sleep(60)
    type(model).save_pretrained = slow
    save(model, tokenizer, sys.argv[2], {})
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_save_leaves_nothing_behind(sig, source, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(source), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        assert list(tmp_path.glob(".out.partial-*"))  # the weights are half-way to the output
        os.kill(process.pid, sig)
        assert process.wait(timeout=60) != 0
    finally:
        process.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]
