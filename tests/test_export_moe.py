"""GGUF export of mixtures of experts: the tensors llama.cpp's qwen2moe / qwen3moe / llama (Mixtral) /
olmoe graphs read, read back from the file; expert counts after removal; what the graphs cannot
compute is refused before anything is written."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import calibration_ids, tiny_model
from secateur.experts import ExpertsConfig, prune_experts
from secateur.export import ExportError, export_gguf, model_shape
from secateur.export.gguf import interleave_rope_rows
from test_export import saved

ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe"}


def read(path):
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        tensors[t.name] = (t.tensor_type.name, np.asarray(gguf.dequantize(t.data, t.tensor_type)).reshape(shape))
    return reader, tensors


@pytest.mark.parametrize("family", list(ARCH))
def test_experts_routers_and_metadata_are_written_as_llama_cpp_reads_them(family, tmp_path):
    model = tiny_model(family, **({"num_key_value_heads": 4} if family == "olmoe" else {}))
    export_gguf(saved(model, tmp_path), tmp_path / "m.gguf", kind="f32")
    reader, tensors = read(tmp_path / "m.gguf")
    arch = ARCH[family]
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.expert_count"].contents() == 8
    assert reader.fields[f"{arch}.expert_used_count"].contents() == 2
    assert reader.fields[f"{arch}.expert_feed_forward_length"].contents() == 32
    block = model.model.layers[1].mlp
    gate, up = block.experts.gate_up_proj.detach().chunk(2, dim=1)
    for name, expected in (("ffn_gate_exps", gate), ("ffn_up_exps", up), ("ffn_down_exps", block.experts.down_proj),
                           ("ffn_gate_inp", block.gate.weight)):  # fmt: skip
        kind, data = tensors[f"blk.1.{name}.weight"]
        assert kind == "F32" and np.array_equal(data, expected.detach().numpy()), name
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    heads = model.config.num_attention_heads
    expected_q = interleave_rope_rows(q, heads) if arch == "llama" else q  # Mixtral: llama's interleaved pairs
    assert np.array_equal(tensors["blk.1.attn_q.weight"][1], expected_q.numpy())
    if family == "qwen2_moe":
        assert reader.fields["qwen2moe.expert_shared_feed_forward_length"].contents() == 64
        shared = tensors["blk.1.ffn_gate_shexp.weight"][1]
        assert np.array_equal(shared, block.shared_expert.gate_proj.weight.detach().numpy())
        assert tensors["blk.1.ffn_gate_inp_shexp.weight"][0] == "F32"


def test_olmoe_with_grouped_query_attention_is_refused():
    with pytest.raises(ExportError, match="no grouped-query"):
        model_shape(tiny_model("olmoe"))  # 2 key/value heads for 4 query heads


@pytest.mark.parametrize("family,written", [("qwen2_moe", True), ("olmoe", True), ("qwen3_moe", False)])
def test_a_tied_head_is_written_where_llama_cpp_requires_it(family, written, tmp_path):
    model = tiny_model(family, tie_word_embeddings=True, num_key_value_heads=4)
    model.tie_weights()
    export_gguf(saved(model, tmp_path), tmp_path / "m.gguf", kind="f32")
    _, tensors = read(tmp_path / "m.gguf")
    assert ("output.weight" in tensors) == written
    if written:
        assert np.array_equal(tensors["output.weight"][1], tensors["token_embd.weight"][1])


def test_routers_stay_float32_and_experts_take_the_type(tmp_path):
    export_gguf(saved(tiny_model("qwen3_moe"), tmp_path), tmp_path / "m.gguf", kind="f16")
    _, tensors = read(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_gate_inp.weight"][0] == "F32"
    assert tensors["blk.0.ffn_gate_exps.weight"][0] == "F16" and tensors["blk.0.ffn_down_exps.weight"][0] == "F16"


def test_fewer_experts_after_removal_are_what_the_file_says(tmp_path):
    model = tiny_model("qwen2_moe")
    prune_experts(model, ExpertsConfig(count=4), calibration_ids())
    export_gguf(saved(model, tmp_path), tmp_path / "m.gguf", kind="f32")
    reader, tensors = read(tmp_path / "m.gguf")
    assert reader.fields["qwen2moe.expert_count"].contents() == 4
    assert tensors["blk.0.ffn_down_exps.weight"][1].shape == (4, 64, 32)
    assert tensors["blk.0.ffn_gate_inp.weight"][1].shape == (4, 64)


def test_a_slimmed_shared_expert_is_what_the_file_says(tmp_path):
    model = tiny_model("qwen2_moe")
    prune_experts(model, ExpertsConfig(fraction=0.5, width=True, shared_expert=True), calibration_ids())
    export_gguf(saved(model, tmp_path), tmp_path / "m.gguf", kind="f32")
    reader, tensors = read(tmp_path / "m.gguf")
    assert reader.fields["qwen2moe.expert_shared_feed_forward_length"].contents() == 32
    assert reader.fields["qwen2moe.expert_feed_forward_length"].contents() == 16
    assert tensors["blk.0.ffn_down_shexp.weight"][1].shape == (64, 32)
    assert tensors["blk.0.ffn_down_exps.weight"][1].shape == (8, 64, 16)


@pytest.mark.parametrize("family,flag", [("qwen2_moe", True), ("qwen3_moe", False), ("olmoe", True)])
def test_routing_llama_cpp_would_weight_otherwise_is_refused(family, flag):
    with pytest.raises(ExportError, match="renormalises the top-k"):
        model_shape(tiny_model(family, norm_topk_prob=flag, num_key_value_heads=4))


def test_deepseek_v3_is_refused_before_writing(tmp_path):
    with pytest.raises(ExportError, match="deepseek_v3 models cannot be exported yet"):
        export_gguf(saved(tiny_model("deepseek_v3"), tmp_path), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_dense_blocks_among_the_experts_are_refused_before_writing(tmp_path):
    model = tiny_model("qwen3_moe", mlp_only_layers=[1])
    with pytest.raises(ExportError, match=r"blocks \[1\] hold a dense MLP"):
        export_gguf(saved(model, tmp_path), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
