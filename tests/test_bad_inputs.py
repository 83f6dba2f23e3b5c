"""Every bad input gets one line and exit code 2 before anything is written, and the input is untouched."""

import json
import shutil

import pytest
from conftest import CONFIGS, tiny_text
from transformers import AutoModelForCausalLM

from secateur.cli import main
from secateur.io import content_hash

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_dir):
    """A model, a good corpus and a collection of broken inputs, made once (the cases only read them)."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(model_dir("llama"), root / "model")
    (root / "corpus.txt").write_text(tiny_text())
    (root / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (root / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\n \t\n")
    (root / "short.txt").write_text("w1 w2 w3")
    (root / "null.jsonl").write_text('{"text": "w1 w2"}\n{"text": null}\n')
    (root / "nofield.jsonl").write_text('{"body": "w1 w2"}\n')
    (root / "badline.jsonl").write_text('{"text": "w1"}\n{oops\n')
    (root / "list.jsonl").write_text('["w1", "w2"]\n')
    (root / "notdataset").mkdir()
    (root / "brokencfg").mkdir()
    (root / "brokencfg" / "config.json").write_text("{not json")
    (root / "notype").mkdir()
    (root / "notype" / "config.json").write_text('{"hidden_size": 8}')
    (root / "garbage.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    (root / "foreign.gguf").write_bytes(b"PK\x03\x04" * 64)
    (root / "weights.bin").write_bytes(b"0" * 64)
    (root / "afile").write_text("x")
    recipes = {
        "bad.toml": "method = [",
        "unknown.toml": 'method = "wanda"\nsparsityy = 0.5\n',
        "compensate-str.toml": 'method = "angular"\nremove_blocks = 1\ncompensate = "false"\n',
        "blocks-float.toml": 'method = "angular"\nremove_blocks = 1.7\n',
        "sparsity-str.toml": 'sparsity = "0.5"\n',
        "stage-top.toml": 'sparsity = 0.5\n[[stage]]\nmethod = "wanda"\n',
        "order.toml": '[[stage]]\nmethod = "magnitude"\npattern = "2:4"\n[[stage]]\nmethod = "width"\nremove_fraction = 0.2\n',
        "empty-stages.toml": "stage = []\n",
    }
    for name, text in recipes.items():
        (root / name).write_text(text)
    shutil.copytree(model_dir("llama"), root / "badmanifest")
    (root / "badmanifest" / "secateur.json").write_text("{truncated")
    (root / "notmanifest.json").write_text(json.dumps({"hello": 1}))
    (root / "legacy.json").write_text(json.dumps({"recipe": {"method": "wanda", "sparsity": 0.5}}))
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(root / "notokenizer")
    return root


def model(w):
    return w / "model"


CASES = [  # (id, argv from the workspace, fragment of the message)
    ("missing-model", lambda w: ["prune", w / "nope", "--out", w / "o"], "does not exist"),
    ("empty-dir", lambda w: ["prune", w / "notdataset", "--out", w / "o"], "no config.json"),
    ("not-gguf-file", lambda w: ["prune", w / "weights.bin", "--out", w / "o"], "not a .gguf"),
    ("broken-config", lambda w: ["prune", w / "brokencfg", "--out", w / "o"], "cannot read the model's config.json"),
    ("config-no-type", lambda w: ["prune", w / "notype", "--out", w / "o"], "cannot read the model's config.json"),
    ("truncated-gguf", lambda w: ["prune", w / "garbage.gguf", "--out", w / "o"], "cannot read the model's GGUF"),
    ("foreign-gguf", lambda w: ["prune", w / "foreign.gguf", "--out", w / "o"], "cannot read the model's GGUF"),
    ("manifest-broken", lambda w: ["prune", w / "badmanifest", "--out", w / "o"], "secateur.json is not valid JSON"),
    ("calib-missing", lambda w: ["prune", model(w), "--calib", w / "nope.txt", "--out", w / "o"], "unknown text source"),
    ("calib-binary", lambda w: ["prune", model(w), "--calib", w / "binary.txt", "--out", w / "o"], "binary file"),
    ("calib-latin1", lambda w: ["prune", model(w), "--calib", w / "latin1.txt", "--out", w / "o"], "not UTF-8"),
    ("calib-empty", lambda w: ["prune", model(w), "--calib", w / "empty.txt", "--out", w / "o"], "is empty"),
    ("calib-blank", lambda w: ["prune", model(w), "--calib", w / "blank.txt", "--out", w / "o"], "is empty"),
    ("calib-short", lambda w: ["prune", model(w), "--calib", w / "short.txt", *SMALL, "--out", w / "o"],
     "calibration needs 4 windows"),
    ("jsonl-null", lambda w: ["prune", model(w), "--calib", w / "null.jsonl", "--out", w / "o"], "is NoneType, not a string"),
    ("jsonl-no-field", lambda w: ["prune", model(w), "--calib", w / "nofield.jsonl", "--out", w / "o"], "--text-field"),
    ("jsonl-bad-line", lambda w: ["prune", model(w), "--calib", w / "badline.jsonl", "--out", w / "o"], "not valid JSON"),
    ("jsonl-not-object", lambda w: ["prune", model(w), "--calib", w / "list.jsonl", "--out", w / "o"], "has no field"),
    ("dir-not-dataset", lambda w: ["prune", model(w), "--calib", w / "notdataset", "--out", w / "o"], "not a `datasets`"),
    ("eval-missing", lambda w: ["prune", model(w), "--method", "magnitude", "--eval", w / "nope.txt", "--eval-seq-len",
                                "32", "--out", w / "o"], "unknown text source"),
    ("eval-too-short", lambda w: ["prune", model(w), "--method", "magnitude", "--eval", w / "short.txt", "--eval-seq-len",
                                  "32", "--eval-windows", "4", "--out", w / "o"], "the text has"),
    ("recipe-missing", lambda w: ["prune", model(w), "--recipe", w / "nope.toml", "--out", w / "o"], "recipe file not found"),
    ("recipe-bad-toml", lambda w: ["prune", model(w), "--recipe", w / "bad.toml", "--out", w / "o"], "not valid TOML"),
    ("recipe-unknown-key", lambda w: ["prune", model(w), "--recipe", w / "unknown.toml", "--out", w / "o"],
     "--sparsityy belongs to no stage"),
    ("recipe-bool-as-string", lambda w: ["prune", model(w), "--recipe", w / "compensate-str.toml", "--out", w / "o"],
     "--compensate must be true or false"),
    ("recipe-float-count", lambda w: ["prune", model(w), "--recipe", w / "blocks-float.toml", "--out", w / "o"],
     "--remove-blocks must be an integer"),
    ("recipe-number-as-string", lambda w: ["prune", model(w), "--recipe", w / "sparsity-str.toml", "--out", w / "o"],
     "--sparsity must be a number"),
    ("recipe-stage-key-on-top", lambda w: ["prune", model(w), "--recipe", w / "stage-top.toml", "--out", w / "o"],
     "go inside a table"),
    ("recipe-bad-order", lambda w: ["prune", model(w), "--recipe", w / "order.toml", "--out", w / "o"],
     "breaks the N:M groups"),
    ("recipe-no-stages", lambda w: ["prune", model(w), "--recipe", w / "empty-stages.toml", "--out", w / "o"],
     "at least one"),
    ("recipe-json-not-manifest", lambda w: ["prune", model(w), "--recipe", w / "notmanifest.json", "--out", w / "o"],
     "no replayable recipe"),
    ("recipe-legacy-manifest", lambda w: ["prune", model(w), "--recipe", w / "legacy.json", "--out", w / "o"],
     "no replayable recipe"),
    ("device-unknown", lambda w: ["prune", model(w), "--device", "tpu", "--out", w / "o"], "not a device"),
    ("device-no-cuda", lambda w: ["prune", model(w), "--device", "cuda:0", "--out", w / "o"], "no CUDA device"),
    ("dtype-unknown", lambda w: ["prune", model(w), "--dtype", "int8", "--out", w / "o"], "invalid choice"),
    ("windows-past-positions", lambda w: ["prune", model(w), "--calib", w / "corpus.txt", "--calib-seq-len", "300",
                                          "--out", w / "o"], "longer than the model's 256 positions"),
    ("eval-past-positions", lambda w: ["prune", model(w), "--method", "magnitude", "--eval", w / "corpus.txt",
                                       "--out", w / "o"], "--eval-seq-len 512 is longer"),
    ("finercut-too-many", lambda w: ["prune", model(w), "--method", "finercut", "--remove-sublayers", "10", "--calib",
                                     w / "corpus.txt", *SMALL, "--out", w / "o"], "can remove at most 3"),
    ("finercut-fraction-too-big", lambda w: ["prune", model(w), "--method", "finercut", "--remove-fraction", "0.99",
                                             "--calib", w / "corpus.txt", *SMALL, "--out", w / "o"], "lower it"),
    ("blocks-all", lambda w: ["prune", model(w), "--method", "angular", "--remove-blocks", "2", "--calib",
                              w / "corpus.txt", *SMALL, "--out", w / "o"], "keep at least one"),
    ("sparsity-one", lambda w: ["prune", model(w), "--sparsity", "1.0", "--out", w / "o"], "[0, 1)"),
    ("pattern-n-ge-m", lambda w: ["prune", model(w), "--pattern", "4:4", "--out", w / "o"], "N must be < M"),
    ("pattern-garbled", lambda w: ["prune", model(w), "--pattern", "two:four", "--out", w / "o"], "N:M"),
    ("width-no-fraction", lambda w: ["prune", model(w), "--method", "width", "--out", w / "o"], "--remove-fraction"),
    ("width-fraction-range", lambda w: ["prune", model(w), "--method", "width", "--remove-fraction", "1.5",
                                        "--out", w / "o"], "(0, 1)"),
    ("width-attention-adaptive", lambda w: ["prune", model(w), "--method", "width", "--remove-fraction", "0.2",
                                            "--allocation", "adaptive", "--attention-fraction", "0.5", "--out", w / "o"],
     "uniform allocation only"),
    ("width-attention-too-big", lambda w: ["prune", model(w), "--method", "width", "--remove-fraction", "0.05",
                                           "--importance", "magnitude", "--attention-fraction", "0.5", "--out", w / "o"],
     "more than the"),
    ("flag-of-another-kind", lambda w: ["prune", model(w), "--method", "width", "--remove-fraction", "0.2",
                                        "--ignore", "*.mlp.*", "--out", w / "o"], "--ignore belongs to sparsity"),
    ("calib-for-magnitude", lambda w: ["prune", model(w), "--method", "magnitude", "--calib", w / "corpus.txt",
                                       "--out", w / "o"], "do not apply"),
    ("calib-samples-zero", lambda w: ["prune", model(w), "--calib-samples", "0", "--out", w / "o"], "at least 1 sample"),
    ("out-is-input", lambda w: ["prune", model(w), "--out", model(w), "--overwrite"], "is the input"),
    ("out-holds-input", lambda w: ["prune", model(w), "--out", w, "--overwrite"], "contains the input"),
    ("out-inside-input", lambda w: ["prune", model(w), "--out", model(w) / "sub"], "lies inside the input"),
    ("out-holds-calib", lambda w: ["prune", w / "notokenizer", "--calib", w / "corpus.txt", "--out", w, "--overwrite"],
     "contains the input"),
    ("out-exists", lambda w: ["prune", model(w), "--out", w / "notdataset"], "already exists"),
    ("out-under-a-file", lambda w: ["prune", model(w), "--out", w / "afile" / "o"], "not a writable directory"),
    ("eval-model-missing", lambda w: ["eval", w / "nope"], "does not exist"),
    ("eval-data-binary", lambda w: ["eval", model(w), "--data", w / "binary.txt"], "binary file"),
    ("info-broken-config", lambda w: ["info", w / "brokencfg"], "cannot read the model's config.json"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_before_writing(case, workspace, capsys):
    _, argv, fragment = case
    before = {p: content_hash(p) for p in (workspace / "model", workspace / "corpus.txt")}
    listing = sorted(p.name for p in workspace.iterdir())
    code = main([str(a) for a in argv(workspace)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and fragment in err[-1], err
    assert err[-1].startswith("secateur: error: ")
    assert sorted(p.name for p in workspace.iterdir()) == listing  # nothing written, no staging left
    assert not (workspace / "model" / "sub").exists()
    assert {p: content_hash(p) for p in before} == before


def test_the_table_is_large():
    assert len(CASES) >= 40
