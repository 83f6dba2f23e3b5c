"""Self-data distillation: which windows the teacher writes (hand-counted), sampling from the model's
own distribution (not its argmax, not another temperature), the KV-cached sampler against one that
recomputes every prefix, the written windows trained on and cached for a resume, and the refusals."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, calibration_ids, killed_and_resumed, tiny_model
from torch import nn

from secateur.cli import main
from secateur.generate.sampling import sample_continuations, spread
from secateur.train import TrainConfig, train
from secateur.train import loop as train_loop
from secateur.train.selfdata import SELF_DATA

SMALL = dict(tokens=32 * 16, train_seq_len=16, micro_batch=4, val_windows=2)


def test_spread_hand_counted():
    assert spread(8, 0.25) == [3, 7]
    assert spread(5, 0.5) == [1, 3]
    assert spread(10, 0.3) == [3, 6, 9]  # floor(1.2) > floor(0.9), floor(2.1) > floor(1.8), 3.0 > 2.7
    assert spread(4, 1.0) == [0, 1, 2, 3]
    assert spread(4, 0.0) == []


class Markov(nn.Module):
    """A 'language model' whose next-token distribution depends on the last token only, with the
    call signature of a transformers causal LM (it keeps no cache)."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(table).log(), requires_grad=False)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        logits = self.logits[input_ids[:, -1:]]
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def test_sampling_draws_from_the_model_distribution():
    """After token 0 the model gives 0.1 / 0.6 / 0.3, after 2 always 0: 6,000 samples land within
    4 standard errors of those shares (greedy decoding would give token 1 every time, T = 0.5 would
    give 0.02 / 0.78 / 0.20), and a 2 is always followed by a 0."""
    model = Markov([[0.1, 0.6, 0.3], [0.5, 0.5, 1e-30], [1.0, 1e-30, 1e-30]])
    n = 6000
    out = sample_continuations(model, torch.zeros(n, 1, dtype=torch.long), 3, torch.Generator().manual_seed(0),
                               batch=1000)  # fmt: skip
    assert out.shape == (n, 3) and torch.equal(out[:, 0], torch.zeros(n, dtype=torch.long))
    for token, share in enumerate([0.1, 0.6, 0.3]):
        seen = (out[:, 1] == token).float().mean().item()
        assert abs(seen - share) < 4 * math.sqrt(share * (1 - share) / n), (token, seen)
    after_two = out[out[:, 1] == 2, 2]
    assert len(after_two) > 0 and torch.equal(after_two, torch.zeros_like(after_two))
    again = sample_continuations(model, torch.zeros(n, 1, dtype=torch.long), 3, torch.Generator().manual_seed(0),
                                 batch=1000)  # fmt: skip
    assert torch.equal(out, again)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_moe"])
def test_cached_sampling_equals_recomputing_every_prefix(family):
    """On a real (tiny) transformer of every family, the KV-cached sampler draws the same tokens as a
    loop that runs the model on the whole prefix at every step with the same generator."""
    model = tiny_model(family).eval()
    prompts = calibration_ids(3, 4)
    out = sample_continuations(model, prompts, 12, torch.Generator().manual_seed(3), batch=2)
    generator, reference = torch.Generator().manual_seed(3), []
    with torch.inference_mode():
        for rows in prompts.split(2):
            ids = rows
            while ids.shape[1] < 12:
                probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
            reference.append(ids)
    assert torch.equal(out, torch.cat(reference))
    assert not torch.equal(out[:, 4:], model.generate(prompts, max_new_tokens=8, do_sample=False)[:, 4:])


