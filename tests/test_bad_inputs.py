"""Every bad input, to every command, gets one line and exit code 2 before anything is written, and every
input is untouched: the whole workspace (models, texts, recipes, results files) hashes the same after."""

import json
import shutil

import pytest
from conftest import CONFIGS, tiny_text
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from secateur.cli import main
from secateur.io import content_hash

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32"]
WEIGHTS = "model.safetensors"


def _edit_weights(directory, edit):
    state = load_file(directory / WEIGHTS)
    edit(state)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def _broken_models(root, model_dir):
    """Copies of the tiny Llama, each broken in one way."""
    source = model_dir("llama")

    def copy(name):
        shutil.copytree(source, root / name)
        return root / name

    _edit_weights(copy("nan"), lambda s: s["model.layers.0.mlp.down_proj.weight"].view(-1).__setitem__(3, float("nan")))
    _edit_weights(copy("inf"), lambda s: s["model.norm.weight"].__setitem__(0, float("inf")))
    _edit_config(copy("sixlayers"), num_hidden_layers=6)
    _edit_config(copy("wrongshape"), intermediate_size=96)
    _edit_weights(copy("lacking"), lambda s: s.pop("model.norm.weight"))
    data = (copy("truncated") / WEIGHTS).read_bytes()
    (root / "truncated" / WEIGHTS).write_bytes(data[: len(data) - 100])
    (copy("headless") / WEIGHTS).write_bytes(b"\xff" * 4)
    manifests = {
        "history-int": {"history": 3},
        "history-no-kind": {"history": [{"settings": {}}]},
        "structure-list": {"structure": []},
        "widths-garbage": {"structure": {"uniform_widths": False, "widths": ["x"]}},
        "removed-garbage": {"structure": {"removed_sublayers": [["zero", 1]]}},
        "manifest-list": [1, 2],
    }
    for name, manifest in manifests.items():
        (copy(name) / "secateur.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_dir):
    """Models, texts, recipes, results files and broken inputs, made once (the cases only read them)."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(model_dir("llama"), root / "model")
    shutil.copytree(model_dir("gpt2"), root / "gpt2")
    _broken_models(root, model_dir)
    (root / "corpus.txt").write_text(tiny_text())
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in tiny_text().split(". ")))
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
    (root / "stuff").mkdir()
    (root / "stuff" / "keep.txt").write_text("someone's file")
    (root / "dir.gguf").mkdir()
    (root / "existing.gguf").write_text("not a GGUF file")
    (root / "done.json").write_text("{}")
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
        "nan.toml": 'method = "ria"\nalpha = nan\n',
        "inf-lr.toml": 'method = "recovery"\nlr = inf\n',
        "dsnot-cycles.toml": 'method = "wanda"\ndsnot_cycles = 10\n',
        "owl-m.toml": 'method = "wanda"\nowl_m = 3.0\n',
    }
    for name, text in recipes.items():
        (root / name).write_text(text)
    (root / "rdir").mkdir()
    (root / "rdir" / "good.toml").write_text('method = "magnitude"\nsparsity = 0.3\n')
    shutil.copytree(model_dir("llama"), root / "badmanifest")
    (root / "badmanifest" / "secateur.json").write_text("{truncated")
    (root / "notmanifest.json").write_text(json.dumps({"hello": 1}))
    (root / "legacy.json").write_text(json.dumps({"recipe": {"method": "wanda", "sparsity": 0.5}}))
    (root / "bench.json").write_text(json.dumps({"results": [{"model": str(root / "model")}]}))
    (root / "bench-list.json").write_text(json.dumps([1, 2]))
    (root / "bench-noresults.json").write_text(json.dumps({"protocol": "x"}))
    (root / "tasks-nokey.json").write_text(json.dumps({"model": str(root / "model")}))
    (root / "samples-nokey.json").write_text(json.dumps({"model": str(root / "model")}))
    (root / "rep").mkdir()
    (root / "rep" / "bench.json").write_text(json.dumps({"results": []}))
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(root / "notokenizer")
    return root


def model(w):
    return w / "model"


def prune(w, *args, source=None):
    return ["prune", source or model(w), *args, "--out", w / "o"]


def train(w, *args, source=None):
    return ["train", source or model(w), "--tokens", "64", "--train-seq-len", "16", "--val-windows", "1", *args,
            "--out", w / "o"]  # fmt: skip


def plan(w, *args, source=None):
    return ["plan", source or model(w), "--target", "params=60000", "--calib", w / "corpus.txt", "--calib-seq-len",
            "32", "--eval-seq-len", "32", "--eval-windows", "2", *args, "--out", w / "o"]  # fmt: skip


def export(w, *args, source=None, gguf=None):
    return ["export", source or model(w), "--gguf", gguf or w / "o.gguf", *args]


def report(w, *args, source=None, out=None):
    return ["report", source or model(w), "--out", out or w / "o", *args]


def tasks(w, *args, source=None):
    return ["eval", source or model(w), "--tasks", "secateur_wordnet", "--limit", "2", *args]


PRUNE = [
    ("missing-model", lambda w: prune(w, source=w / "nope"), "does not exist"),
    ("empty-dir", lambda w: prune(w, source=w / "notdataset"), "no config.json"),
    ("not-gguf-file", lambda w: prune(w, source=w / "weights.bin"), "not a .gguf"),
    ("broken-config", lambda w: prune(w, source=w / "brokencfg"), "cannot read the model's config.json"),
    ("config-no-type", lambda w: prune(w, source=w / "notype"), "cannot read the model's config.json"),
    ("truncated-gguf", lambda w: prune(w, source=w / "garbage.gguf"), "cannot read the model's GGUF"),
    ("foreign-gguf", lambda w: prune(w, source=w / "foreign.gguf"), "cannot read the model's GGUF"),
    ("manifest-broken", lambda w: prune(w, source=w / "badmanifest"), "secateur.json is not valid JSON"),
    ("nan-weights", lambda w: prune(w, "--method", "magnitude", source=w / "nan"), "non-finite weights (1 NaN/Inf"),
    ("inf-weights", lambda w: prune(w, "--method", "magnitude", source=w / "inf"), "model.norm.weight"),
    ("nan-weights-wanda", lambda w: prune(w, "--calib", w / "corpus.txt", *SMALL, source=w / "nan"), "non-finite"),
    ("config-more-layers", lambda w: prune(w, "--method", "magnitude", source=w / "sixlayers"),
     "config.json says 6 blocks and the weights hold 2"),
    ("config-other-shape", lambda w: prune(w, "--method", "magnitude", source=w / "wrongshape"),
     "(128, 64) in the weights and (96, 64) in config.json"),
    ("weights-lack-a-tensor", lambda w: prune(w, "--method", "magnitude", source=w / "lacking"),
     "the weights lack model.norm.weight"),
    ("weights-truncated", lambda w: prune(w, "--method", "magnitude", source=w / "truncated"), "is truncated"),
    ("weights-not-safetensors", lambda w: prune(w, "--method", "magnitude", source=w / "headless"),
     "truncated or not a safetensors file"),
    ("manifest-history-int", lambda w: prune(w, source=w / "history-int"), "history is int, not list"),
    ("manifest-history-no-kind", lambda w: prune(w, source=w / "history-no-kind"), "history entry 1 has no kind"),
    ("manifest-structure-list", lambda w: prune(w, source=w / "structure-list"), "structure is list, not dict"),
    ("manifest-widths-garbage", lambda w: prune(w, source=w / "widths-garbage"), "structure.widths is not"),
    ("manifest-removed-garbage", lambda w: prune(w, source=w / "removed-garbage"), "structure.removed_sublayers"),
    ("manifest-a-list", lambda w: prune(w, source=w / "manifest-list"), "it is not a JSON object"),
    ("calib-missing", lambda w: prune(w, "--calib", w / "nope.txt"), "unknown text source"),
    ("calib-binary", lambda w: prune(w, "--calib", w / "binary.txt"), "binary file"),
    ("calib-latin1", lambda w: prune(w, "--calib", w / "latin1.txt"), "not UTF-8"),
    ("calib-empty", lambda w: prune(w, "--calib", w / "empty.txt"), "is empty"),
    ("calib-blank", lambda w: prune(w, "--calib", w / "blank.txt"), "is empty"),
    ("calib-short", lambda w: prune(w, "--calib", w / "short.txt", *SMALL), "calibration needs 4 windows"),
    ("jsonl-null", lambda w: prune(w, "--calib", w / "null.jsonl"), "is NoneType, not a string"),
    ("jsonl-no-field", lambda w: prune(w, "--calib", w / "nofield.jsonl"), "--text-field"),
    ("jsonl-bad-line", lambda w: prune(w, "--calib", w / "badline.jsonl"), "not valid JSON"),
    ("jsonl-not-object", lambda w: prune(w, "--calib", w / "list.jsonl"), "has no field"),
    ("dir-not-dataset", lambda w: prune(w, "--calib", w / "notdataset"), "not a `datasets`"),
    ("text-field-plain-text", lambda w: prune(w, "--calib", w / "corpus.txt", "--text-field", "body"),
     "--text-field applies only with a .jsonl"),
    ("text-field-default-plain-text", lambda w: prune(w, "--calib", w / "corpus.txt", "--text-field", "text"),
     "--text-field applies only with a .jsonl"),
    ("text-field-enwiki", lambda w: prune(w, "--text-field", "body"), "--text-field applies only"),
    ("eval-missing", lambda w: prune(w, "--method", "magnitude", "--eval", w / "nope.txt", "--eval-seq-len", "32"),
     "unknown text source"),
    ("eval-too-short", lambda w: prune(w, "--method", "magnitude", "--eval", w / "short.txt", "--eval-seq-len", "32",
                                       "--eval-windows", "4"), "the text has"),
    ("recipe-missing", lambda w: prune(w, "--recipe", w / "nope.toml"), "recipe file not found"),
    ("recipe-bad-toml", lambda w: prune(w, "--recipe", w / "bad.toml"), "not valid TOML"),
    ("recipe-unknown-key", lambda w: prune(w, "--recipe", w / "unknown.toml"), "--sparsityy belongs to no stage"),
    ("recipe-bool-as-string", lambda w: prune(w, "--recipe", w / "compensate-str.toml"),
     "--compensate must be true or false"),
    ("recipe-float-count", lambda w: prune(w, "--recipe", w / "blocks-float.toml"), "--remove-blocks must be an integer"),
    ("recipe-number-as-string", lambda w: prune(w, "--recipe", w / "sparsity-str.toml"), "--sparsity must be a number"),
    ("recipe-stage-key-on-top", lambda w: prune(w, "--recipe", w / "stage-top.toml"), "go inside a table"),
    ("recipe-bad-order", lambda w: prune(w, "--recipe", w / "order.toml"), "breaks the N:M groups"),
    ("recipe-no-stages", lambda w: prune(w, "--recipe", w / "empty-stages.toml"), "at least one"),
    ("recipe-json-not-manifest", lambda w: prune(w, "--recipe", w / "notmanifest.json"), "no replayable recipe"),
    ("recipe-legacy-manifest", lambda w: prune(w, "--recipe", w / "legacy.json"), "no replayable recipe"),
    ("recipe-nan", lambda w: prune(w, "--recipe", w / "nan.toml"), "--alpha must be a finite number"),
    ("recipe-variant-key", lambda w: prune(w, "--recipe", w / "dsnot-cycles.toml"),
     "--dsnot-cycles applies only with --refine dsnot"),
    ("recipe-owl-key-uniform", lambda w: prune(w, "--recipe", w / "owl-m.toml"), "--owl-m applies only with"),
    ("recipe-inside-out", lambda w: ["prune", model(w), "--recipe", w / "rdir" / "good.toml", "--out", w / "rdir",
                                     "--overwrite"], "contains the input"),
    ("out-is-recipe", lambda w: ["prune", model(w), "--recipe", w / "rdir" / "good.toml", "--out",
                                 w / "rdir" / "good.toml", "--overwrite"], "is the input"),
    ("device-unknown", lambda w: prune(w, "--device", "tpu"), "not a device"),
    ("device-no-cuda", lambda w: prune(w, "--device", "cuda:0"), "no CUDA device"),
    ("dtype-unknown", lambda w: prune(w, "--dtype", "int8"), "invalid choice"),
    ("windows-past-positions", lambda w: prune(w, "--calib", w / "corpus.txt", "--calib-seq-len", "300"),
     "longer than the model's 256 positions"),
    ("eval-past-positions", lambda w: prune(w, "--method", "magnitude", "--eval", w / "corpus.txt", "--eval-seq-len",
                                            "512"), "--eval-seq-len 512 is longer"),
    ("finercut-too-many", lambda w: prune(w, "--method", "finercut", "--remove-sublayers", "10", "--calib",
                                          w / "corpus.txt", *SMALL), "can remove at most 2 of the branches"),
    ("finercut-fraction-too-big", lambda w: prune(w, "--method", "finercut", "--remove-fraction", "0.99", "--calib",
                                                  w / "corpus.txt", *SMALL), "lower it"),
    ("blocks-all", lambda w: prune(w, "--method", "angular", "--remove-blocks", "2", "--calib", w / "corpus.txt",
                                   *SMALL), "keep at least one"),
    ("sparsity-one", lambda w: prune(w, "--sparsity", "1.0"), "[0, 1)"),
    ("sparsity-nan", lambda w: prune(w, "--sparsity", "nan"), "--sparsity must be a finite number"),
    ("pattern-n-ge-m", lambda w: prune(w, "--pattern", "4:4"), "N must be < M"),
    ("pattern-garbled", lambda w: prune(w, "--pattern", "two:four"), "N:M"),
    ("ria-alpha-nan", lambda w: prune(w, "--method", "ria", "--alpha", "nan"), "--alpha must be a finite number"),
    ("ria-alpha-inf", lambda w: prune(w, "--method", "ria", "--alpha", "inf"), "--alpha must be a finite number"),
    ("gblm-alpha-minus-inf", lambda w: prune(w, "--method", "gblm", "--alpha=-inf"), "finite number"),
    ("sparsegpt-damp-nan", lambda w: prune(w, "--method", "sparsegpt", "--damp", "nan"), "--damp must be a finite"),
    ("owl-lambda-inf", lambda w: prune(w, "--allocation", "owl", "--owl-lambda", "inf"), "--owl-lambda must be a finite"),
    ("collapse-threshold-nan", lambda w: prune(w, "--collapse-threshold", "nan"), "finite number"),
    ("dsnot-cycles-without-dsnot", lambda w: prune(w, "--dsnot-cycles", "10"), "applies only with --refine dsnot"),
    ("dsnot-default-without-dsnot", lambda w: prune(w, "--dsnot-cycles", "50"), "applies only with --refine dsnot"),
    ("dsnot-threshold-with-reconstruct", lambda w: prune(w, "--refine", "reconstruct", "--dsnot-threshold", "0.2"),
     "--dsnot-threshold applies only with --refine dsnot"),
    ("reconstruct-iters-without-reconstruct", lambda w: prune(w, "--reconstruct-iters", "10"),
     "applies only with --refine reconstruct"),
    ("reconstruct-damp-with-dsnot", lambda w: prune(w, "--refine", "dsnot", "--reconstruct-damp", "0.1"),
     "applies only with --refine reconstruct"),
    ("owl-m-uniform", lambda w: prune(w, "--owl-m", "3"), "--owl-m applies only with --allocation owl"),
    ("owl-lambda-global", lambda w: prune(w, "--allocation", "global", "--owl-lambda", "0.1"),
     "--owl-lambda applies only with --allocation owl"),
    ("max-layer-sparsity-uniform", lambda w: prune(w, "--max-layer-sparsity", "0.8"),
     "--max-layer-sparsity applies only with --allocation global"),
    ("ignore-matches-nothing", lambda w: prune(w, "--method", "magnitude", "--ignore", "*.mlp.down_prj"),
     "matches no layer"),
    ("width-no-fraction", lambda w: prune(w, "--method", "width"), "--remove-fraction"),
    ("width-fraction-range", lambda w: prune(w, "--method", "width", "--remove-fraction", "1.5"), "(0, 1)"),
    ("width-fraction-nan", lambda w: prune(w, "--method", "width", "--remove-fraction", "nan"), "finite number"),
    ("width-reconstruct-damp-alone", lambda w: prune(w, "--method", "width", "--remove-fraction", "0.2",
                                                     "--reconstruct-damp", "0.1"), "applies only with --reconstruct"),
    ("width-attention-adaptive", lambda w: prune(w, "--method", "width", "--remove-fraction", "0.2", "--allocation",
                                                 "adaptive", "--attention-fraction", "0.5"), "uniform allocation only"),
    ("width-attention-too-big", lambda w: prune(w, "--method", "width", "--remove-fraction", "0.05", "--importance",
                                                "magnitude", "--attention-fraction", "0.5"), "more than the"),
    ("flag-of-another-kind", lambda w: prune(w, "--method", "width", "--remove-fraction", "0.2", "--ignore", "*.mlp.*"),
     "--ignore belongs to sparsity"),
    ("calib-for-magnitude", lambda w: prune(w, "--method", "magnitude", "--calib", w / "corpus.txt"), "do not apply"),
    ("calib-samples-zero", lambda w: prune(w, "--calib-samples", "0"), "at least 1 sample"),
    ("compensate-damp-nan", lambda w: prune(w, "--method", "angular", "--remove-blocks", "1", "--compensate-damp",
                                            "nan"), "finite number"),
    ("resume-without-recovery", lambda w: prune(w, "--method", "magnitude", "--resume"), "this run has neither"),
    ("out-is-input", lambda w: ["prune", model(w), "--out", model(w), "--overwrite"], "is the input"),
    ("out-holds-input", lambda w: ["prune", model(w), "--out", w, "--overwrite"], "contains the input"),
    ("out-inside-input", lambda w: ["prune", model(w), "--out", model(w) / "sub"], "lies inside the input"),
    ("out-holds-calib", lambda w: ["prune", w / "notokenizer", "--calib", w / "corpus.txt", "--out", w, "--overwrite"],
     "contains the input"),
    ("out-is-calib", lambda w: ["prune", model(w), "--calib", w / "corpus.txt", "--out", w / "corpus.txt",
                                "--overwrite"], "is the input"),
    ("out-exists", lambda w: ["prune", model(w), "--out", w / "notdataset"], "already exists"),
    ("out-overwrite-someones-folder", lambda w: ["prune", model(w), "--method", "magnitude", "--out", w / "stuff",
                                                 "--overwrite"], "holds no secateur.json"),
    ("out-overwrite-a-file", lambda w: ["prune", model(w), "--method", "magnitude", "--out", w / "afile",
                                        "--overwrite"], "exists and is not a directory"),
    ("out-under-a-file", lambda w: ["prune", model(w), "--out", w / "afile" / "o"], "not a writable directory"),
]

TRAIN = [
    ("train-out-is-input", lambda w: ["train", model(w), "--out", model(w), "--overwrite"], "is the input"),
    ("train-out-holds-input", lambda w: ["train", model(w), "--out", w, "--overwrite"], "contains the input"),
    ("train-out-inside-input", lambda w: ["train", model(w), "--out", model(w) / "r"], "lies inside the input"),
    ("train-out-holds-teacher", lambda w: ["train", w / "notokenizer", "--teacher", model(w), "--out", w,
                                           "--overwrite"], "contains the input"),
    ("train-out-inside-teacher", lambda w: ["train", w / "notokenizer", "--teacher", model(w), "--out",
                                            model(w) / "r"], "lies inside the input"),
    ("train-checkpoints-are-input", lambda w: ["train", w / "rdir", "--out", w / "rdir" / "x"], "lies inside"),
    ("train-lr-inf", lambda w: train(w, "--lr", "inf"), "--lr must be a finite number"),
    ("train-lr-nan", lambda w: train(w, "--lr", "nan"), "--lr must be a finite number"),
    ("train-lr-zero", lambda w: train(w, "--lr", "0"), "--lr must be positive"),
    ("train-lr-negative", lambda w: train(w, "--lr=-1e-3"), "--lr must be positive"),
    ("train-weight-decay-inf", lambda w: train(w, "--weight-decay", "inf"), "--weight-decay must be a finite"),
    ("train-temperature-inf", lambda w: train(w, "--temperature", "inf"), "--temperature must be a finite"),
    ("train-temperature-nan", lambda w: train(w, "--temperature", "nan"), "--temperature must be a finite"),
    ("train-temperature-zero", lambda w: train(w, "--temperature", "0"), "--temperature must be positive"),
    ("train-temperature-without-kd", lambda w: train(w, "--kd-weight", "0", "--temperature", "2"),
     "--temperature applies only with distillation"),
    ("train-temperature-default-without-kd", lambda w: train(w, "--kd-weight", "0", "--temperature", "1"),
     "--temperature applies only with distillation"),
    ("train-kd-weight-range", lambda w: train(w, "--kd-weight", "1.5"), "--kd-weight must be in [0, 1]"),
    ("train-warmup-range", lambda w: train(w, "--warmup", "1.5"), "--warmup"),
    ("train-min-lr-nan", lambda w: train(w, "--min-lr", "nan"), "finite number"),
    ("train-clip-negative", lambda w: train(w, "--clip", "-1"), "--clip must be >= 0"),
    ("train-tokens-zero", lambda w: train(w, "--tokens", "0"), "--tokens and --epochs must be at least 1"),
    ("train-lora-rank-full", lambda w: train(w, "--lora-rank", "4"), "--lora-rank applies only with --mode lora"),
    ("train-top-k-without-kd", lambda w: train(w, "--kd-weight", "0", "--top-k", "8"), "--top-k applies only with distillation"),
    ("train-teacher-without-kd", lambda w: train(w, "--kd-weight", "0", "--teacher", model(w)), "--teacher applies"),
    ("train-teacher-missing", lambda w: train(w, "--teacher", w / "nope"), "does not exist"),
    ("train-teacher-nan", lambda w: train(w, "--teacher", w / "nan"), "non-finite weights"),
    ("train-nan-input", lambda w: train(w, source=w / "nan"), "non-finite weights"),
    ("train-six-layer-config", lambda w: train(w, source=w / "sixlayers"), "says 6 blocks"),
    ("train-resume-nothing", lambda w: train(w, "--resume"), "nothing to resume"),
    ("train-seq-past-positions", lambda w: ["train", model(w), "--train-seq-len", "300", "--out", w / "o"],
     "--train-seq-len 300 is longer than the model's 256 positions"),
    ("train-calib-samples", lambda w: train(w, "--calib-samples", "8"), "unrecognized arguments: --calib-samples"),
    ("train-calib-missing", lambda w: train(w, "--calib", w / "nope.txt"), "unknown text source"),
    ("train-text-field-plain", lambda w: train(w, "--calib", w / "corpus.txt", "--text-field", "body"),
     "--text-field applies only"),
    ("train-prune-score-alone", lambda w: train(w, "--prune-score", "wanda"), "--prune-score applies only with gradual pruning"),
    ("train-width-amplitude-alone", lambda w: train(w, "--prune-width", "0.2", "--width-amplitude", "0.1"),
     "--width-amplitude applies only with --width-allocation adapt-pruner"),
]

EVAL = [
    ("eval-model-missing", lambda w: ["eval", w / "nope"], "does not exist"),
    ("eval-model-missing-tasks", lambda w: ["eval", w / "nope", "--tasks", "hellaswag"], "does not exist"),
    ("eval-data-binary", lambda w: ["eval", model(w), "--data", w / "binary.txt"], "binary file"),
    ("eval-data-empty", lambda w: ["eval", model(w), "--data", w / "empty.txt"], "is empty"),
    ("eval-batch-size-zero", lambda w: ["eval", model(w), "--batch-size", "0"], "--batch-size must be at least 1"),
    ("eval-seq-len-one", lambda w: ["eval", model(w), "--seq-len", "1"], "--seq-len must be at least 2"),
    ("eval-windows-zero", lambda w: ["eval", model(w), "--windows", "0"], "--windows must be at least 1"),
    ("eval-seq-len-past-positions", lambda w: ["eval", model(w), "--data", w / "corpus.txt", "--seq-len", "300"],
     "--seq-len 300 is longer than the model's 256 positions"),
    ("eval-text-field-plain", lambda w: ["eval", model(w), "--data", w / "corpus.txt", "--text-field", "x"],
     "--text-field applies only with perplexity on a .jsonl"),
    ("eval-nan-model", lambda w: ["eval", w / "nan", "--data", w / "corpus.txt", "--seq-len", "32"], "non-finite"),
    ("eval-truncated-weights", lambda w: ["eval", w / "truncated"], "is truncated"),
    ("eval-tasks-unknown", lambda w: tasks(w, "--tasks", "no_such_task"), "unknown task"),
    ("eval-tasks-offline", lambda w: ["eval", model(w), "--tasks", "hellaswag"], "could not be fetched"),
    ("eval-tasks-limit-zero", lambda w: tasks(w, "--limit", "0"), "--limit must be at least 1"),
    ("eval-tasks-fewshot-negative", lambda w: tasks(w, "--num-fewshot", "-1"), "--num-fewshot must be at least 0"),
    ("eval-tasks-include-missing", lambda w: tasks(w, "--include-path", w / "nope"), "not a directory of task files"),
    ("eval-tasks-with-data", lambda w: tasks(w, "--data", w / "corpus.txt"), "--data applies only with perplexity"),
    ("eval-limit-without-tasks", lambda w: ["eval", model(w), "--limit", "3"], "only with --tasks"),
    ("eval-results-inside-model", lambda w: tasks(w, "--results", model(w) / "x.json"), "lies inside the input"),
    ("eval-results-is-model", lambda w: tasks(w, "--results", model(w)), "must end in .json"),
    ("eval-results-exists", lambda w: tasks(w, "--results", w / "done.json"), "already exists"),
    ("eval-results-not-json", lambda w: tasks(w, "--results", w / "results.txt"), "must end in .json"),
    ("eval-results-a-directory", lambda w: tasks(w, "--results", w / "notdataset"), "must end in .json"),
    ("eval-results-under-a-file", lambda w: tasks(w, "--results", w / "afile" / "r.json"), "not a writable"),
    ("eval-results-in-include", lambda w: tasks(w, "--include-path", w / "notdataset", "--results",
                                                w / "notdataset" / "r.json"), "lies inside the input"),
    ("eval-new-tokens-zero", lambda w: ["eval", model(w), "--generate", "--new-tokens", "0"], "at least 1"),
    ("eval-generate-with-tasks", lambda w: ["eval", model(w), "--generate", "--tasks", "x"], "give --tasks or --generate, not both"),
    ("eval-reference-missing", lambda w: ["eval", model(w), "--generate", "--reference", w / "nope"], "does not exist"),
    ("eval-device-unknown", lambda w: ["eval", model(w), "--device", "tpu"], "not a device"),
]

INFO = [
    ("info-broken-config", lambda w: ["info", w / "brokencfg"], "cannot read the model's config.json"),
    ("info-missing", lambda w: ["info", w / "nope"], "does not exist"),
    ("info-truncated-weights", lambda w: ["info", w / "truncated"], "is truncated"),
    ("info-bad-manifest", lambda w: ["info", w / "history-int"], "history is int"),
    ("info-six-layers", lambda w: ["info", w / "sixlayers"], "says 6 blocks"),
]

BENCH = [
    ("bench-missing", lambda w: ["bench", w / "nope"], "does not exist"),
    ("bench-not-a-model", lambda w: ["bench", w / "weights.bin"], "not a .gguf"),
    ("bench-prompt-zero", lambda w: ["bench", model(w), "--prompt", "0"], "--prompt must be at least 1"),
    ("bench-new-tokens-zero", lambda w: ["bench", model(w), "--new-tokens", "0"], "--new-tokens must be at least 1"),
    ("bench-prompt-negative", lambda w: ["bench", w / "garbage.gguf", "--engine", "llama.cpp", "--prompt", "-1"],
     "--prompt must be at least 0"),
    ("bench-both-zero", lambda w: ["bench", w / "garbage.gguf", "--engine", "llama.cpp", "--prompt", "0",
                                   "--new-tokens", "0"], "leave nothing to time"),
    ("bench-repeats-zero", lambda w: ["bench", model(w), "--repeats", "0"], "--repeats must be at least 1"),
    ("bench-rounds-zero", lambda w: ["bench", model(w), "--rounds", "0"], "--rounds must be at least 1"),
    ("bench-threads-zero", lambda w: ["bench", w / "garbage.gguf", "--engine", "llama.cpp", "--threads", "0"],
     "--threads must be at least 1"),
    ("bench-device-llama", lambda w: ["bench", w / "garbage.gguf", "--engine", "llama.cpp", "--device", "cpu"],
     "--device applies only with --engine hf"),
    ("bench-nonfinite-llama", lambda w: ["bench", w / "garbage.gguf", "--engine", "llama.cpp", "--allow-nonfinite"],
     "--allow-nonfinite applies only with --engine hf"),
    ("bench-llama-not-gguf", lambda w: ["bench", model(w), "--engine", "llama.cpp", "--llama-cpp", w],
     "times .gguf files"),
    ("bench-llama-binary-missing", lambda w: ["bench", w / "garbage.gguf", "--engine", "llama.cpp", "--llama-cpp",
                                              w / "notdataset"], "llama-bench not found"),
    ("bench-threads-hf", lambda w: ["bench", model(w), "--threads", "2"], "--threads applies only with --engine llama.cpp"),
    ("bench-device-unknown", lambda w: ["bench", model(w), "--device", "tpu"], "not a device"),
    ("bench-nan-weights", lambda w: ["bench", w / "nan", "--rounds", "1", "--repeats", "1", "--prompt", "4",
                                     "--new-tokens", "2"], "non-finite weights"),
]

EXPORT = [
    ("export-inside-model", lambda w: export(w, gguf=model(w) / "x.gguf"), "lies inside the input"),
    ("export-not-gguf-name", lambda w: export(w, gguf=w / "x.bin"), "must end in .gguf"),
    ("export-is-model-dir", lambda w: export(w, gguf=model(w)), "must end in .gguf"),
    ("export-exists", lambda w: export(w, gguf=w / "existing.gguf"), "already exists"),
    ("export-overwrite-not-gguf", lambda w: export(w, "--overwrite", gguf=w / "existing.gguf"), "is not one"),
    ("export-a-directory", lambda w: export(w, "--overwrite", gguf=w / "dir.gguf"), "is a directory"),
    ("export-under-a-file", lambda w: export(w, gguf=w / "afile" / "x.gguf"), "not a writable directory"),
    ("export-holds-input", lambda w: export(w, source=w / "garbage.gguf", gguf=w / "garbage.gguf"), "is the input"),
    ("export-gguf-input", lambda w: export(w, source=w / "foreign.gguf"), "a GGUF file is already GGUF"),
    ("export-missing-model", lambda w: export(w, source=w / "nope"), "does not exist"),
    ("export-type-unknown", lambda w: export(w, "--type", "q4_k"), "invalid choice"),
    ("export-tokenizer-pre-unknown", lambda w: export(w, "--tokenizer-pre", "no-such-pre"),
     "is not a pre-tokenizer llama.cpp knows"),
    ("export-family-unsupported", lambda w: export(w, source=w / "gpt2"), "GGUF export supports"),
    ("export-nan", lambda w: export(w, source=w / "nan"), "non-finite weights"),
    ("export-truncated", lambda w: export(w, source=w / "truncated"), "is truncated"),
    ("export-six-layers", lambda w: export(w, source=w / "sixlayers"), "says 6 blocks"),
    ("export-bad-manifest", lambda w: export(w, source=w / "widths-garbage"), "structure.widths"),
]

REPORT = [
    ("report-out-is-model", lambda w: report(w, "--overwrite", out=model(w)), "is the input"),
    ("report-out-holds-model", lambda w: report(w, "--overwrite", out=w), "contains the input"),
    ("report-out-inside-model", lambda w: report(w, out=model(w) / "r"), "lies inside the input"),
    ("report-out-a-file", lambda w: report(w, "--overwrite", out=w / "afile"), "exists and is not a directory"),
    ("report-out-exists", lambda w: report(w, out=w / "stuff"), "already exists"),
    ("report-overwrite-someones-folder", lambda w: report(w, "--overwrite", out=w / "stuff"), "holds no report.md"),
    ("report-bench-inside-out", lambda w: report(w, "--bench", w / "rep" / "bench.json", "--overwrite", out=w / "rep"),
     "contains the input"),
    ("report-tasks-inside-out", lambda w: report(w, "--tasks-results", w / "rep" / "bench.json", "--overwrite",
                                                 out=w / "rep"), "contains the input"),
    ("report-samples-inside-out", lambda w: report(w, "--samples", w / "rep" / "bench.json", "--overwrite",
                                                   out=w / "rep"), "contains the input"),
    ("report-out-is-bench", lambda w: report(w, "--bench", w / "bench.json", "--overwrite", out=w / "bench.json"),
     "is the input"),
    ("report-bench-missing", lambda w: report(w, "--bench", w / "nope.json"), "cannot read"),
    ("report-bench-not-json", lambda w: report(w, "--bench", w / "corpus.txt"), "cannot read it as JSON"),
    ("report-bench-a-list", lambda w: report(w, "--bench", w / "bench-list.json"), "not an object"),
    ("report-bench-no-results", lambda w: report(w, "--bench", w / "bench-noresults.json"), "no list of results"),
    ("report-tasks-no-tasks", lambda w: report(w, "--tasks-results", w / "tasks-nokey.json"), "has no tasks"),
    ("report-samples-no-samples", lambda w: report(w, "--samples", w / "samples-nokey.json"), "has no samples"),
    ("report-model-missing", lambda w: report(w, source=w / "nope"), "is not a model directory"),
    ("report-model-no-weights", lambda w: report(w, source=w / "notdataset"), "holds no safetensors"),
    ("report-model-truncated", lambda w: report(w, source=w / "truncated"), "is truncated"),
    ("report-manifest-broken", lambda w: report(w, source=w / "badmanifest"), "not valid JSON"),
    ("report-under-a-file", lambda w: report(w, out=w / "afile" / "r"), "not a writable directory"),
]

PLAN = [
    ("plan-out-is-model", lambda w: ["plan", model(w), "--target", "params=1M", "--out", model(w), "--overwrite"],
     "is the input"),
    ("plan-out-holds-model", lambda w: ["plan", model(w), "--target", "params=1M", "--out", w, "--overwrite"],
     "contains the input"),
    ("plan-out-inside-model", lambda w: ["plan", model(w), "--target", "params=1M", "--out", model(w) / "p"],
     "lies inside the input"),
    ("plan-out-holds-calib", lambda w: ["plan", w / "notokenizer", "--target", "params=1M", "--calib",
                                        w / "rdir" / "good.toml", "--out", w / "rdir", "--overwrite"],
     "contains the input"),
    ("plan-out-exists", lambda w: plan(w)[:-1] + [w / "stuff"], "already exists"),
    ("plan-overwrite-someones-folder", lambda w: plan(w, "--overwrite")[:-1] + [w / "stuff"], "holds no plan.json"),
    ("plan-no-target", lambda w: ["plan", model(w), "--out", w / "o"], "--target is required"),
    ("plan-bad-target", lambda w: ["plan", model(w), "--target", "speed=2", "--out", w / "o"], "METRIC=VALUE"),
    ("plan-keep-range", lambda w: plan(w, "--keep", "1.5"), "--keep must be in (0, 1)"),
    ("plan-margin-nan", lambda w: plan(w, "--margin", "nan"), "--margin must be a finite number"),
    ("plan-budget-inf", lambda w: plan(w, "--budget-minutes", "inf"), "finite number"),
    ("plan-margin-for-params", lambda w: plan(w, "--margin", "0.1"), "--margin applies only with a speed target"),
    ("plan-calib-missing", lambda w: plan(w, "--calib", w / "nope.txt"), "unknown text source"),
    ("plan-family", lambda w: plan(w, source=w / "gpt2"), "describes decoders"),
    ("plan-nan-model", lambda w: plan(w, source=w / "nan"), "non-finite weights"),
    ("plan-six-layers", lambda w: plan(w, source=w / "sixlayers"), "says 6 blocks"),
    ("plan-seq-past-positions", lambda w: plan(w, "--calib-seq-len", "300"), "--calib-seq-len 300 is longer"),
    ("plan-truncated", lambda w: plan(w, source=w / "truncated"), "is truncated"),
]

CASES = [*PRUNE, *TRAIN, *EVAL, *INFO, *BENCH, *EXPORT, *REPORT, *PLAN]


def _tree(root):
    """Every path under `root` (files and directories) and the content hash of all files."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")), content_hash(root)


@pytest.fixture
def offline(monkeypatch):
    """lm-eval's hub datasets fail at once, as they do without a network (never a download in tests)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line_before_writing(case, workspace, capsys, offline):
    _, argv, fragment = case
    before = _tree(workspace)
    code = main([str(a) for a in argv(workspace)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and fragment in err[-1], err
    assert err[-1].startswith("secateur: error: ")
    assert _tree(workspace) == before  # nothing written, nothing left behind, every input unchanged


def test_the_table_covers_every_command():
    assert len(CASES) >= 150
    commands = {c[1](__import__("pathlib").Path("/w"))[0] for c in CASES}
    assert commands == {"prune", "train", "eval", "info", "bench", "export", "report", "plan"}
