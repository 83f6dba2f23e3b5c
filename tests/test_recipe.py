"""Recipes of stages: composition in memory and across runs, replay, zeros kept, order checks, and one
schema for flags and recipe keys in which no option is silently ignored."""

import json

import pytest
from conftest import calibration_ids, tiny_model
from safetensors.torch import load_file

import secateur
from secateur import NM, ConfigError, PruneConfig, SparseGPTConfig, Unstructured, WandaConfig
from secateur.cli import main
from secateur.config import MagnitudeConfig
from secateur.vocabulary import VocabularyConfig
from secateur.io import content_hash
from secateur.models import adapter_for, read_weight
from secateur.settings import CALIB_OPTIONS, RUN_OPTIONS, flag_options
from secateur.sparsity.prune import target_layers
from secateur.recipe import KINDS, build_stage, stage_settings

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "2", "--eval-seq-len", "32"]


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def weights(path):
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def zeros(model):
    return {name: read_weight(m) == 0 for name, m in target_layers(model, adapter_for(model))}


# --- sparsity stages keep the zeros they find --------------------------------------------------------


@pytest.mark.parametrize("first,second", [
    (PruneConfig(WandaConfig(), Unstructured(0.5)), PruneConfig(SparseGPTConfig(), Unstructured(0.7))),
    (PruneConfig(SparseGPTConfig(), Unstructured(0.5)), PruneConfig(SparseGPTConfig(), Unstructured(0.7))),
    (PruneConfig(MagnitudeConfig(), Unstructured(0.5)), PruneConfig(WandaConfig(), Unstructured(0.7))),
    (PruneConfig(WandaConfig(), Unstructured(0.5)), PruneConfig(SparseGPTConfig(), NM(2, 4))),
    (PruneConfig(SparseGPTConfig(), Unstructured(0.5)), PruneConfig(WandaConfig(), NM(2, 4))),
], ids=["wanda50-sparsegpt70", "sparsegpt50-70", "magnitude50-wanda70", "wanda50-sparsegpt24", "sparsegpt50-wanda24"])
def test_a_sparsity_stage_keeps_the_zeros_it_finds(first, second):
    model = tiny_model("llama")
    secateur.prune(model, first, calibration_ids())
    before = zeros(model)
    secateur.prune(model, second, calibration_ids())
    after = zeros(model)
    for name, mask in before.items():
        assert not (mask & ~after[name]).any(), f"{name}: an earlier zero came back"
        weight = read_weight(dict(target_layers(model, adapter_for(model)))[name])
        if isinstance(second.target, NM):  # at most N non-zeros in every group of M inputs
            assert int(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) > 2).sum()) == 0
        else:  # exact: each layer at 70% (the earlier 50% lies inside it)
            assert float(after[name].float().mean()) == pytest.approx(0.7, abs=2e-3)


def test_python_recipe_runs_depth_width_sparsity_in_order():
    model = tiny_model("llama")
    recipe = [secateur.DepthConfig(secateur.AngularConfig(), secateur.Amount(count=1)), secateur.WidthConfig(0.3),
              PruneConfig(SparseGPTConfig(), NM(2, 4))]
    report = secateur.prune(model, recipe, calibration_ids())
    assert [s["kind"] for s in report.stages] == ["depth", "width", "sparsity"]
    assert model.config.num_hidden_layers == 1 and report.stages[2]["result"]["sparsity"] == pytest.approx(0.5)
    assert model(input_ids=calibration_ids(1, 8)).logits.isfinite().all()


