"""Recovery by training: the losses and the schedule against hand-computed values, masks that hold,
LoRA merges that keep sparsity and the trained logits, resume equal to an uninterrupted run, and the
CLI / recipe paths with their refusals."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import calibration_ids, killed_and_resumed, tiny_model

import secateur
from secateur.cli import main
from secateur.models import adapter_for
from secateur.sparsity.prune import target_layers
from secateur.train import TrainConfig, TrainError, train
from secateur.train.objective import step_loss as _loss
from secateur.train.loss import (kl_distillation, layerwise_distillation, next_token_cross_entropy, top_k,
                                 topk_distillation)
from secateur.train.modes import merge_lora, select_trainable
from secateur.train.schedule import lr_factor, peak_lr_for

SMALL = dict(tokens=32 * 16, train_seq_len=16, micro_batch=4, val_windows=2)


def test_distillation_loss_is_t_squared_forward_kl():
    """Two positions, a vocabulary of 3, T = 2: the KL written out term by term."""
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]])
    teacher = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]])
    T = 2.0
    total = 0.0
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist()):
        zs = sum(math.exp(x / T) for x in s_row)
        zt = sum(math.exp(x / T) for x in t_row)
        p = [math.exp(x / T) / zt for x in t_row]
        q = [math.exp(x / T) / zs for x in s_row]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = T * T * total / 2
    assert kl_distillation(student, teacher, T).item() == pytest.approx(expected, rel=1e-6)
    assert kl_distillation(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)
    # reversed arguments give another number: the direction is the teacher's distribution first
    assert kl_distillation(teacher, student, T).item() != pytest.approx(expected, rel=1e-3)


def test_topk_distillation():
    """k = vocabulary gives the full loss; a small k renormalises the teacher over its top k."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    values, indices = top_k(teacher, 11)
    assert topk_distillation(student, values, indices, 1.5).item() == pytest.approx(
        kl_distillation(student, teacher, 1.5).item(), rel=1e-3)  # float16 values
    values, indices = torch.topk(teacher, 3, dim=-1)
    p = F.softmax(values, -1)
    log_q = F.log_softmax(student, -1).gather(-1, indices)
    expected = (p * (p.log() - log_q)).sum(-1).mean()
    assert topk_distillation(student, values, indices, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_layerwise_distillation_is_squarehead():
    """Two blocks written out: each block's mean squared error divided by the teacher's mean square
    there, summed over blocks (an unnormalised MSE, a mean over blocks or a norm by the student's
    energy would give 3.5 + 4 / 2 = 5.5, 2.5 / 2.0 or another number)."""
    teacher = [torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), torch.tensor([[[2.0, 2.0]]])]
    student = [torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[0.0, 0.0]]])]
    # block 1: (0 + 1 + 4 + 9) / 4 = 3.5 over a teacher mean square of 1; block 2: 4 / 4 = 1
    assert layerwise_distillation(student, teacher).item() == pytest.approx(3.5 + 1.0)
    assert layerwise_distillation(teacher, teacher).item() == 0.0
    # scaling a block's teacher and student together leaves its term unchanged
    scaled = [teacher[0] * 10, teacher[1]], [student[0] * 10, student[1]]
    assert layerwise_distillation(scaled[1], scaled[0]).item() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="pairs blocks"):
        layerwise_distillation(student[:1], teacher)


def test_layerwise_distillation_per_position():
    """normalise="position": each position's squared error over the teacher's squared norm there,
    averaged over positions, summed over blocks. A sink position with a large norm no longer hides
    the error at the others."""
    teacher = [torch.tensor([[[10.0, 0.0], [1.0, 1.0]]])]
    student = [torch.tensor([[[10.0, 0.0], [1.0, 2.0]]])]
    # position 1: 0 / 100; position 2: 1 / 2 -> mean 0.25 (block-normalised: (1 / 4) / (102 / 4) = 1 / 102)
    assert layerwise_distillation(student, teacher, "position").item() == pytest.approx(0.25)
    assert layerwise_distillation(student, teacher, "block").item() == pytest.approx(1 / 102)
    two = [teacher[0], teacher[0] * 3], [student[0], student[0] * 3]
    assert layerwise_distillation(two[1], two[0], "position").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="normalise is one of"):
        layerwise_distillation(student, teacher, "layer")


