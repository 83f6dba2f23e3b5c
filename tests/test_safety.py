"""Nothing is lost: outputs that would delete an input are refused, interrupted saves leave nothing
behind, and every location and data source is checked before any pruning starts."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

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


# --- every writer: signals, a second run, a full disk, free space -------------------------------------------

SIGNALLED = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
    import secateur.output as output
    original = output.Output._replace
    def slow(self, staging):
        print("writing", flush=True)
        time.sleep(60)
        original(self, staging)
    output.Output._replace = slow
    from secateur.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def exportable(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (what GGUF export writes), a text and a report's input."""
    from conftest import tiny_model, tiny_text
    from test_export import saved

    root = tmp_path_factory.mktemp("exportable")
    path = saved(tiny_model("llama"), root)
    (root / "corpus.txt").write_text(tiny_text())
    return path


WRITERS = {  # command line for each writer, its output under `where`, and a signal to end it with
    "prune": (lambda m, where: ["prune", m, "--method", "magnitude", "--out", where / "out"], "out", signal.SIGTERM),
    "train": (lambda m, where: ["train", m, "--tokens", "64", "--train-seq-len", "16", "--val-windows", "1", "--calib",
                                m.parent / "corpus.txt", "--eval-windows", "2", "--eval-seq-len", "16", "--out",
                                where / "out"], "out", signal.SIGHUP),
    "export": (lambda m, where: ["export", m, "--gguf", where / "out.gguf"], "out.gguf", signal.SIGINT),
    "report": (lambda m, where: ["report", m, "--out", where / "out"], "out", signal.SIGTERM),
    "plan": (lambda m, where: ["plan", m, "--target", "params=60000", "--calib", m.parent / "corpus.txt",
                               "--calib-seq-len", "32", "--eval-seq-len", "32", "--eval-windows", "2", "--out",
                               where / "out"], "out", signal.SIGHUP),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_signal_during_any_write_leaves_nothing(writer, exportable, tmp_path):
    argv, name, sig = WRITERS[writer]
    where = tmp_path / "where"
    where.mkdir()
    process = subprocess.Popen([sys.executable, "-c", SIGNALLED, *map(str, argv(exportable, where))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "writing", process.stderr.read()
        assert list(where.glob(f".{name}.partial-*")) and (where / f".{name}.lock").exists()
        os.kill(process.pid, sig)
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
    assert "interrupted" in process.stderr.read()
    assert list(where.iterdir()) == []  # no output, no staging copy, no lock, no checkpoints


def _claimed(path, shape="dir"):
    from secateur.output import claim

    return claim(path, shape=shape, suffix=".gguf" if shape == "file" else None)


@pytest.mark.parametrize("writer", [*WRITERS, "eval-results"])
def test_a_second_run_to_a_claimed_output_is_refused(writer, exportable, tmp_path, capsys):
    if writer == "eval-results":
        argv = ["eval", exportable, "--tasks", "secateur_wordnet", "--results", tmp_path / "out.json"]
        name = "out.json"
    else:
        argv, name, _ = WRITERS[writer]
        argv = argv(exportable, tmp_path)
    from secateur.output import claim

    with claim(tmp_path / name, shape="dir" if "." not in name else "file"):
        code, err = run(argv, capsys)
    assert code == 2 and "another secateur run is writing" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_two_processes_to_one_output(source, tmp_path, capsys):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", SIGNALLED, "prune", str(source), *FAST, "--out", str(out)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "writing"
        code, err = run(["prune", source, *FAST, "--out", out, "--overwrite"], capsys)
        assert code == 2 and "another secateur run is writing" in err
        code, err = run(["report", source, "--out", out], capsys)
        assert code == 2 and "another secateur run is writing" in err
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]
    code, err = run(["prune", source, *FAST, "--out", out], capsys)  # the lock went with its holder
    assert code == 0, err


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk(monkeypatch, writer):
    """Make the writer's own write fail half-way with ENOSPC, after some bytes are down."""
    import pathlib

    import gguf
    from transformers import PreTrainedModel

    if writer in ("prune", "train"):
        def save_pretrained(self, path, **kwargs):
            (pathlib.Path(path) / "model.safetensors").write_bytes(b"0" * 1000)
            _no_space()
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)
    elif writer == "export":
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", _no_space)
    else:
        original = pathlib.Path.write_text

        def write_text(self, *args, **kwargs):
            if ".partial-" in str(self):
                original(self, "half")
                _no_space()
            return original(self, *args, **kwargs)
        monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_mid_write_is_one_line_and_leaves_nothing(writer, exportable, tmp_path, monkeypatch, capsys):
    argv, _, _ = WRITERS[writer]
    _full_disk(monkeypatch, writer)
    before = content_hash(exportable.parent)
    code, err = run(argv(exportable, tmp_path), capsys)
    assert code == 2 and "no space left on the device" in err and "nothing was written" in err, err
    assert err.strip().count("\n") == 0 or err.strip().splitlines()[-1].startswith("secateur: error:")
    assert list(tmp_path.iterdir()) == [] and content_hash(exportable.parent) == before


def test_too_little_free_space_is_refused_before_writing(source, tmp_path, monkeypatch, capsys):
    import collections

    import secateur.output

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(secateur.output.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    code, err = run(["prune", source, *FAST, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "needs about" in err and "0.0 MiB free" in err
    assert list(tmp_path.iterdir()) == ["parent"] or sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs where the machine lets the tests mount one (root in a sandbox); skipped elsewhere."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_a_real_full_disk(small_disk, source, monkeypatch, capsys):
    """On a real small filesystem: refused by the free-space check, then, with the check off, by ENOSPC
    half-way through safetensors' write; nothing is left either way."""
    import secateur.output

    code, err = run(["prune", source, *FAST, "--out", small_disk / "out"], capsys)
    assert code == 2 and "needs about" in err and list(small_disk.iterdir()) == []
    monkeypatch.setattr(secateur.output.Output, "check_space", lambda self, size: None)
    code, err = run(["prune", source, *FAST, "--out", small_disk / "out"], capsys)
    assert code == 2 and "no space left on the device" in err, err
    assert list(small_disk.iterdir()) == []


def test_stale_file_staging_and_lock_are_cleared(tmp_path):
    from secateur.output import claim

    dead = 2**22 + 12345
    (tmp_path / f".x.gguf.partial-{dead}").write_bytes(b"GGUF half")
    (tmp_path / ".x.gguf.lock").write_text("")  # its holder was killed: flock died with it
    with claim(tmp_path / "x.gguf", shape="file", suffix=".gguf") as output:
        with output.write() as staging:
            staging.write_bytes(b"GGUF whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    assert (tmp_path / "x.gguf").read_bytes() == b"GGUF whole"


# --- inputs that cannot be read, outputs that cannot be written -------------------------------------------


def test_unreadable_weights_and_text_are_one_line(source, tmp_path, monkeypatch, capsys):
    import builtins
    import pathlib

    real_open, real_read = builtins.open, pathlib.Path.read_bytes

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("model.safetensors"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    code, err = run(["prune", source, *FAST, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "cannot read" in err and "Permission denied" in err, err
    monkeypatch.setattr(builtins, "open", real_open)
    text_file = tmp_path / "parent" / "unreadable.txt"  # a text never read before (reads are cached)
    text_file.write_text("w1 w2")

    def refusing_read(self):
        if self.name == text_file.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", refusing_read)
    code, err = run(["prune", source, "--calib", text_file, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"cannot read {text_file}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("writer", ["report", "eval-results"])
def test_a_read_only_output_is_refused_before_the_work(writer, source, tmp_path, monkeypatch, capsys):
    import secateur.output
    import secateur.report
    import secateur.tasks.harness

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(secateur.output.os, "access", lambda p, mode: False if str(p) == str(locked) else
                        real_access(p, mode))  # fmt: skip
    monkeypatch.setattr(secateur.tasks.harness, "run_tasks", lambda *a, **k: pytest.fail("tasks ran"))
    monkeypatch.setattr(secateur.report, "gather", lambda *a, **k: pytest.fail("the report read its models"))
    argv = (["report", source, "--out", locked / "r"] if writer == "report" else
            ["eval", source, "--tasks", "secateur_wordnet", "--results", locked / "r.json"])  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 2 and "not a writable directory" in err, err
    assert list(locked.iterdir()) == []


# --- numbers: non-finite weights, a stage that produces them ------------------------------------------------


@pytest.fixture
def nan_model(source, tmp_path):
    from safetensors.torch import load_file, save_file

    import shutil

    path = tmp_path / "nan"
    shutil.copytree(source, path)
    state = load_file(path / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_allow_nonfinite_goes_on_and_info_warns(nan_model, tmp_path, capsys):
    code, err = run(["prune", nan_model, *FAST, "--out", tmp_path / "out", "--allow-nonfinite"], capsys)
    assert code == 0, err
    assert main(["info", str(nan_model)]) == 0
    assert "WARNING: 1 NaN/Inf values in 1 tensors, first model.layers.1.self_attn.q_proj.weight" in capsys.readouterr().out


def test_a_stage_that_produces_nan_saves_nothing(source, tmp_path, monkeypatch, capsys):
    import secateur.recipe

    real = secateur.recipe.KINDS["sparsity"].run

    def poisoned(model, config, data, ctx):
        result = real(model, config, data, ctx)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("inf")
        return result

    monkeypatch.setitem(secateur.recipe.KINDS, "sparsity", dataclasses.replace(secateur.recipe.KINDS["sparsity"],
                                                                              run=poisoned))
    code, err = run(["prune", source, *FAST, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "the pruned model has non-finite weights" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent"]


# --- defaults that adapt ------------------------------------------------------------------------------------


@pytest.fixture
def short_model(tmp_path):
    """A tiny Llama with 64 positions (the default windows are 512 tokens)."""
    from conftest import CONFIGS, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    config = CONFIGS["llama"]()
    config.max_position_embeddings = 64
    path = tmp_path / "short"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_default_windows_become_the_models_positions(short_model, text_file, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    code, err = run(["prune", short_model, "--calib", text_file, "--calib-samples", "4", "--eval", text_file,
                     "--eval-windows", "2", "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "secateur.json").read_text())
    assert manifest["recipe"]["stage"][0]["calib_seq_len"] == 64 and manifest["recipe"]["eval_seq_len"] == 64
    assert manifest["evaluation"]["seq_len"] == 64 and len(manifest["adapted"]) == 2
    assert "the default 512 is longer than the model's 64 positions" in caplog.text
    code, err = run(["prune", short_model, "--calib", text_file, "--calib-seq-len", "128", "--out", tmp_path / "o2"],
                    capsys)  # fmt: skip
    assert code == 2 and "--calib-seq-len 128 is longer than the model's 64 positions" in err
    code, err = run(["train", short_model, "--calib", text_file, "--tokens", "128", "--val-windows", "1",
                     "--micro-batch", "2", "--eval-windows", "2", "--out", tmp_path / "o3"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "o3" / "secateur.json").read_text())["recipe"]["stage"][0]["train_seq_len"] == 64
    assert main(["eval", str(short_model), "--data", str(text_file), "--windows", "2"]) == 0
    assert "--seq-len 64 (the default 512" in capsys.readouterr().err


# --- bench never hangs -------------------------------------------------------------------------------------


def _dies(queue, path, kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_bench_worker_is_one_line(source, monkeypatch, capsys):
    import secateur.bench

    monkeypatch.setattr(secateur.bench, "_worker", _dies)
    code, err = run(["bench", source, "--rounds", "1", "--repeats", "1", "--prompt", "4", "--new-tokens", "2"], capsys)
    assert code == 2 and "died (killed by SIGKILL (out of memory?)) before reporting" in err, err


# --- resume checks its run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, model_dir):
    """A recovery run killed right after its first checkpoint: (argv of the run, its checkpoints, root)."""
    import shutil

    from conftest import tiny_text
    from safetensors.torch import load_file, save_file

    from secateur.train import loop

    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(model_dir("llama"), root / "model")
    shutil.copytree(model_dir("llama"), root / "other")
    state = load_file(root / "other" / "model.safetensors")
    state["model.norm.weight"][0] = 2.0
    save_file(state, root / "other" / "model.safetensors", metadata={"format": "pt"})
    (root / "corpus.txt").write_text(tiny_text())
    (root / "other.txt").write_text(tiny_text(seed=1))
    argv = ["train", root / "model", "--tokens", "128", "--train-seq-len", "16", "--val-windows", "1", "--micro-batch",
            "2", "--checkpoint-every", "1", "--calib", root / "corpus.txt", "--eval-windows", "2", "--eval-seq-len",
            "16", "--out", root / "out"]  # fmt: skip
    real = loop.save_checkpoint

    def dies_after(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", dies_after)
        assert main([str(a) for a in argv]) == 130
    work = root / "out.checkpoints"
    assert (work / "stage-1" / "checkpoint").is_dir() and (work / "run.json").is_file()
    assert not (root / "out").exists()
    return argv, work, root


def _changed(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv[1:1] = []
        argv += [flag, value]
    return argv


RESUME_CHANGES = [  # (flag, new value (a name under the root for paths), the words that name the difference)
    ("--lr", "5e-4", "--lr (None then, 0.0005 now)"),
    ("--tokens", "160", "--tokens (128 then, 160 now)"),
    ("--train-seed", "1", "--train-seed (0 then, 1 now)"),
    ("--train-seq-len", "8", "--train-seq-len (16 then, 8 now)"),
    ("--seed", "3", "--seed (0 then, 3 now)"),
    ("--kd-weight", "0.5", "--kd-weight (1.0 then, 0.5 now)"),
    ("--calib", "other.txt", "--calib ("),
    ("--dtype", "bfloat16", "--dtype ('float32' then, 'bfloat16' now)"),
    ("--eval-windows", "3", "--eval-windows (2 then, 3 now)"),
    ("--epochs", "2", "--epochs (1 then, 2 now)"),
    ("--teacher", "other", "the teacher (its content)"),
    ("model", "other", "the input model (its content)"),
]


@pytest.mark.parametrize("flag,value,named", RESUME_CHANGES, ids=[c[0] for c in RESUME_CHANGES])
def test_resume_refuses_a_changed_run(flag, value, named, interrupted, capsys):
    argv, work, root = interrupted
    value = str(root / value) if flag in ("--calib", "--teacher", "model") else value
    if flag == "model":
        argv = [argv[0], value, *argv[2:]]
    else:
        argv = _changed(argv, flag, value)
    before = content_hash(work)
    code, err = run([*argv, "--resume"], capsys)
    assert code == 2 and "--resume:" in err and named in err and "differs from the interrupted run" in err, err
    assert content_hash(work) == before and not (root / "out").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(interrupted, monkeypatch, capsys):
    """torch's writer reports a full disk as 'file write failed' (no errno): still one line, and the
    checkpoint a resume needs is left as it was."""
    import accelerate

    argv, work, root = interrupted
    before = content_hash(work)

    def full(self, path, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    code, err = run([*_changed(argv, "--out", str(root / "other-out")), "--checkpoint-every", "1"], capsys)
    assert code == 2 and "could not write a checkpoint" in err and "rerun with --resume" in err, err
    assert content_hash(work) == before


def test_resume_with_the_same_run_goes_on(interrupted, capsys):
    argv, work, root = interrupted
    code, err = run([*argv, "--resume"], capsys)
    assert code == 0, err
    record = json.loads((root / "out" / "secateur.json").read_text())["history"][-1]["result"]
    assert record["resumed_at"] == 1 and not work.exists()

