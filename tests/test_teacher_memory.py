"""The teacher held for autocast (`models.autocast.hold_for_autocast`): block linear layers in bfloat16,
the same outputs under bfloat16 autocast bit for bit on every family, half their memory, and the
command holds it so only where every recovery stage computes in bfloat16."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES, calibration_ids, tiny_model
from torch import nn

from secateur.models import adapter_for
from secateur.models.autocast import hold_for_autocast


def _logits(model, ids):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits, out.hidden_states


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gpt2",)] + MOE_FAMILIES)
def test_a_teacher_held_for_autocast_gives_the_same_logits_and_hidden_states_bit_for_bit(family):
    model = tiny_model(family)
    ids = calibration_ids(2, 16, seed=1)
    logits, hidden = _logits(model, ids)
    linear = [m for b in adapter_for(model).block_list(model) for m in b.modules() if isinstance(m, nn.Linear)]
    expected = sum(p.numel() for m in linear for p in m.parameters(recurse=False)) * 2
    assert hold_for_autocast(model) == expected > 0
    assert all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.float32
    again, hidden_again = _logits(model, ids)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    for a, b in zip(hidden_again, hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gpt2_conv1d_layers_are_left_as_they_are():
    """GPT-2's projections are Conv1D (addmm), not linear layers: nothing is held in bfloat16."""
    model = tiny_model("gpt2")
    assert hold_for_autocast(model) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_training_from_a_held_teacher_equals_training_from_the_float32_one_bit_for_bit(tmp_path):
    """bfloat16 recovery on CPU, chunked head loss: the student ends with the same weights, and the
    best weights kept in the work directory (not in memory) come back at the end the same way."""
    from secateur.train import TrainConfig, train

    config = TrainConfig(tokens=16 * 16, train_seq_len=16, micro_batch=4, val_windows=2, precision="bfloat16",
                         eval_every=1, lr=1e-2)  # fmt: skip
    windows, validation = calibration_ids(16, 16), calibration_ids(2, 16, seed=1)
    students = []
    for held in (False, True):
        teacher, student = tiny_model("llama"), tiny_model("llama", seed=1)
        if held:
            hold_for_autocast(teacher)
        train(student, config, windows, validation, teacher=teacher, device="cpu", progress=False,
              workdir=tmp_path / str(held))  # fmt: skip
        students.append(student.state_dict())
    for name, value in students[0].items():
        torch.testing.assert_close(students[1][name], value, rtol=0, atol=0, msg=name)


def test_the_teacher_is_held_only_where_every_stage_runs_it_under_bfloat16_autocast():
    from secateur import WidthConfig
    from secateur.recipe import autocast_teacher
    from secateur.train import TrainConfig

    cpu = torch.device("cpu")
    bf16, fp32 = TrainConfig(precision="bfloat16"), TrainConfig(precision="float32")
    assert autocast_teacher([WidthConfig(fraction=0.2), bf16], cpu)
    assert not autocast_teacher([bf16, fp32], cpu)  # one stage reads the teacher in float32
    assert not autocast_teacher([fp32], cpu)
    assert not autocast_teacher([TrainConfig(precision="bfloat16", kd_weight=0.0)], cpu)  # no teacher runs
    assert not autocast_teacher([WidthConfig(fraction=0.2)], cpu)


def test_secateur_train_holds_the_teacher_it_loads_only_for_a_bfloat16_run(tmp_path, text_file, monkeypatch):
    """The command loads the teacher for the run alone: held for autocast where the run computes in
    bfloat16, left as loaded where it computes in float32."""
    import secateur.pipeline as pipeline
    from conftest import tiny_tokenizer
    from secateur.cli import main

    held = []
    real = pipeline.hold_for_autocast
    monkeypatch.setattr(pipeline, "hold_for_autocast", lambda model: held.append(real(model)))
    for name, seed in (("student", 1), ("teacher", 0)):
        tiny_model("llama", seed=seed).save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    for precision in ("bfloat16", "float32"):
        args = ["train", tmp_path / "student", "--teacher", tmp_path / "teacher", "--calib", text_file, "--tokens",
                "128", "--train-seq-len", "16", "--val-windows", "2", "--precision", precision, "--eval-windows",
                "2", "--eval-seq-len", "16", "--check-windows", "0", "--out", tmp_path / f"out-{precision}"]  # fmt: skip
        assert main([str(a) for a in args]) == 0
    assert len(held) == 1 and held[0] > 0  # the bfloat16 run only