def test_loss_mixes_logits_cross_entropy_and_blocks():
    """The training loss of one batch is kd_weight * KD + (1 - kd_weight) * CE + hidden_weight *
    SquareHead over the block outputs (hidden_states[1:]; the embeddings are left out)."""
    model, dense = _two_four()
    ids = calibration_ids(2, 16)
    config = TrainConfig(kd_weight=0.7, hidden_weight=0.5, temperature=2.0, **SMALL)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        target = dense(input_ids=ids, output_hidden_states=True)
        loss, kd, ce, layers = _loss(out, ids, torch.arange(2), config, dense, None)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    expected_kd = kl_distillation(out.logits, target.logits, 2.0)
    expected_ce = next_token_cross_entropy(out.logits, ids)
    expected_layers = layerwise_distillation(out.hidden_states[1:], target.hidden_states[1:])
    assert expected_layers.item() > 0
    assert (kd, ce, layers) == pytest.approx((expected_kd.item(), expected_ce.item(), expected_layers.item()))
    assert loss.item() == pytest.approx(0.7 * kd + 0.3 * ce + 0.5 * layers, rel=1e-6)
    # without the layer-wise term the loss is what it was
    plain = _loss(out, ids, torch.arange(2), TrainConfig(kd_weight=0.7, temperature=2.0, **SMALL), dense, None)
    assert plain[0].item() == pytest.approx(0.7 * kd + 0.3 * ce, rel=1e-6) and plain[3] == 0.0


def test_layerwise_distillation_trains_and_refuses_other_shapes():
    """A sparse student trains with it (masks hold, the metrics carry its part); a depth-pruned one is
    refused before any step: its blocks do not pair with the teacher's."""
    model, dense = _two_four()
    config = TrainConfig(hidden_weight=1.0, lr=1e-3, epochs=2, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   device="cpu", progress=False).record  # fmt: skip
    assert record["masks"]["kept_after"] == record["masks"]["kept"] and _holds_two_four(model)
    assert math.isfinite(record["loss"]["last"]) and record["loss"]["last"] < record["loss"]["first"]
    shallow = tiny_model("llama")
    secateur.prune(shallow, secateur.DepthConfig(secateur.AngularConfig(), secateur.Amount(count=1)), calibration_ids())
    with pytest.raises(TrainError, match="teacher has 2 blocks of width .* the student 1"):
        train(shallow, config, calibration_ids(32, 16), calibration_ids(2, 16), teacher=dense, progress=False)


def test_next_token_cross_entropy_shifts():
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 10.0  # position t predicts token t + 1
    ids = torch.tensor([[0, 2, 3]])
    assert next_token_cross_entropy(logits, ids).item() < 1e-6


def test_schedule_at_hand_computed_steps():
    # 10 steps, 2 of warm-up, floor 0.1: warm-up 1/2, 2/2, then cosine over t = (s - 2) / 7
    assert lr_factor(0, 10, 2, 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, 0.1) == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 10, 2, 0.1) == pytest.approx(0.1)
    t = 3 / 7
    assert lr_factor(5, 10, 2, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lr_factor(0, 1, 0, 0.0) == pytest.approx(0.0)  # a single step is also the last one


def _two_four(family: str = "llama"):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    secateur.prune(model, secateur.PruneConfig(secateur.MagnitudeConfig(), secateur.NM.parse("2:4")))
    return model, dense


def _holds_two_four(model) -> bool:
    for _, module in target_layers(model, adapter_for(model)):
        groups = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
        if not bool((groups <= 2).all()):
            return False
    return True


@pytest.mark.parametrize("mode", ["full", "lora", "perp-lora"])
def test_masks_hold_through_training(mode):
    """Many steps at a high learning rate: every zero stays exactly zero, 2:4 holds, the parameter
    count is unchanged, and Adam's moments of pruned weights stay zero (the gradient is masked)."""
    model, dense = _two_four()
    zeros = {n: m.weight == 0 for n, m in target_layers(model, adapter_for(model))}
    parameters = sum(p.numel() for p in model.parameters())
    config = TrainConfig(mode=mode, lr=5e-2, epochs=3, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   device="cpu", progress=False).record  # fmt: skip
    assert record["steps"] == 24 and record["masks"]["kept_after"] == record["masks"]["kept"]
    for name, module in target_layers(model, adapter_for(model)):
        assert bool((module.weight[zeros[name]] == 0).all()), name
    assert _holds_two_four(model)
    assert sum(p.numel() for p in model.parameters()) == parameters
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values()))
    assert changed