def test_training_uses_the_written_windows(monkeypatch):
    """--self-data 0.25 of 32 windows: windows 3, 7, ..., 31 keep their first 5 tokens and are the
    teacher's after; the others are the corpus's; the top-k cache is of the written windows."""
    model, teacher = tiny_model("llama"), tiny_model("llama", seed=1)
    windows, validation = calibration_ids(32, 16), calibration_ids(2, 16, seed=1)
    seen = {}
    real = train_loop.teacher_cache

    def spy(teacher, trained, *args):
        seen["windows"] = trained.clone()
        return real(teacher, trained, *args)

    monkeypatch.setattr(train_loop, "teacher_cache", spy)
    config = TrainConfig(self_data=0.25, self_data_prompt=5, top_k=4, precision="float32", **SMALL)
    record = train(model, config, windows, validation, teacher=teacher, device="cpu", progress=False).record
    written = seen["windows"]
    rows = list(range(3, 32, 4))
    others = [i for i in range(32) if i not in rows]
    assert record["self_data"]["windows"] == 8 and record["self_data"]["new_tokens"] == 8 * 11
    assert torch.equal(written[others], windows[others])
    assert torch.equal(written[rows, :5], windows[rows, :5])
    assert (written[rows, 5:] != windows[rows, 5:]).float().mean() > 0.9  # a 128-token vocabulary: about 1/128 agree
    expected = sample_continuations(teacher, windows[rows, :5], 16, torch.Generator().manual_seed(7919))
    assert torch.equal(written[rows], expected)


def test_resume_reads_the_written_windows_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    config = TrainConfig(mode="full", lr=1e-2, checkpoint_every=2, eval_every=16, precision="float32",
                         self_data=0.5, self_data_prompt=4, **SMALL)  # fmt: skip
    model = tiny_model("llama")
    whole, resumed, record = killed_and_resumed(tmp_path, monkeypatch, model, config, die_at=5)
    assert record["resumed_at"] == 4 and record["self_data"]["sampled"] is False
    assert (tmp_path / "b" / SELF_DATA).is_file()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_windows_of_another_run(tmp_path):
    config = TrainConfig(self_data=0.5, self_data_prompt=4, precision="float32", **SMALL)
    model, teacher = tiny_model("llama"), tiny_model("llama", seed=1)
    windows, validation = calibration_ids(32, 16), calibration_ids(2, 16, seed=1)
    train(copy.deepcopy(model), config, windows, validation, teacher=teacher, device="cpu", workdir=tmp_path,
          progress=False)  # fmt: skip
    (tmp_path / "checkpoint").mkdir(exist_ok=True)
    with pytest.raises(Exception, match="holds other windows"):
        train(copy.deepcopy(model), config, calibration_ids(32, 16, seed=5), validation, teacher=teacher,
              device="cpu", workdir=tmp_path, resume=True, progress=False)  # fmt: skip


@pytest.mark.parametrize("extra, message", [
    (["--self-data", "0.5", "--self-data-prompt", "4", "--kd-weight", "0"], "the teacher writes the text"),
    (["--self-data-prompt", "8"], "--self-data-prompt applies only with text the teacher writes"),
    (["--self-data", "1.5"], "--self-data is a share of the training windows, in [0, 1]"),
    (["--self-data", "0.5", "--self-data-prompt", "16"], "below --train-seq-len (16)"),
])
def test_cli_self_data_refusals(tmp_path, model_dir, text_file, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["train", str(model_dir("llama")), "--out", str(out), "--tokens", "256", "--train-seq-len", "16",
                 "--val-windows", "2", "--calib", str(text_file), *extra]) == 2  # fmt: skip
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_train_with_self_data_records_it(tmp_path, model_dir, text_file):
    import json

    out = tmp_path / "out"
    assert main(["train", str(model_dir("llama")), "--out", str(out), "--tokens", "256", "--train-seq-len", "16",
                 "--val-windows", "2", "--micro-batch", "4", "--eval-seq-len", "16", "--eval-windows", "4",
                 "--calib", str(text_file), "--self-data", "0.5", "--self-data-prompt", "4"]) == 0  # fmt: skip
    record = json.loads((out / "secateur.json").read_text())["history"][-1]
    assert record["settings"]["self_data"] == 0.5 and record["result"]["self_data"]["windows"] == 8
    assert not (tmp_path / "out.checkpoints").exists()
