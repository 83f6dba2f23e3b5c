"""Models larger than memory: a sparsity stage streamed from disk to disk writes the same weights, bit for
bit, as the stage on the model in memory, loads with stock transformers, and leaves nothing behind
when it fails."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, calibration_ids, stored, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur import NM, MagnitudeConfig, PruneConfig, SparseGPTConfig, Unstructured, WandaConfig
from secateur.calibrate.disk import DiskBlocks, DiskError
from secateur.config import AllocationConfig
from secateur.errors import OutputError
from secateur.offload import prune_on_disk as sparsify_on_disk
from secateur.sparsity.prune import sparsify

CONFIGS = {
    "wanda": lambda: PruneConfig(WandaConfig(), Unstructured(0.5)),
    "sparsegpt-2:4": lambda: PruneConfig(SparseGPTConfig(), NM(2, 4)),
    "magnitude": lambda: PruneConfig(MagnitudeConfig(), Unstructured(0.6)),
    # allocations that look at the dense model first: a read-only pass (OWL: input norms and each block's
    # outlier ratio while the block is resident; global magnitude: the weights alone)
    "wanda-owl": lambda: PruneConfig(WandaConfig(), Unstructured(0.5), allocation=AllocationConfig("owl")),
    "magnitude-global": lambda: PruneConfig(MagnitudeConfig(), Unstructured(0.5), allocation=AllocationConfig("global")),
}


def saved(tmp_path, family: str, **save_args):
    path = tmp_path / f"{family}-in"
    tiny_model(family).save_pretrained(path, **save_args)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_streamed_output_equals_in_memory_output_bit_for_bit(tmp_path, family, method):
    path = saved(tmp_path, family)
    calibration = calibration_ids(6, 16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sparsify(model, None, CONFIGS[method](), calibration, batch_size=4)
    model.save_pretrained(tmp_path / "memory")
    record = sparsify_on_disk(path, tmp_path / "disk", CONFIGS[method](), calibration, batch_size=4)
    memory, disk = stored(tmp_path / "memory"), stored(tmp_path / "disk")
    assert set(disk) >= set(memory)  # a tied head is stored once in memory's save, as in the input
    for name, tensor in memory.items():
        assert torch.equal(disk[name], tensor), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    manifest = json.loads((tmp_path / "disk" / "secateur.json").read_text())
    assert manifest["history"][0]["offload"] == "disk" and manifest["history"][0]["result"]["sparsity"] == record["result"]["sparsity"]


def test_a_sharded_input_streams_and_the_output_index_names_every_tensor(tmp_path):
    path = saved(tmp_path, "llama", max_shard_size="100KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    sparsify_on_disk(path, tmp_path / "disk", CONFIGS["wanda"](), calibration_ids(4, 16))
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert all((tmp_path / "disk" / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(stored(tmp_path / "disk"))
    assert set(index["weight_map"]) == set(stored(path))  # every input tensor, under its own name


def test_a_failure_mid_stream_leaves_no_output_and_the_input_untouched(tmp_path, monkeypatch):
    path = saved(tmp_path, "llama")
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    original = DiskBlocks.leave

    def fail_at_second(self, index):
        if index == 1:
            raise RuntimeError("disk gone")
        original(self, index)

    monkeypatch.setattr(DiskBlocks, "leave", fail_at_second)
    with pytest.raises(RuntimeError, match="disk gone"):
        sparsify_on_disk(path, tmp_path / "disk", CONFIGS["wanda"](), calibration_ids(4, 16))
    assert not (tmp_path / "disk").exists() and not list(tmp_path.glob(".disk*"))
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before


def test_an_existing_output_or_one_inside_the_input_is_refused_before_work(tmp_path):
    path = saved(tmp_path, "llama")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(OutputError):
        sparsify_on_disk(path, tmp_path / "taken", CONFIGS["wanda"](), calibration_ids(4, 16))
    with pytest.raises(OutputError, match="input"):
        sparsify_on_disk(path, path / "out", CONFIGS["wanda"](), calibration_ids(4, 16))
    assert (tmp_path / "taken" / "x").read_text() == "mine"


def test_a_checkpoint_without_safetensors_is_refused(tmp_path):
    path = tmp_path / "bin"
    tiny_model("llama").save_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(DiskError, match="safetensors"):
        sparsify_on_disk(path, tmp_path / "out", CONFIGS["wanda"](), calibration_ids(4, 16))
    assert not (tmp_path / "out").exists()


def test_only_two_blocks_are_in_memory_at_once(tmp_path, monkeypatch):
    """Counted on the model itself: while block i is pruned, no block other than i and the prefetched
    i + 1 holds real (non-meta) weights, and the head of an untied model is never loaded."""
    model = tiny_model("llama", num_hidden_layers=6, tie_word_embeddings=False)
    path = tmp_path / "deep"
    model.save_pretrained(path), tiny_tokenizer().save_pretrained(path)
    seen = []
    original = DiskBlocks.enter

    def watch(self, index, device):
        block = original(self, index, device)
        blocks = self.adapter.block_list(self.model)
        seen.append((index, [i for i, b in enumerate(blocks) if not next(b.parameters()).is_meta],
                     self.model.get_output_embeddings().weight.is_meta))  # fmt: skip
        return block

    monkeypatch.setattr(DiskBlocks, "enter", watch)
    sparsify_on_disk(path, tmp_path / "out", CONFIGS["wanda"](), calibration_ids(4, 16))
    assert [s[0] for s in seen] == list(range(6))
    assert all(real == [index] and head_on_meta for index, real, head_on_meta in seen)


# --- the command line: --offload ------------------------------------------------------------------------------------

from secateur.cli import main  # noqa: E402

CLI_SMALL = ["--calib-samples", "6", "--calib-seq-len", "16", "--eval-windows", "4", "--eval-seq-len", "32", "--check-windows", "0"]


def cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_offload_disk_on_the_command_line_equals_the_in_memory_run(model_dir, text_file, tmp_path, capsys, family):
    args = ["prune", model_dir(family), "--method", "wanda", "--sparsity", "0.5", "--calib", text_file, *CLI_SMALL]
    code, _, err = cli([*args, "--offload", "none", "--out", tmp_path / "memory"], capsys)
    assert code == 0, err
    code, stdout, err = cli([*args, "--offload", "disk", "--out", tmp_path / "disk"], capsys)
    assert code == 0, err
    assert "sparsity 0.5000 of the block layers" in stdout
    memory, disk = stored(tmp_path / "memory"), stored(tmp_path / "disk")
    assert set(memory) <= set(disk) and all(torch.equal(disk[n], t) for n, t in memory.items())
    manifest = json.loads((tmp_path / "disk" / "secateur.json").read_text())
    assert manifest["offload"] == "disk" and manifest["recipe"]["offload"] == "disk"
    assert manifest["structure"]["target_sparsity"] == pytest.approx(
        json.loads((tmp_path / "memory" / "secateur.json").read_text())["structure"]["target_sparsity"])
    code, stdout, err = cli(["info", tmp_path / "disk"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra, message", [
    (["--method", "width", "--remove-fraction", "0.2", "--importance", "taylor"],
     "taylor importance takes gradients through the whole model"),
    (["--method", "gblm", "--sparsity", "0.5"], "gblm needs gradients of the whole model"),
    (["--method", "wanda", "--sparsity", "0.5", "--check-windows", "2"], "--check-windows runs the whole model"),
    (["--method", "wanda", "--sparsity", "0.5", "--eval-tasks", "secateur_wordnet"], "--eval-tasks runs the whole model"),
])  # fmt: skip
def test_offload_disk_that_cannot_stream_is_refused_before_work(model_dir, text_file, tmp_path, capsys, extra, message):
    code, _, err = cli(["prune", model_dir("llama"), *extra, "--calib", text_file, "--offload", "disk",
                        "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert code == 2 and message in err and "--offload disk" in err
    assert not (tmp_path / "out").exists()


def test_offload_auto_streams_when_the_weights_do_not_fit_and_says_so(model_dir, text_file, tmp_path, capsys,
                                                                      monkeypatch, caplog):  # fmt: skip
    import secateur.offload as offload

    args = ["prune", model_dir("llama"), "--method", "wanda", "--sparsity", "0.5", "--calib", text_file, *CLI_SMALL]
    code, _, err = cli([*args, "--out", tmp_path / "fits"], capsys)
    assert code == 0, err
    assert "offload" not in json.loads((tmp_path / "fits" / "secateur.json").read_text())
    monkeypatch.setattr(offload, "available_memory", lambda: 1000)
    with caplog.at_level("WARNING"):
        code, _, err = cli([*args, "--out", tmp_path / "streamed"], capsys)
    assert code == 0, err
    assert "streaming the blocks from disk" in caplog.text
    assert json.loads((tmp_path / "streamed" / "secateur.json").read_text())["offload"] == "disk"
    caplog.clear()
    with caplog.at_level("WARNING"):  # cannot stream: says so and loads in memory
        code, _, err = cli([*args[:3], "width", "--remove-fraction", "0.25", "--importance", "taylor", *args[6:],
                            "--out", tmp_path / "width"], capsys)  # fmt: skip
    assert code == 0, err
    assert "loading them in memory anyway" in caplog.text


def test_a_streamed_run_killed_at_a_block_resumes_to_the_same_output(text_file, tmp_path, capsys, monkeypatch):
    import secateur.calibrate.disk as disk

    monkeypatch.setattr(disk, "SAVE_EVERY", 0.0)  # save the state after every block
    path = tmp_path / "deep"
    tiny_model("llama", num_hidden_layers=5).save_pretrained(path), tiny_tokenizer().save_pretrained(path)
    args = ["prune", path, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", text_file, "--offload", "disk",
            *CLI_SMALL]  # fmt: skip
    code, _, err = cli([*args, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    leave, enter = DiskBlocks.leave, DiskBlocks.enter

    def killed(self, index):
        leave(self, index)
        if index == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(DiskBlocks, "leave", killed)
    out = tmp_path / "resumed"
    code, _, err = cli([*args, "--out", out], capsys)
    assert code == 130 and "stay in" in err and "--resume" in err
    assert not out.exists() and (tmp_path / "resumed.checkpoints" / "stream" / "state.pt").is_file()
    monkeypatch.setattr(DiskBlocks, "leave", leave)
    code, _, err = cli([*args, "--out", out], capsys)
    assert code == 2 and "pass --resume" in err
    entered = []
    monkeypatch.setattr(DiskBlocks, "enter", lambda self, i, d: entered.append(i) or enter(self, i, d))
    code, _, err = cli([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert entered == [3, 4]  # blocks 0 to 2 were done and saved
    whole, resumed = stored(tmp_path / "whole"), stored(out)
    assert set(whole) == set(resumed) and all(torch.equal(resumed[n], t) for n, t in whole.items())
    report = json.loads((out / "secateur.json").read_text())["history"][0]["result"]
    assert len(report["block_errors"]) == 5
    assert not (tmp_path / "resumed.checkpoints").exists()


def test_a_streamed_run_without_a_saved_state_leaves_nothing_to_resume(text_file, tmp_path, capsys, monkeypatch):
    path = tmp_path / "deep"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(path), tiny_tokenizer().save_pretrained(path)
    leave = DiskBlocks.leave

    def killed(self, index):
        leave(self, index)
        raise KeyboardInterrupt

    monkeypatch.setattr(DiskBlocks, "leave", killed)  # before SAVE_EVERY seconds have passed: no state saved
    args = ["prune", path, "--method", "wanda", "--sparsity", "0.5", "--calib", text_file, "--offload", "disk",
            *CLI_SMALL, "--out", tmp_path / "out"]  # fmt: skip
    code, _, err = cli(args, capsys)
    assert code == 130 and "no output was written" in err
    assert not (tmp_path / "out.checkpoints").exists()
    code, _, err = cli([*args, "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err


def test_peak_memory_of_a_streamed_run_stays_flat_as_the_depth_grows(tmp_path):
    """Measured (the child's own peak RSS, VmHWM: wait4's figure would include this process's, which a
    child inherits up to its exec): 2 blocks against 16 blocks of 67 MB each (hidden 1,024, MLP 4,096,
    float32). In memory the deeper model holds 940 MB more; streamed, the two peaks must stay within a
    generous 350 MB of each other (run to run they vary by about 150 MB)."""
    import subprocess
    import sys
    import textwrap

    from transformers import LlamaConfig

    peaks = {}
    for blocks in (2, 16):
        path = tmp_path / f"deep{blocks}"
        config = LlamaConfig(vocab_size=128, hidden_size=1024, intermediate_size=4096, num_hidden_layers=blocks,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        script = textwrap.dedent(f"""
            import torch
            from secateur import PruneConfig, Unstructured, WandaConfig
            from secateur.offload import prune_on_disk as sparsify_on_disk
            ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
            sparsify_on_disk({str(path)!r}, {str(tmp_path / f"out{blocks}")!r}, PruneConfig(WandaConfig(), Unstructured(0.5)), ids)
            status = open("/proc/self/status").read().splitlines()
            print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")))
        """)  # fmt: skip
        log = tmp_path / f"log{blocks}"
        with log.open("w") as err:
            done = subprocess.run([sys.executable, "-c", script], stderr=err, stdout=subprocess.PIPE, text=True)
        assert done.returncode == 0, log.read_text()[-2000:]
        peaks[blocks] = int(done.stdout.split()[-1]) / 1024  # MiB
    assert abs(peaks[16] - peaks[2]) < 350, peaks


def test_a_run_in_another_precision_streams_the_same_weights(tmp_path):
    """float32 input, bfloat16 run: every tensor converted as from_pretrained converts it (blocks in
    the read, the rest in the copy), pruned alike."""
    path = saved(tmp_path, "llama", max_shard_size="100KB")
    calibration = calibration_ids(6, 16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    sparsify(model, None, CONFIGS["wanda"](), calibration, batch_size=4)
    model.save_pretrained(tmp_path / "memory")
    sparsify_on_disk(path, tmp_path / "disk", CONFIGS["wanda"](), calibration, batch_size=4, dtype="bfloat16")
    memory, disk = stored(tmp_path / "memory"), stored(tmp_path / "disk")
    assert all(disk[n].dtype == torch.bfloat16 and torch.equal(disk[n], t) for n, t in memory.items())
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["dtype"] == "bfloat16"