def test_gradient_masking_keeps_adam_moments_zero():
    model, dense = _two_four()
    adapter = adapter_for(model)
    from secateur.train.masks import MaskHolder, weight_masks

    masks = weight_masks(model, adapter)
    holder = MaskHolder(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = calibration_ids(4, 16)
    for _ in range(3):
        loss = next_token_cross_entropy(model(input_ids=ids).logits, ids)
        loss.backward()
        holder.gradients()
        opt.step()
        opt.zero_grad()
        holder.weights()
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        state = opt.state[params[name]]
        assert bool((state["exp_avg"][~keep] == 0).all()) and bool((state["exp_avg_sq"][~keep] == 0).all())


def test_lora_merge_keeps_sparsity_and_the_trained_logits():
    model, _ = _two_four()
    masks = {f"{n}.weight": m.weight != 0 for n, m in target_layers(model, adapter_for(model))}
    counts = select_trainable(model, adapter_for(model), "lora", 4, 8.0, masks, seed=0)
    assert 0 < counts["adapter"] == counts["trainable"] < counts["total"]
    with torch.no_grad():  # a non-zero B, as after training
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    assert merge_lora(model) == len(masks)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, module in target_layers(model, adapter_for(model)):
        assert torch.equal(module.weight != 0, masks[f"{name}.weight"]), name
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """A run killed after step 4 (checkpoints every 2 steps) and resumed ends with the weights of an
    uninterrupted run, bit for bit (CPU, float32)."""
    config = TrainConfig(mode="full", lr=1e-2, epochs=2, checkpoint_every=2, eval_every=16, precision="float32", **SMALL)
    model, _ = _two_four()
    whole, resumed, record = killed_and_resumed(tmp_path, monkeypatch, model, config, die_at=5)
    assert record["resumed_at"] == 4 and record["steps"] == 16
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def test_best_validated_weights_are_kept():
    """With a learning rate that wrecks the model, the best validation is the first one and the
    weights returned are that step's."""
    model, dense = _two_four()
    config = TrainConfig(mode="perp", lr=5.0, eval_every=1, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   device="cpu", progress=False).record  # fmt: skip
    vals = [v["perplexity"] for v in record["validation"]]
    assert record["best"]["perplexity"] == min(vals)
    windows = calibration_ids(2, 16, seed=1)
    ppl = secateur.evaluate.perplexity(model, windows)["perplexity"]
    assert ppl == pytest.approx(record["best"]["perplexity"], rel=1e-4)


def test_a_recovery_that_never_beats_its_input_returns_the_input(caplog):
    """The input is validated before the first step and is the first candidate: a learning rate that
    wrecks every step leaves the input's weights, bit for bit, and says so."""
    model, dense = _two_four()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(mode="full", lr=5.0, eval_every=1, **SMALL)
    with caplog.at_level("WARNING"):
        record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                       device="cpu", progress=False).record  # fmt: skip
    first, *trained = record["validation"]
    assert first["step"] == 0 and first["tokens"] == 0 and trained
    assert all(v["perplexity"] > first["perplexity"] for v in trained)
    assert record["best"] == {"step": 0, "perplexity": first["perplexity"]}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert "no validated step beat the input" in caplog.text


@pytest.mark.parametrize("family, settings, peak", [
    ("gemma3_text", {}, 1e-4),  # the mode's 1e-3 diverged on Gemma 3 (measured): its own default
    ("gemma3_text", {"lr": 3e-3}, 3e-3),  # an explicit --lr is kept
    ("gemma3_text", {"mode": "lora"}, 1e-4),  # LoRA's own default
    ("llama", {}, 1e-3),
])  # fmt: skip
def test_full_fine_tuning_takes_the_family_learning_rate_where_the_default_diverges(family, settings, peak, caplog):
    model = tiny_model(family)
    config = TrainConfig(tokens=8 * 16, train_seq_len=16, micro_batch=4, val_windows=2, kd_weight=0.0, **settings)
    with caplog.at_level("WARNING"):
        record = train(model, config, calibration_ids(8, 16), calibration_ids(2, 16, seed=1), device="cpu",
                       progress=False).record  # fmt: skip
    assert record["schedule"]["peak_lr"] == peak
    assert ("gemma3 fine-tunes in full at a peak learning rate of 0.0001" in caplog.text) == (family == "gemma3_text"
                                                                                             and not settings)