@pytest.mark.parametrize("recipe,message", [
    ([PruneConfig(WandaConfig(), NM(2, 4)), secateur.WidthConfig(0.3)], "breaks the N:M groups"),
    ([PruneConfig(WandaConfig(), Unstructured(0.5)),
      secateur.DepthConfig(secateur.AngularConfig(), secateur.Amount(count=1), compensate=True)], "fill the zeros"),
])  # fmt: skip
def test_an_order_that_undoes_a_stage_is_refused_before_anything_runs(recipe, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        secateur.prune(model, recipe, calibration_ids())
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


# --- across runs: any output is an input -------------------------------------------------------------


def test_one_recipe_equals_three_cli_runs_bit_for_bit(model_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'calib = "{text_file}"\ncalib-samples = 4\ncalib_seq_len = 32\neval_windows = 2\neval_seq_len = 32\n'
                      '[[stage]]\nmethod = "angular"\nremove_blocks = 1\n'
                      '[[stage]]\nmethod = "width"\nremove_fraction = 0.3\nallocation = "adaptive"\nround_to = 8\n'
                      '[[stage]]\nmethod = "sparsegpt"\npattern = "2:4"\n')  # fmt: skip
    source = model_dir("qwen3")
    code, out = run(["prune", source, "--recipe", recipe, "--out", tmp_path / "one"], capsys)
    assert code == 0, out.err
    chain = [["--method", "angular", "--remove-blocks", "1"],
             ["--method", "width", "--remove-fraction", "0.3", "--allocation", "adaptive", "--round-to", "8"],
             ["--method", "sparsegpt", "--pattern", "2:4"]]  # fmt: skip
    previous = source
    for index, flags in enumerate(chain):
        code, out = run(["prune", previous, *flags, "--calib", text_file, *SMALL, "--out", tmp_path / f"c{index}"], capsys)
        assert code == 0, out.err
        previous = tmp_path / f"c{index}"
    one, three = weights(tmp_path / "one"), weights(previous)
    assert one.keys() == three.keys() and all(one[k].equal(three[k]) for k in one)
    manifest = json.loads((previous / "secateur.json").read_text())
    assert [h["kind"] for h in manifest["history"]] == ["depth", "width", "sparsity"]
    assert manifest["origin"]["path"] == str(source.resolve())
    model, _ = secateur.load(previous)
    assert model.config.num_hidden_layers == 1
    assert all(float((read_weight(m) == 0).float().mean()) == 0.5 for _, m in target_layers(model, adapter_for(model)))


def test_finercut_then_wanda_keeps_the_removals_and_the_parameter_count(model_dir, text_file, tmp_path, capsys):
    code, out = run(["prune", model_dir("llama"), "--method", "finercut", "--remove-sublayers", "1", "--calib", text_file,
                     *SMALL, "--out", tmp_path / "fc"], capsys)  # fmt: skip
    assert code == 0, out.err
    code, out = run(["prune", tmp_path / "fc", "--method", "wanda", "--calib", text_file, *SMALL, "--out",
                     tmp_path / "w"], capsys)  # fmt: skip
    assert code == 0, out.err
    first, second = (json.loads((tmp_path / p / "secateur.json").read_text()) for p in ("fc", "w"))
    assert second["structure"]["removed_sublayers"] == first["structure"]["removed_sublayers"] != []
    assert second["structure"]["parameters"] == first["structure"]["parameters"]
    assert weights(tmp_path / "w").keys() == weights(tmp_path / "fc").keys()  # no branch came back
    model, _ = secateur.load(tmp_path / "w")
    assert sum(p.numel() for p in model.parameters()) == first["structure"]["parameters"]


def test_adaptive_widths_round_to_a_multiple_when_asked():
    from secateur.width import width_prune

    widths = {}
    for round_to in (None, 8):
        config = secateur.WidthConfig(0.3, allocation="adaptive", round_to=round_to, bias_compensation=False)
        widths[round_to] = [w.channels for w in width_prune(tiny_model("gemma3_text"), config, calibration_ids()).after]
    assert len(set(widths[8])) > 1 and all(c % 8 == 0 for c in widths[8])  # per-block, and aligned
    assert any(c % 8 for c in widths[None])  # unset: adaptive widths are not rounded
    assert all(abs(a - b) <= 4 for a, b in zip(widths[None], widths[8]))  # each rounded to the nearest multiple


def test_adaptive_width_output_prunes_again(model_dir, text_file, tmp_path, capsys):
    """Per-block widths come back on load, sparsity keeps them, and the next output records them again."""
    code, out = run(["prune", model_dir("gemma3_text"), "--method", "width", "--remove-fraction", "0.3", "--allocation",
                     "adaptive", "--no-bias-compensation", "--calib", text_file, *SMALL, "--out", tmp_path / "a"], capsys)
    assert code == 0, out.err
    code, out = run(["prune", tmp_path / "a", "--method", "wanda", "--sparsity", "0.5", "--calib", text_file, *SMALL,
                     "--out", tmp_path / "b"], capsys)  # fmt: skip
    assert code == 0, out.err
    assert json.loads((tmp_path / "b" / "secateur.json").read_text())["structure"]["uniform_widths"] is False


def test_replaying_a_manifest_reproduces_the_weights(model_dir, text_file, tmp_path, capsys):
    source = model_dir("llama")
    code, out = run(["prune", source, "--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "owl", "--refine",
                     "dsnot", "--calib", text_file, *SMALL, "--out", tmp_path / "a"], capsys)  # fmt: skip
    assert code == 0, out.err
    code, out = run(["prune", source, "--recipe", tmp_path / "a" / "secateur.json", "--out", tmp_path / "b"], capsys)
    assert code == 0, out.err
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(a[k].equal(b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / p / "secateur.json").read_text())["recipe"] for p in ("a", "b"))
    assert ra == rb


