"""Width pruning: formulas, GQA legality, exactness of slicing, bias compensation, save and reload."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur.cli import main
from secateur.errors import ConfigError
from secateur.io import load, save
from secateur.models import adapter_for
from secateur.calibrate.stats import Moments
from secateur.width import IMPORTANCE, WidthConfig, WidthError, width_prune
from secateur.width.scores import standardize
from secateur.width.structure import (
    compensate,
    ensure_bias,
    keep_channels,
    keep_heads,
    write_uniform_config,
)
from secateur.models.shapes import layer_width
from secateur.width.units import Units, adaptive_removals, uniform_removals

HEAD_FAMILIES = [f for f in FAMILIES if f not in ("gpt2", "opt", "gpt_neox")]


def moments_of(x: torch.Tensor) -> Moments:
    m = Moments(x.shape[-1], "cpu")
    m.update(x)
    return m


def calibration(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# --- formulas ---------------------------------------------------------------------------------------


def test_moments_mean_variance_norm():
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, -2.0]])
    m = moments_of(x)
    assert torch.allclose(m.mean, torch.tensor([3.0, 2 / 3]))
    assert torch.allclose(m.variance, torch.tensor([8 / 3, 32 / 9]))  # population variance
    assert torch.allclose(m.norm, torch.tensor([35**0.5, 12**0.5]))


def test_column_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])  # (out, in)
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # input channel 0: mean 2, var 1, norm sqrt(10); channel 1: var 1, norm 2
    stats = moments_of(x)
    assert torch.allclose(IMPORTANCE["magnitude"].columns(w, None, None), torch.tensor([10.0, 4.25]))
    assert torch.allclose(IMPORTANCE["activation"].columns(w, stats, None), torch.tensor([4 * 10**0.5, 2.5 * 2]))
    # FLAP: variance (not the norm, not the mean square) times the squared column norm
    assert torch.allclose(IMPORTANCE["fluctuation"].columns(w, stats, None), torch.tensor([1 * 10.0, 1 * 4.25]))
    # with no bias to restore the mean, the error of dropping column j is E[X_j^2] ||W_:,j||^2
    assert torch.allclose(IMPORTANCE["fluctuation"].columns_without_compensation(w, stats, None),
                          torch.tensor([5 * 10.0, 2 * 4.25]))  # fmt: skip
    for name in ("magnitude", "activation"):  # these already see the mean, or no input at all
        imp = IMPORTANCE[name]
        assert torch.equal(imp.columns_without_compensation(w, stats, None), imp.columns(w, stats, None))
    g = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
    assert torch.allclose(IMPORTANCE["taylor"].columns(w, None, g), torch.tensor([1 + 3.0, 2 + 1.0]))  # |w g| summed


def test_row_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stats = moments_of(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    assert torch.allclose(IMPORTANCE["magnitude"].rows(w, None, None), torch.tensor([5.0, 9.25]))
    assert torch.allclose(IMPORTANCE["activation"].rows(w, stats, None), torch.tensor([10**0.5 + 4, 3 * 10**0.5 + 1]))
    assert torch.equal(IMPORTANCE["fluctuation"].rows(w, stats, None), torch.zeros(2))


def test_standardize_per_layer():
    z = standardize(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(z, torch.tensor([-1.0, 0.0, 1.0]))


# --- allocation ---------------------------------------------------------------------------------------


def test_uniform_removals_heads_then_channels_make_the_target():
    units = [Units(b, "attention", torch.rand(3), 100) for b in range(2)]
    units += [Units(b, "mlp", torch.rand(64), 10) for b in range(2)]
    removals = uniform_removals(units, 0.5, target=1000.0, round_to=8)
    assert removals[(0, "attention")] == removals[(1, "attention")] == 2  # round(1.5) half up
    # 1000 - 2 * 2 * 100 = 600 left over 2 blocks at 10 each: 30 channels per block, kept 34 -> rounded to 32
    assert removals[(0, "mlp")] == removals[(1, "mlp")] == 32


def test_attention_fraction_sets_the_split_and_the_mlp_makes_up_the_parameters():
    # tiny llama block: attention 64x64 + 2 x 64x32 + 64x64 = 12,288 (a key/value group of 2 heads is 6,144),
    # MLP 3 x 64 x 128 = 24,576 (a channel is 192); 50% of 36,864 is 18,432
    def widths(**extra):
        model = tiny_model("llama")
        report = width_prune(model, WidthConfig(0.5, "magnitude", "uniform", "kv-groups", **extra), None)
        assert report.block_parameters_before - report.block_parameters_after == 2 * 18_432  # both splits: exactly
        return {(w.attention_heads, w.key_value_heads, w.channels) for w in report.after}

    assert widths() == {(2, 1, 64)}  # round(0.5 x 2 groups) = 1 group (6,144), then 64 channels (12,288)
    assert widths(attention_fraction=0.0) == {(4, 2, 32)}  # no group: 96 channels make the 18,432
    with pytest.raises(WidthError, match="removes 0.01M attention parameters, more than"):
        # 15%: 5,530 parameters, less than one group; refused before any calibration pass (none is given)
        width_prune(tiny_model("llama"), WidthConfig(0.15, "fluctuation", "uniform", "kv-groups",
                                                     attention_fraction=0.5), None)  # fmt: skip
    with pytest.raises(ConfigError, match="uniform allocation only"):
        WidthConfig(0.5, allocation="adaptive", attention_fraction=0.3)
    with pytest.raises(ConfigError, match="needs heads to remove"):
        WidthConfig(0.5, heads="none", attention_fraction=0.3)
    with pytest.raises(WidthError, match="heads are not pruned: drop --attention-fraction"):  # gpt2: heads resolve to none
        width_prune(tiny_model("gpt2"), WidthConfig(0.5, "magnitude", attention_fraction=0.3), None)


def test_adaptive_removals_rank_standardised_scores_and_keep_one_unit():
    a = Units(0, "mlp", torch.tensor([0.0, 10.0, 20.0]), 1)
    b = Units(1, "mlp", torch.tensor([100.0, 101.0, 1000.0]), 1)  # standardised, b's first two rank low too
    removals = adaptive_removals([a, b], target=4)
    assert removals == {(0, "mlp"): 2, (1, "mlp"): 2}
    assert adaptive_removals([a, b], target=100) == {(0, "mlp"): 2, (1, "mlp"): 2}  # never the last unit


# --- structure ---------------------------------------------------------------------------------------


def _zero_heads(block, adapter, heads: list[int], size: int) -> None:
    attention = adapter.width.attention
    o = block.get_submodule(attention.o)
    with torch.no_grad():
        for h in heads:
            o.weight[:, h * size:(h + 1) * size] = 0


@pytest.mark.parametrize("family", [f for f in HEAD_FAMILIES if f != "phi3"])  # phi3: per-block heads impossible
def test_removing_zeroed_heads_and_channels_keeps_logits(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    size = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // 4
    ids = calibration(2, 16)
    block = adapter.block_list(model)[0]
    _zero_heads(block, adapter, [0, 2], size)  # heads 0 and 2: one of each key/value group (4 heads, 2 groups)
    consumer = block.get_submodule(adapter.width.mlp.consumer)
    with torch.no_grad():
        consumer.weight[:, [1, 5, 7]] = 0
        before = model(ids).logits
    keep_heads(block, adapter.width.attention, size, torch.tensor([1, 3]), torch.tensor([0, 1]))
    keep_channels(block, adapter.width.mlp, torch.tensor([i for i in range(128) if i not in (1, 5, 7)]))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_removing_a_zeroed_kv_group_keeps_logits(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    size = model.config.hidden_size // 4
    blocks = adapter.block_list(model)
    for block in blocks:
        _zero_heads(block, adapter, [2, 3], size)  # both query heads of group 1
    ids = calibration(2, 16)
    with torch.no_grad():
        before = model(ids).logits
    for block in blocks:
        keep_heads(block, adapter.width.attention, size, torch.tensor([0, 1]), torch.tensor([0]))
    write_uniform_config(model, adapter.width, [layer_width(b, adapter.width, size) for b in blocks], size)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    with torch.no_grad():
        assert torch.allclose(before, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])
def test_removing_zeroed_channels_keeps_logits_with_biases(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    block = adapter.block_list(model)[0]
    consumer = block.get_submodule(adapter.width.mlp.consumer)
    with torch.no_grad():
        if family == "gpt2":
            consumer.weight[[2, 9], :] = 0  # Conv1D stores (in, out)
        else:
            consumer.weight[:, [2, 9]] = 0
        ids = calibration(2, 16)
        before = model(ids).logits
    keep_channels(block, adapter.width.mlp, torch.tensor([i for i in range(128) if i not in (2, 9)]))
    with torch.no_grad():
        assert torch.allclose(before, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("heads", ["kv-groups", "queries"])
@pytest.mark.parametrize("allocation", ["uniform", "adaptive"])
def test_gqa_ratio_stays_legal(heads, allocation):
    model = tiny_model("llama")
    report = width_prune(model, WidthConfig(0.5, "magnitude", allocation, heads), None)
    for w in report.after:
        assert w.attention_heads % w.key_value_heads == 0 and w.attention_heads >= w.key_value_heads >= 1
        if heads == "queries":
            assert w.key_value_heads == 2
    ids = calibration(1, 8)
    assert torch.isfinite(model(ids).logits).all()


@torch.no_grad()
def test_bias_compensation_lowers_layer_error():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4, bias=False)
    x = torch.randn(500, 6) + torch.tensor([3.0, -2.0, 0.0, 1.0, 0.5, 4.0])  # channels with large means
    dense = layer(x)
    removed, keep = torch.tensor([0, 5]), torch.tensor([1, 2, 3, 4])
    ensure_bias(layer)
    plain = x[:, keep] @ layer.weight[:, keep].T  # removed, no compensation
    compensate(layer, removed, moments_of(x).mean)
    compensated = x[:, keep] @ layer.weight[:, keep].T + layer.bias
    assert (compensated - dense).square().mean() < 0.5 * (plain - dense).square().mean()
    # what is left is only the removed channels' fluctuation around their mean
    centred = (x[:, removed] - x[:, removed].mean(0)) @ layer.weight[:, removed].T
    assert torch.allclose(dense - compensated, centred, atol=1e-4)
    # the folded bias is exactly W[:, removed] @ mean[removed]
    assert torch.allclose(layer.bias, layer.weight[:, removed] @ x[:, removed].mean(0), atol=1e-4)


def test_fraction_is_reached_and_parameters_shrink():
    model = tiny_model("llama")
    report = width_prune(model, WidthConfig(0.5, "fluctuation", "uniform", "kv-groups"), calibration())
    assert report.uniform and 0.45 < report.removed_fraction < 0.6
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.config.mlp_bias and model.config.attention_bias  # enabled for compensation


# --- least-squares reconstruction (--reconstruct) ---------------------------------------------------


def _gram(x: torch.Tensor, ones: bool) -> torch.Tensor:
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) if ones else x
    return a.T @ a


def test_refit_folds_a_removed_channel_that_is_a_sum_of_kept_ones():
    from secateur.width.reconstruct import refit_columns

    torch.manual_seed(0)
    x01 = torch.randn(200, 2, dtype=torch.float64)
    x = torch.cat([x01, x01.sum(1, keepdim=True)], dim=1)  # channel 2 = channel 0 + channel 1
    weight = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    new, bias, before, after = refit_columns(_gram(x, False), weight, None, torch.tensor([0, 1]), damp=0.0)
    # y0 = x0 + 2 x1 + 3 (x0 + x1) = 4 x0 + 5 x1; y1 = x1 - (x0 + x1) = -x0
    torch.testing.assert_close(new, torch.tensor([[4.0, 5.0], [-1.0, 0.0]], dtype=torch.float64))
    assert bias is None and before > 0.3 and after < 1e-6
    plain = x[:, :2] @ weight[:, :2].T  # the reported error of plain slicing is the real one
    dense = x @ weight.T
    assert before == pytest.approx(float((plain - dense).norm() / dense.norm()), rel=1e-9)


def test_refit_with_a_bias_absorbs_a_constant_channel_as_flap_does():
    from secateur.width.reconstruct import refit_columns

    torch.manual_seed(1)
    x = torch.cat([torch.randn(300, 2, dtype=torch.float64), torch.full((300, 1), 2.0, dtype=torch.float64)], dim=1)
    weight = torch.tensor([[1.0, 1.0, 3.0]], dtype=torch.float64)
    bias = torch.tensor([0.5], dtype=torch.float64)
    new, new_bias, before, after = refit_columns(_gram(x, True), weight, bias, torch.tensor([0, 1]), damp=0.0)
    torch.testing.assert_close(new, weight[:, :2])  # the kept weights were already right
    torch.testing.assert_close(new_bias, torch.tensor([0.5 + 3.0 * 2.0], dtype=torch.float64))  # b + W_R E[x_R]
    assert after < 1e-6 < before
    # a huge ridge keeps the original weights (plain slicing); a wrong Gram size is refused
    new, new_bias, _, after = refit_columns(_gram(x, True), weight, bias, torch.tensor([0, 1]), damp=1e12)
    torch.testing.assert_close(new, weight[:, :2])
    assert float(new_bias) == pytest.approx(0.5, abs=1e-6) and after == pytest.approx(before, rel=1e-3)
    with pytest.raises(ValueError, match="gram"):
        refit_columns(_gram(x, False), weight, bias, torch.tensor([0, 1]), damp=0.0)


@torch.no_grad()
def test_refit_ridge_pulls_towards_the_original_weights():
    from secateur.width.reconstruct import refit_columns

    torch.manual_seed(2)
    x = torch.randn(100, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, dtype=torch.float64)
    keep, gram = torch.tensor([0, 2, 3]), _gram(x, False)
    new, _, _, _ = refit_columns(gram, weight, None, keep, damp=0.5)
    g = gram[keep][:, keep]
    lam = 0.5 * float(g.diagonal().mean())
    expected = torch.linalg.solve(g + lam * torch.eye(3, dtype=torch.float64), gram[keep] @ weight.T + lam * weight[:, keep].T)
    torch.testing.assert_close(new, expected.T)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_reconstruct_lowers_every_layer_error_and_the_output_error(family, tmp_path):
    dense, plain, refit = tiny_model(family), tiny_model(family), tiny_model(family)
    calib = calibration(16, 64)  # 1,024 tokens: well over the widest refit's 128 + 1 features
    width_prune(plain, WidthConfig(0.5, reconstruct=False), calib)  # Gemma 3 refits by default
    report = width_prune(refit, WidthConfig(0.5, reconstruct=True), calib)
    heads = family in HEAD_FAMILIES
    assert len(report.reconstruction) == dense.config.num_hidden_layers * (2 if heads else 1)
    for record in report.reconstruction:
        assert record["error_after"] <= record["error_before"]
    assert sum(r["error_after"] for r in report.reconstruction) < 0.95 * sum(r["error_before"] for r in report.reconstruction)
    assert report.after == widths_of_model(plain)  # the same shapes as without the refit
    ids = calibration(4, 32, seed=5)  # held out

    def kl(model):
        return torch.nn.functional.kl_div(model(ids).logits.log_softmax(-1), dense(ids).logits.log_softmax(-1),
                                          log_target=True, reduction="batchmean")  # fmt: skip

    with torch.no_grad():
        assert kl(refit) < kl(plain)
    save(refit, tiny_tokenizer(), tmp_path / "m", {})
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, refit(ids).logits, rtol=1e-5, atol=1e-5)


def widths_of_model(model):
    from secateur.width.prune import widths_of

    return widths_of(model, adapter_for(model))


def test_reconstruct_refusals():
    with pytest.raises(ConfigError, match="--reconstruct-damp applies only with --reconstruct"):
        WidthConfig(0.3, reconstruct=False, reconstruct_damp=0.1)
    with pytest.raises(WidthError, match="--reconstruct-damp applies only with --reconstruct"):  # off by default here
        width_prune(tiny_model("llama"), WidthConfig(0.3, reconstruct_damp=0.1), calibration())
    with pytest.raises(ConfigError, match="at least 0"):
        WidthConfig(0.3, reconstruct=True, reconstruct_damp=-1.0)
    with pytest.raises(WidthError, match="--reconstruct refits on calibration"):
        width_prune(tiny_model("llama"), WidthConfig(0.3, "magnitude", reconstruct=True), None)
    with pytest.raises(WidthError, match="--heads none"):
        width_prune(tiny_model("phi3"), WidthConfig(0.3, reconstruct=True), calibration())
    report = width_prune(tiny_model("phi3"), WidthConfig(0.3, heads="none", reconstruct=True), calibration())
    assert len(report.reconstruction) == 2


# --- save and reload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_output_reloads_with_stock_from_pretrained(family, tmp_path):
    model = tiny_model(family)
    heads = "kv-groups" if family in HEAD_FAMILIES else "none"
    compensate_bias = family in ("llama", "gpt2", "opt", "gpt_neox")
    config = WidthConfig(0.4, "activation", "uniform", heads, bias_compensation=compensate_bias)
    report = width_prune(model, config, calibration())
    assert report.uniform
    save(model, tiny_tokenizer(), tmp_path / "out", {"width": report.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-5)
        generated = reloaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(generated, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt2"])
def test_adaptive_output_reloads_with_secateur_load_and_stock_remote_code(family, tmp_path):
    model = tiny_model(family)
    heads = "queries" if family in HEAD_FAMILIES else "none"
    config = WidthConfig(0.4, "taylor", "adaptive", heads)
    report = width_prune(model, config, calibration())
    assert not report.uniform and report.remote_code
    save(model, tiny_tokenizer(), tmp_path / "out", {"width": report.to_dict()})
    assert (tmp_path / "out" / "modeling_secateur.py").is_file()
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    reloaded, _ = load(tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()  # the one-liner
    assert isinstance(stock, type(model)) and type(stock) is not type(model)  # the saved subclass
    for other in (reloaded, stock):
        with torch.no_grad():
            torch.testing.assert_close(other(ids).logits, expected, rtol=1e-5, atol=1e-5)
            generated = other.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
            assert torch.equal(generated, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False))


def test_remote_code_is_not_declared_when_a_module_is_gone():
    from secateur.depth.structure import remove_sublayers
    from secateur.models.remote import declare_reshaped, prepare_module

    model = tiny_model("llama")
    remove_sublayers(model, adapter_for(model), [(1, "mlp")])
    assert declare_reshaped(model) is False and prepare_module(model) is None
    assert not hasattr(model.config, "auto_map")


def test_remote_code_declaration_is_rederived_at_save(tmp_path):
    """An adaptive output pruned again to uniform widths must not keep the old per-layer shapes."""
    model = tiny_model("llama")
    assert not width_prune(model, WidthConfig(0.4, "taylor", "adaptive", "queries"), calibration()).uniform
    save(model, tiny_tokenizer(), tmp_path / "adaptive", {})
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "adaptive", trust_remote_code=True).eval()
    report = width_prune(again, WidthConfig(0.6, "magnitude", "uniform", "none"), None)
    assert report.uniform and not report.remote_code
    save(again, tiny_tokenizer(), tmp_path / "uniform", {})
    assert not (tmp_path / "uniform" / "modeling_secateur.py").exists()
    config = json.loads((tmp_path / "uniform" / "config.json").read_text())
    assert "auto_map" not in config and "secateur_layers" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]  # not the saved subclass it was loaded as
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform").eval()
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, again(ids).logits, rtol=1e-5, atol=1e-5)


# --- errors and CLI ------------------------------------------------------------------------------------


def test_refusals_are_specific():
    with pytest.raises(WidthError, match="--heads none"):
        width_prune(tiny_model("gpt2"), WidthConfig(0.3, "magnitude", heads="kv-groups"), None)
    with pytest.raises(WidthError, match="--no-bias-compensation"):
        width_prune(tiny_model("qwen2"), WidthConfig(0.3, "fluctuation", bias_compensation=True), calibration())
    with pytest.raises(WidthError, match="--allocation uniform"):
        width_prune(tiny_model("phi3"), WidthConfig(0.3, "magnitude", "adaptive"), None)
    with pytest.raises(WidthError, match="needs calibration"):
        width_prune(tiny_model("llama"), WidthConfig(0.3, "activation"), None)


def test_cli_width_round_trip(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "narrow"
    code = main(["prune", str(model_dir("llama")), "--method", "width", "--remove-fraction", "0.4", "--allocation",
                 "adaptive", "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--eval-windows", "2", "--eval-seq-len", "32", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "secateur.json").read_text())
    assert manifest["structure"]["uniform_widths"] is False and manifest["recipe"]["stage"][0]["importance"] == "fluctuation"
    assert main(["eval", str(out), "--data", str(text_file), "--seq-len", "32", "--windows", "2"]) == 0
    code = main(["prune", str(model_dir("llama")), "--method", "width", "--sparsity", "0.5", "--out", str(tmp_path / "x")])
    assert code == 2 and "--remove-fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- hidden (embedding) dimension ----------------------------------------------------------------------

HIDDEN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"]


def _zero_hidden(model, channels: list[int]) -> None:
    """Make residual channels identically zero: embedding columns and every writer's rows."""
    from secateur.width.hidden import writers

    adapter = adapter_for(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channels] = 0
        for block in adapter.block_list(model):
            for name in writers(adapter.width):
                block.get_submodule(name).weight[channels] = 0