def test_peak_lr_by_the_start_s_distance_from_its_teacher():
    """3e-4 below 3 nats per token above the teacher, 1e-3 from there on (a wrecked start included)."""
    assert [peak_lr_for(g) for g in (0.0, -0.5, 2.999, 3.0, 7.0, math.inf)] == [3e-4, 3e-4, 3e-4, 1e-3, 1e-3, 1e-3]


@pytest.mark.parametrize("head_scale, peak", [(1.0, 3e-4), (60.0, 1e-3)])
def test_the_default_full_lr_is_chosen_from_the_validation_gap(head_scale, peak, caplog):
    """A start equal to its teacher (gap 0) trains at 3e-4; the same start with its head scaled up
    (confidently wrong: far above the teacher) at 1e-3. The gap is the log ratio of the two validation
    perplexities, the teacher's computed here on its own."""
    teacher = tiny_model("llama")
    model = copy.deepcopy(teacher)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    validation = calibration_ids(2, 16, seed=1)
    config = TrainConfig(precision="float32", **SMALL)
    with caplog.at_level("WARNING"):
        record = train(model, config, calibration_ids(32, 16), validation, teacher=teacher, device="cpu",
                       progress=False).record  # fmt: skip
    choice, start = record["lr_choice"], record["validation"][0]["perplexity"]
    expected = secateur.evaluate.perplexity(teacher, validation)["perplexity"]
    assert choice["teacher_perplexity"] == pytest.approx(expected, rel=1e-6)
    assert choice["gap"] == pytest.approx(math.log(start) - math.log(expected), abs=1e-9)
    assert (choice["gap"] == 0.0) == (head_scale == 1.0) and (choice["gap"] > 3) == (head_scale > 1)
    assert record["schedule"]["peak_lr"] == choice["peak_lr"] == peak
    assert f"peak learning rate {peak:g}" in caplog.text


@pytest.mark.parametrize("settings", [{"lr": 5e-4}, {"mode": "lora"}, {"prune_to": 0.75}])
def test_no_lr_choice_where_the_rate_is_given_or_the_start_is_not_what_trains(settings):
    """An explicit --lr, another mode, and pruning during training keep their rates: nothing is chosen."""
    model, dense = _two_four()
    config = TrainConfig(precision="float32", **{**SMALL, **settings})
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   device="cpu", progress=False).record  # fmt: skip
    assert record["lr_choice"] is None
    assert record["schedule"]["peak_lr"] == config.peak_lr


def test_a_resumed_run_keeps_the_learning_rate_it_chose(tmp_path, monkeypatch):
    """Killed after step 4 and resumed with --lr unset: the same choice and the same weights as an
    uninterrupted run, bit for bit (the resumed run does not fall back to the mode's 1e-3)."""
    config = TrainConfig(mode="full", epochs=2, checkpoint_every=2, eval_every=16, precision="float32", **SMALL)
    model, _ = _two_four()
    whole, resumed, record = killed_and_resumed(tmp_path, monkeypatch, model, config, die_at=5)
    assert record["resumed_at"] == 4 and record["lr_choice"]["peak_lr"] == record["schedule"]["peak_lr"] == 3e-4
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_early_stop_on_a_plateau():
    model, dense = _two_four()
    config = TrainConfig(mode="perp", lr=5.0, eval_every=1, patience=2, epochs=4, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   device="cpu", progress=False).record  # fmt: skip
    best = record["best"]["step"]
    if record["stopped_early"]:
        assert record["steps"] == best + 2 < record["total_steps"]
    else:  # it kept improving: then it ran to the end
        assert record["steps"] == record["total_steps"]