def test_order_across_runs_is_checked_from_the_history(model_dir, text_file, tmp_path, capsys):
    code, out = run(["prune", model_dir("llama"), "--method", "wanda", "--pattern", "2:4", "--calib", text_file, *SMALL,
                     "--out", tmp_path / "s"], capsys)  # fmt: skip
    assert code == 0, out.err
    before = content_hash(tmp_path / "s")
    code, out = run(["prune", tmp_path / "s", "--method", "width", "--remove-fraction", "0.2", "--calib", text_file,
                     *SMALL, "--out", tmp_path / "w"], capsys)  # fmt: skip
    assert code == 2 and "breaks the N:M groups" in out.err and not (tmp_path / "w").exists()
    assert content_hash(tmp_path / "s") == before


# --- one schema: every flag, every kind ----------------------------------------------------------------


def sample(option):
    if option.default not in (None, ()):
        return option.default
    return {bool: True, int: 1, float: 0.5, str: "x"}.get(option.type, "x")


def test_every_flag_is_taken_or_refused_by_every_method():
    """No option is silently ignored: a stage key either belongs to the method or is refused, naming its owners."""
    stage_keys = [k for k in flag_options() if k not in CALIB_OPTIONS and k not in RUN_OPTIONS]
    base = {"width": {"remove_fraction": 0.3}, "depth": {"remove_fraction": 0.3}, "sparsity": {}, "recovery": {},
            "experts": {"remove_fraction": 0.3}, "vocabulary": {"coverage": 0.99}}
    checked = 0
    for kind in KINDS.values():
        for method in kind.methods():
            own = kind.options(method)
            for key in stage_keys:
                settings = {"method": method, **base[kind.name], key: sample(flag_options()[key][0])}
                if key in own:
                    try:
                        build_stage(settings)
                    except ConfigError as exc:
                        assert "belongs to" not in str(exc), (method, key, exc)
                else:
                    with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} belongs to"):
                        build_stage(settings)
                checked += 1
    assert checked == len(stage_keys) * sum(len(k.methods()) for k in KINDS.values())


def test_stage_settings_round_trip_through_build_stage():
    for config in (PruneConfig(SparseGPTConfig(steps=2), NM(2, 8), ignore=("*.down_proj",)),
                   build_stage({"method": "ria", "sparsity": 0.6, "allocation": "owl", "module_sparsity": "mlp=0.7",
                                "refine": "dsnot,reconstruct"}),
                   secateur.DepthConfig(secateur.AngularConfig("last"), secateur.Amount(fraction=0.2), compensate=True),
                   secateur.DepthConfig(secateur.FinerCutConfig(), secateur.Amount(count=3)),
                   secateur.WidthConfig(0.4, allocation="adaptive", hidden_fraction=0.1),
                   VocabularyConfig(keep_tokens=3000)):  # fmt: skip
        settings = stage_settings(config)
        assert build_stage(json.loads(json.dumps(settings))) == config, settings


@pytest.mark.parametrize("toml,message", [
    ('method = "angular"\nremove_blocks = 1\ncompensate = "false"\n', "--compensate must be true or false"),
    ('method = "angular"\nremove_blocks = 1.7\n', "--remove-blocks must be an integer"),
    ('method = "wanda"\nsparsity = "0.5"\n', "--sparsity must be a number"),
    ('method = "wanda"\nscope = "rows"\n', "--scope must be one of"),
    ('method = 3\n', "method must be a string"),
    ('method = "prune-it"\n', "unknown method"),
    ('calib_samples = 4\n[[stage]]\nmethod = "wanda"\n[[stage]]\nmethod = "magnitude"\ndtype = "float16"\n',
     "are run options"),
    ('sparsity = 0.5\n[[stage]]\nmethod = "wanda"\n', "go inside a table"),
    ('stage = 3\n', "[[stage]] tables"),
    ('method = "magnitude"\ncalib_samples = 4\n', "do not apply: no stage reads calibration"),
    ('method = "width"\nremove_fraction = 0.2\nheads = "all"\n', "--heads must be one of"),
])  # fmt: skip
def test_bad_recipe_values_are_refused(toml, message, model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(toml)
    code, out = run(["prune", model_dir("llama"), "--recipe", recipe, "--out", tmp_path / "o"], capsys)
    assert code == 2 and message in out.err, out.err
    assert not (tmp_path / "o").exists()


def test_stage_flags_with_a_multi_stage_recipe_are_refused(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[stage]]\nmethod = "magnitude"\n[[stage]]\nmethod = "magnitude"\npattern = "2:4"\n')
    code, out = run(["prune", model_dir("llama"), "--recipe", recipe, "--sparsity", "0.4", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--sparsity: with a multi-stage recipe" in out.err
    code, out = run(["prune", model_dir("llama"), "--recipe", recipe, "--out", tmp_path / "o"], capsys)
    assert code == 0, out.err
    model, _ = secateur.load(tmp_path / "o")
    weight = read_weight(model.model.layers[0].mlp.up_proj)
    assert (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1).le(2).all()  # 2:4 holds over the 50% zeros
    assert float((weight == 0).float().mean()) > 0.5