@pytest.mark.parametrize("family", HIDDEN_FAMILIES)
def test_removing_zeroed_hidden_channels_keeps_logits_and_reloads_stock(family, tmp_path):
    from secateur.width.hidden import keep_hidden

    model = tiny_model(family)
    if family == "gemma3_text":  # make the (1 + w) norm convention matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    gone = [3, 17, 40, 63]  # 60 left: stock configs want hidden_size divisible by the 4 heads
    _zero_hidden(model, gone)
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        before = model(ids).logits
    keep = torch.tensor([i for i in range(64) if i not in gone])
    keep_hidden(model, adapter_for(model), keep)
    assert model.config.hidden_size == 60 and model.get_input_embeddings().weight.shape[1] == 60
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    save(model, tiny_tokenizer(), tmp_path / "out", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        generated = reloaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(generated, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, use_cache=False))


def test_removing_live_hidden_channels_changes_logits():
    """The rescaling is exact only for silent channels: the test above could not pass by doing nothing."""
    from secateur.width.hidden import keep_hidden

    model = tiny_model("llama")
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        before = model(ids).logits
    keep_hidden(model, adapter_for(model), torch.arange(8, 64))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before, atol=1e-3)


def test_hidden_scores_sum_readers_columns_and_writers_rows():
    from secateur.width.hidden import hidden_scores
    from secateur.width.prune import gather_statistics

    model = tiny_model("llama")
    stats = gather_statistics(model, calibration(), moments=True, gradients=False)
    adapter = adapter_for(model)
    got = hidden_scores(model, adapter, IMPORTANCE["activation"], stats.moments, {})
    expected = torch.zeros(64, dtype=torch.float64)
    for i, block in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            w, m = block.get_submodule(name).weight, stats.moments[f"model.layers.{i}.{name}"]
            expected += (w.abs() * m.norm[None, :]).sum(0).double()  # |W_ij| ||X_j|| over the column
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            w, m = block.get_submodule(name).weight, stats.moments[f"model.layers.{i}.{name}"]
            expected += (w.abs() * m.norm[None, :]).sum(1).double()  # over the row
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fluctuation_without_bias_compensation_scores_mlp_channels_with_their_mean():
    from secateur.width.prune import _units, gather_statistics, width_of

    model = tiny_model("llama")
    adapter = adapter_for(model)
    stats = gather_statistics(model, calibration(), moments=True, gradients=False)
    down, m = model.model.layers[0].mlp.down_proj.weight, stats.moments["model.layers.0.mlp.down_proj"]
    for bias, moment in ((True, m.variance), (False, (m.sumsq / m.tokens).float())):
        config = WidthConfig(0.3, "fluctuation", bias_compensation=bias)
        mlp = next(u for u in _units(model, adapter, width_of(model, adapter, config), config, stats) if u.kind == "mlp")
        torch.testing.assert_close(mlp.scores, moment * down.square().sum(0), rtol=1e-5, atol=1e-6)