def test_training_needs_a_full_step_and_a_teacher():
    model, dense = _two_four()
    with pytest.raises(TrainError, match="do not fill one optimizer step"):
        train(model, TrainConfig(accumulate=8, **{**SMALL, "micro_batch": 8}), calibration_ids(32, 16),
              calibration_ids(2, 16), teacher=dense, progress=False)  # fmt: skip
    with pytest.raises(TrainError, match="needs a teacher"):
        train(model, TrainConfig(**SMALL), calibration_ids(32, 16), calibration_ids(2, 16), progress=False)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "gpt2", "phi3"])
def test_structured_outputs_train(family):
    """Adaptive width and removed branches train too (every family's projections, GPT-2's Conv1D)."""
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    secateur.prune(model, [secateur.WidthConfig(0.3, allocation="adaptive", heads="none"),
                           secateur.DepthConfig(secateur.FinerCutConfig(), secateur.Amount(count=1))],
                   calibration_ids())  # fmt: skip
    parameters = sum(p.numel() for p in model.parameters())
    for mode in ("full", "lora"):
        student = copy.deepcopy(model)
        record = train(student, TrainConfig(mode=mode, lr=1e-3, **SMALL), calibration_ids(32, 16),
                       calibration_ids(2, 16, seed=1), teacher=dense, progress=False).record  # fmt: skip
        assert record["steps"] == 8 and sum(p.numel() for p in student.parameters()) == parameters
        assert math.isfinite(record["loss"]["last"])


def _train_cli(model, out, *extra):
    return main(["train", str(model), "--out", str(out), "--tokens", "256", "--train-seq-len", "16",
                 "--val-windows", "2", "--micro-batch", "4", "--eval-seq-len", "16", "--eval-windows", "4", *extra])


def test_cli_train_saves_a_recovered_model(tmp_path, model_dir, text_file, capsys):
    """prune (2:4) -> train: the output loads, keeps its pattern, and its manifest records the
    recovery (teacher = the model before the first secateur run, with its hash), metrics and curve."""
    src, pruned, out = model_dir("llama"), tmp_path / "pruned", tmp_path / "recovered"
    assert main(["prune", str(src), "--method", "magnitude", "--pattern", "2:4", "--out", str(pruned)]) == 0
    assert _train_cli(pruned, out, "--calib", str(text_file), "--eval", str(text_file)) == 0
    manifest = json.loads((out / "secateur.json").read_text())
    record = manifest["history"][-1]
    assert [h["kind"] for h in manifest["history"]] == ["sparsity", "recovery"]
    assert record["result"]["teacher"]["sha256"] == manifest["origin"]["sha256"]
    assert record["result"]["masks"]["kept_after"] == record["result"]["masks"]["kept"] > 0
    chosen = record["result"]["lr_choice"]  # the default rate, chosen from the start's distance to its teacher
    assert record["result"]["schedule"]["peak_lr"] == chosen["peak_lr"]
    assert f"peak learning rate {chosen['peak_lr']:g}, chosen" in capsys.readouterr().out
    assert (out / record["result"]["metrics"]).is_file() and (out / record["result"]["curve"]).is_file()
    assert (out / record["result"]["curve"]).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "recovered.checkpoints").exists()
    model, _ = secateur.load(out)
    assert _holds_two_four(model)
    replay = tmp_path / "replay"
    assert main(["prune", str(pruned), "--recipe", str(out / "secateur.json"), "--out", str(replay)]) == 0
    a, _ = secateur.load(replay)
    for (name, x), y in zip(model.state_dict().items(), a.state_dict().values()):
        assert torch.equal(x, y), name


def test_recipe_width_then_recovery(tmp_path, model_dir, text_file):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'calib = "{text_file}"\neval_seq_len = 16\neval_windows = 4\n'
                      '[[stage]]\nmethod = "width"\nremove_fraction = 0.3\ncalib_samples = 4\ncalib_seq_len = 16\n'
                      '[[stage]]\nmethod = "recovery"\ntokens = 256\ntrain_seq_len = 16\nval_windows = 2\nmode = "perp"\n')
    out = tmp_path / "out"
    assert main(["prune", str(model_dir("llama")), "--recipe", str(recipe), "--out", str(out)]) == 0
    manifest = json.loads((out / "secateur.json").read_text())
    assert [h["kind"] for h in manifest["history"]] == ["width", "recovery"]
    assert manifest["history"][1]["result"]["mode"] == "perp"
    assert (out / "train-metrics-2.jsonl").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--calib-samples", "8"], "unrecognized arguments: --calib-samples"),
    (["--resume"], "nothing to resume"),
    (["--kd-weight", "0", "--teacher", "x"], "--teacher applies to a recovery stage that distils"),
    (["--lora-rank", "4"], "--lora-rank applies only with --mode lora or perp-lora"),
    (["--top-k", "5", "--kd-weight", "0"], "--top-k applies only with distillation"),
    (["--top-k", "5", "--hidden-weight", "1"], "give one or the other"),
    (["--hidden-weight", "-1"], "--hidden-weight must be >= 0"),
    (["--hidden-norm", "position"], "--hidden-norm applies only with layer-wise distillation"),
    (["--mode", "dense"], "invalid choice"),
])
def test_cli_train_refusals(tmp_path, model_dir, text_file, capsys, extra, message):
    out = tmp_path / "out"
    assert _train_cli(model_dir("llama"), out, "--calib", str(text_file), *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_layerwise_distillation_refuses_reshaped_students(tmp_path, model_dir, text_file, capsys):
    """--hidden-weight on a depth-pruned input, or after a depth stage of the same recipe: exit 2,
    nothing written."""
    src, shallow, out = model_dir("llama"), tmp_path / "shallow", tmp_path / "out"
    assert main(["prune", str(src), "--method", "angular", "--remove-blocks", "1", "--calib", str(text_file),
                 "--calib-samples", "4", "--calib-seq-len", "16", "--eval-seq-len", "16", "--eval-windows", "4",
                 "--out", str(shallow)]) == 0  # fmt: skip
    assert _train_cli(shallow, out, "--calib", str(text_file), "--hidden-weight", "1") == 2
    assert "the teacher has 2 blocks" in capsys.readouterr().err and not out.exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'calib = "{text_file}"\neval_seq_len = 16\neval_windows = 4\n[[stage]]\nmethod = "angular"\nremove_blocks = 1\ncalib_samples = 4\n'
                      'calib_seq_len = 16\n'
                      '[[stage]]\nmethod = "recovery"\ntokens = 256\ntrain_seq_len = 16\nhidden_weight = 1.0\n')
    assert main(["prune", str(src), "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "the depth stage before it can change them" in capsys.readouterr().err and not out.exists()


def test_cli_train_refuses_to_start_over_checkpoints(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    (tmp_path / "out.checkpoints").mkdir()
    assert _train_cli(model_dir("llama"), out, "--calib", str(text_file)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["prune", str(model_dir("llama")), "--method", "magnitude", "--out", str(out), "--resume"]) == 2
    assert "this run has neither" in capsys.readouterr().err


def test_prune_refuses_calibration_sizes_for_recovery(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(model_dir("llama")), "--method", "recovery", "--calib-seq-len", "16",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--calib-seq-len do not apply to recovery" in capsys.readouterr().err


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo), 4 windows each per step, against 1 process accumulating
    2 micro-batches of 4: the same global batch, the same weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    str(here / "distributed_train.py"), "1", str(tmp_path / "two.pt")], check=True, env=env,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, str(here / "distributed_train.py"), "2", str(tmp_path / "one.pt")], check=True,
                   env=env, capture_output=True)  # fmt: skip
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two["processes"] == 2 and one["processes"] == 1 and two["steps"] == one["steps"] == 4
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=1e-5, atol=1e-6)


# --- gradual pruning during training (Zhu & Gupta) ---------------------------------------------------

from secateur.train.gradual import cubic_sparsity, kept_per_group  # noqa: E402


def test_cubic_schedule_at_hand_computed_steps():
    """s_i = 0, s_f = 0.8, t0 = 2, Δt = 3, n = 4: s = 0.8 − 0.8 (1 − k/4)³ at t = 2 + 3k, held between."""
    s = [cubic_sparsity(t, 0.0, 0.8, 2, 3, 4) for t in (1, 2, 5, 6, 8, 11, 14, 20)]
    assert s == pytest.approx([0.0, 0.0, 0.4625, 0.4625, 0.7, 0.7875, 0.8, 0.8])
    assert [kept_per_group(x, 2, 4) for x in (0.0, 0.2, 0.3, 0.5, 0.8)] == [4, 3, 3, 2, 2]