def test_hidden_fluctuation_scores_readers_by_their_second_moment():
    from secateur.width.hidden import hidden_scores
    from secateur.width.prune import gather_statistics

    model = tiny_model("llama")
    stats = gather_statistics(model, calibration(), moments=True, gradients=False)
    got = hidden_scores(model, adapter_for(model), IMPORTANCE["fluctuation"], stats.moments, {})
    expected = torch.zeros(64, dtype=torch.float64)
    for i, block in enumerate(model.model.layers):  # writers' rows score zero under fluctuation
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            w, m = block.get_submodule(name).weight, stats.moments[f"model.layers.{i}.{name}"]
            second_moment = (m.sumsq / m.tokens).float()  # E[x^2], not the variance: no bias takes up the mean
            expected += (second_moment * w.square().sum(0)).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_hidden_fraction_counts_towards_the_target_and_reloads(tmp_path):
    from secateur.width.hidden import hidden_channel_parameters, keep_hidden

    model = tiny_model("llama")
    params = sum(p.numel() for p in model.model.layers.parameters())
    config = WidthConfig(0.5, "activation", "uniform", "kv-groups", bias_compensation=False, hidden_fraction=0.25)
    report = width_prune(model, config, calibration())
    assert report.hidden_before == 64 and report.hidden_after == 48 and model.config.hidden_size == 48
    assert 0.45 < report.removed_fraction < 0.55
    assert report.block_parameters_after == sum(p.numel() for p in model.model.layers.parameters())
    fresh, sliced = tiny_model("llama"), tiny_model("llama")  # the per-channel count matches the slicing
    keep_hidden(sliced, adapter_for(sliced), torch.arange(48))
    assert 16 * hidden_channel_parameters(fresh, adapter_for(fresh)) == params - sum(
        p.numel() for p in sliced.model.layers.parameters())
    assert report.block_parameters_before == params
    save(model, tiny_tokenizer(), tmp_path / "out", {"width": report.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_hidden_adaptive_reloads_with_secateur_load(tmp_path):
    model = tiny_model("qwen3")
    config = WidthConfig(0.4, "taylor", "adaptive", "queries", hidden_fraction=0.125)
    report = width_prune(model, config, calibration())
    assert not report.uniform and report.hidden_after == 56
    save(model, tiny_tokenizer(), tmp_path / "out", {"width": report.to_dict()})
    reloaded, _ = load(tmp_path / "out")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = calibration(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_hidden_refusals():
    with pytest.raises(WidthError, match="LayerNorm"):
        width_prune(tiny_model("gpt2"), WidthConfig(0.3, "magnitude", heads="none", hidden_fraction=0.1), None)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WidthError, match="raise --remove-fraction"):
        width_prune(model, WidthConfig(0.1, "magnitude", hidden_fraction=0.5), None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any change
    with pytest.raises(Exception, match="hidden-fraction"):
        WidthConfig(0.3, hidden_fraction=1.0)


def test_cli_hidden_fraction(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "thin"
    code = main(["prune", str(model_dir("llama")), "--method", "width", "--remove-fraction", "0.4", "--hidden-fraction",
                 "0.25", "--no-bias-compensation", "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len",
                 "32", "--eval-windows", "2", "--eval-seq-len", "32", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "hidden size 64 -> 48" in capsys.readouterr().out
    manifest = json.loads((out / "secateur.json").read_text())
    assert manifest["recipe"]["stage"][0]["hidden_fraction"] == 0.25 and manifest["history"][-1]["result"]["hidden_after"] == 48
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48
    code = main(["prune", str(model_dir("gpt2")), "--method", "width", "--remove-fraction", "0.4", "--heads", "none",
                 "--hidden-fraction", "0.25", "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--eval-windows", "2", "--eval-seq-len", "32", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "LayerNorm" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gemma3_refits_by_default_where_bias_compensation_cannot_be_held():
    """Left to its default, --reconstruct is Gemma 3's family default (its config cannot hold the
    compensation biases; measured to help, docs/benchmarks.md), said as the stage's variant; elsewhere
    and when turned off it stays off."""
    from conftest import tiny_model

    from secateur.width.prune import resolve_variant

    gemma, llama = tiny_model("gemma3_text"), tiny_model("llama")
    config, why = resolve_variant(gemma, adapter_for(gemma), WidthConfig(0.3))
    assert config.reconstruct is True and "--reconstruct" in why
    assert resolve_variant(llama, adapter_for(llama), WidthConfig(0.3))[0].reconstruct is False
    assert resolve_variant(gemma, adapter_for(gemma), WidthConfig(0.3, reconstruct=False))[0].reconstruct is False
    from secateur import prune

    report = prune(gemma, WidthConfig(0.3), calibration())
    assert report.stages[0]["result"]["reconstruction"]


def test_uniform_heads_that_the_stock_config_refuses_are_not_removed_and_that_is_said(caplog):
    """Llama's config wants hidden_size divisible by the query heads: with 8 query heads in 4 groups and
    a hidden size of 64, the default 20% would remove one group (6 query heads: refused by the config
    at save time, after all the work); no group goes and the MLP takes the whole target. An explicit
    --attention-fraction that does so is refused before any work."""
    from secateur.width import WidthConfig, width_prune
    from secateur.width.structure import WidthError

    shape = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    model = tiny_model("llama", **shape)
    before = sum(p.numel() for p in model.parameters())
    with caplog.at_level("WARNING"):
        report = width_prune(model, WidthConfig(fraction=0.2, importance="magnitude"), None)
    assert "divisible by the query heads" in caplog.text and "so 0 go" in caplog.text
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 4
    assert report.removed_fraction == pytest.approx(0.2, abs=0.02) and sum(p.numel() for p in model.parameters()) < before
    model.config.validate()  # saves with stock transformers
    with pytest.raises(WidthError, match=r"--attention-fraction 0.25 leaves 6 query heads .* remove 0/4, 2/4, 3/4"):
        width_prune(tiny_model("llama", **shape), WidthConfig(fraction=0.2, importance="magnitude",
                                                              attention_fraction=0.25), None)  # fmt: skip