def _sparsity(model) -> float:
    layers = target_layers(model, adapter_for(model))
    return sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)


@pytest.mark.parametrize("score", ["magnitude", "wanda", "taylor"])
def test_gradual_pruning_reaches_the_target_exactly(score):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    config = TrainConfig(prune_to=0.6, prune_score=score, prune_every=2, prune_end=0.75, epochs=2, lr=1e-3, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   progress=False).record  # fmt: skip
    events = record["gradual"]["events"]
    assert [e["step"] for e in events] == [2, 4, 6, 8, 10, 12]  # 16 steps: updates from 0 to 12 every 2
    assert all(a["sparsity"] <= b["sparsity"] for a, b in zip(events, events[1:]))
    assert events[-1]["target"] == pytest.approx(0.6)
    assert _sparsity(model) == pytest.approx(0.6, abs=2e-3)  # exact per layer, up to rounding per row


def test_gradual_nm_ends_on_the_pattern():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    config = TrainConfig(prune_pattern="2:4", prune_every=2, epochs=2, lr=1e-3, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   progress=False).record  # fmt: skip
    patterns = [e["pattern"] for e in record["gradual"]["events"]]
    assert patterns[-1] == "2:4" and "3:4" in patterns
    for _, module in target_layers(model, adapter_for(model)):
        kept = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
        assert bool((kept == 2).all())


def test_gradual_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    config = TrainConfig(prune_to=0.5, prune_score="wanda", prune_every=2, epochs=2, lr=1e-2, checkpoint_every=3,
                         eval_every=16, precision="float32", **SMALL)  # fmt: skip
    whole, resumed, record = killed_and_resumed(tmp_path, monkeypatch, tiny_model("llama"), config, die_at=8)
    assert record["resumed_at"] == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("settings, message", [
    ({"prune_score": "wanda"}, "--prune-score applies only with gradual pruning"),
    ({"prune_to": 0.5, "mode": "lora"}, "use --mode full"),
    ({"prune_to": 0.5, "prune_pattern": "2:4"}, "not both"),
    ({"prune_to": 0.5, "prune_start": 0.8, "prune_end": 0.5}, "--prune-start < --prune-end"),
])
def test_gradual_settings_refused(settings, message):
    with pytest.raises(secateur.SecateurError, match=message):
        TrainConfig(**settings)


def test_depth_compensation_after_gradual_pruning_is_refused():
    from secateur.recipe import check_order

    with pytest.raises(secateur.SecateurError, match="fill the zeros"):
        check_order([("recovery", {"prune_to": 0.5}), ("depth", {"method": "angular", "compensate": True})])
    with pytest.raises(secateur.SecateurError, match="breaks the N:M groups"):
        check_order([("recovery", {"prune_pattern": "2:4"}), ("width", {"method": "width"})])


def test_the_optimizer_is_fused_adamw_with_the_same_step_as_the_reference():
    from secateur.train.loop import adamw

    torch.manual_seed(0)
    ours, reference = torch.randn(8, 4, requires_grad=True), None
    reference = ours.detach().clone().requires_grad_()
    fused = adamw([ours], 1e-2, 0.1)
    plain = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        grad = torch.randn(8, 4)
        for param, optimizer in ((ours, fused), (reference, plain)):
            param.grad = grad.clone()
            optimizer.step()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert adamw([torch.zeros(2, device="meta", requires_grad=True)], 1e-3, 0.0).defaults["fused"] is None


def test_cached_top_k_logits_in_chunks_under_bfloat16_autocast():
    """The teacher's top-k cache computed a chunk of positions at a time under bfloat16 autocast (the
    default on CPUs with native bfloat16) trains: its float16 values are joined outside autocast."""
    model, dense = _two_four()
    config = TrainConfig(top_k=4, precision="bfloat16", loss_chunk=8, **SMALL)
    record = train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                   device="cpu", progress=False).record  # fmt: skip
    assert record["teacher_cache"]["top_k"] == 4 and math.isfinite(record["loss"]["last"])
