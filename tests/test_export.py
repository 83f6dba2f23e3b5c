"""GGUF export: round trips through transformers' GGUF loader, per-layer arrays, refusals."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import HIDDEN, VOCAB, tiny_model, tiny_text
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from secateur.cli import main
from secateur.depth.structure import remove_blocks, remove_sublayers
from secateur.export import MANIFEST_KEY, ExportError, export_gguf, model_shape
from secateur.export.gguf import interleave_rope_rows
from secateur.io import load_model, save
from secateur.models import adapter_for
from secateur.manifest import structure_of
from secateur.width import WidthConfig, width_prune

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) of fewer than VOCAB tokens, trained on the tiny text."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator([tiny_text(2000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def ids(n: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def calibration() -> torch.Tensor:
    return torch.randint(4, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def saved(model, tmp_path, name="model"):
    out = tmp_path / name
    save(model, bpe_tokenizer(), out, {"note": "test", "structure": structure_of(model)})
    return out


def round_trip(model, tmp_path, kind="f32"):
    out = saved(model, tmp_path)
    record = export_gguf(out, tmp_path / "model.gguf", kind=kind)
    loaded, _ = load_model(tmp_path / "model.gguf")
    with torch.no_grad():
        return record, model(ids()).logits, loaded(ids()).logits


# --- the math ---------------------------------------------------------------------------------------


def test_interleave_rope_rows_by_hand():
    # one head of size 4: HF rotates (x0, x2) and (x1, x3); GGML pairs adjacent rows
    w = torch.arange(8.0).reshape(4, 2)  # rows r0 r1 r2 r3
    assert interleave_rope_rows(w, heads=1).tolist() == [[0, 1], [4, 5], [2, 3], [6, 7]]  # r0 r2 r1 r3
    two = torch.arange(8.0)  # two heads of size 4 (a bias): each head on its own
    assert interleave_rope_rows(two, heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# --- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_round_trip_is_exact_in_f32(family, tmp_path):
    record, expected, got = round_trip(tiny_model(family), tmp_path)
    assert record["arch"] == {"mistral": "llama"}.get(family, family)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_pruned_round_trip_with_head_size_and_biases(family, tmp_path):
    model = tiny_model(family)
    compensate = family == "llama"  # the only one of these whose config can announce the biases
    report = width_prune(model, WidthConfig(0.5, "activation", "uniform", "kv-groups", bias_compensation=compensate),
                         calibration())  # fmt: skip
    assert report.uniform and model.config.num_key_value_heads == 1
    _, expected, got = round_trip(model, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_removed_blocks_and_hidden_slicing_round_trip(tmp_path):
    model = tiny_model("llama")
    width_prune(model, WidthConfig(0.3, "magnitude", "uniform", "none", hidden_fraction=0.25), calibration())
    remove_blocks(model, adapter_for(model), [0])
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 1
    _, expected, got = round_trip(model, tmp_path)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,tolerance", [("f16", 2e-2), ("bf16", 1e-1), ("q8_0", 1e-1)])
def test_reduced_types_stay_close(kind, tolerance, tmp_path):
    record, expected, got = round_trip(tiny_model("llama"), tmp_path, kind)
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"


def test_q8_0_falls_back_to_f16_for_rows_no_block_divides(tmp_path):
    model = tiny_model("llama")
    width_prune(model, WidthConfig(0.3, "magnitude", "uniform", "none"), calibration())
    channels = model.config.intermediate_size
    assert channels % 32  # the down projection's rows cannot be 8-bit blocks
    round_trip(model, tmp_path, "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


# --- per-layer layouts -----------------------------------------------------------------------------


def test_adaptive_widths_and_removed_branches_become_deci_arrays(tmp_path):
    model = tiny_model("llama")
    width_prune(model, WidthConfig(0.4, "taylor", "adaptive", "queries", bias_compensation=False), calibration())
    remove_sublayers(model, adapter_for(model), [(1, "attention")])
    shape = model_shape(model)
    assert shape.arch == "deci"
    out = saved(model, tmp_path)
    export_gguf(out, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    blocks = adapter_for(model).block_list(model)
    assert field("general.architecture") == "deci"
    assert field("deci.attention.head_count") == [blocks[0].self_attn.q_proj.out_features // 16, 0]
    assert field("deci.attention.head_count_kv") == [blocks[0].self_attn.k_proj.out_features // 16, 0]
    assert field("deci.feed_forward_length") == [b.mlp.down_proj.in_features for b in blocks]
    assert field("deci.attention.key_length") == 16
    shapes = {t.name: list(reversed(t.shape.tolist())) for t in reader.tensors}
    assert "blk.1.attn_q.weight" not in shapes and "blk.1.attn_norm.weight" not in shapes
    assert shapes["blk.1.ffn_down.weight"] == list(blocks[1].mlp.down_proj.weight.shape)
    manifest = json.loads(field(MANIFEST_KEY))
    assert manifest["note"] == "test" and manifest["export"]["arch"] == "deci"


def test_a_removed_mlp_beside_a_kept_attention_is_one_zero_channel(tmp_path):
    model = tiny_model("llama")
    remove_sublayers(model, adapter_for(model), [(0, "mlp")])
    shape = model_shape(model)
    assert shape.arch == "deci" and shape.channels == [1, 128] and shape.stub_mlps == [0]
    export_gguf(saved(model, tmp_path), tmp_path / "model.gguf", kind="f32")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["deci.feed_forward_length"].contents() == [1, 128]
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert not tensors["blk.0.ffn_up.weight"].any() and not tensors["blk.0.ffn_down.weight"].any()
    assert (tensors["blk.0.ffn_norm.weight"] == 1).all() and tensors["blk.0.ffn_down.weight"].shape == (HIDDEN, 1)


def test_the_deci_rows_are_interleaved_per_layer(tmp_path):
    model = tiny_model("llama")
    width_prune(model, WidthConfig(0.4, "taylor", "adaptive", "queries", bias_compensation=False), calibration())
    export_gguf(saved(model, tmp_path), tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    for index, block in enumerate(adapter_for(model).block_list(model)):
        q = block.self_attn.q_proj.weight.detach()
        stored = next(t for t in reader.tensors if t.name == f"blk.{index}.attn_q.weight")
        data = np.asarray(gguf.dequantize(stored.data, stored.tensor_type)).reshape(q.shape)
        torch.testing.assert_close(torch.from_numpy(data.astype(np.float32)),
                                   interleave_rope_rows(q, q.shape[0] // 16), atol=1e-3, rtol=1e-3)  # f16


# --- Gemma 3 -----------------------------------------------------------------------------------------


def tiny_gemma(**overrides):
    """A two-block Gemma 3 whose query scale is llama.cpp's (1/sqrt(head size)), one sliding block."""
    return tiny_model("gemma3_text", **{"query_pre_attn_scalar": 16,
                                        "layer_types": ["sliding_attention", "full_attention"], **overrides})


@pytest.mark.parametrize("prune", ["dense", "depth", "width"])
def test_gemma3_round_trips_with_its_norms_window_pattern_and_rotary_bases(prune, tmp_path):
    model = tiny_gemma()
    if prune == "depth":
        remove_blocks(model, adapter_for(model), [0])  # the global block is left: no window at all
    if prune == "width":
        width_prune(model, WidthConfig(0.5, "magnitude", "uniform", "kv-groups", bias_compensation=False), calibration())
    record, expected, got = round_trip(model, tmp_path)
    assert record["arch"] == "gemma3"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    block = adapter_for(model).block_list(model)[0]
    np.testing.assert_array_equal(tensors["blk.0.post_ffw_norm.weight"],
                                  block.post_feedforward_layernorm.weight.detach().numpy() + 1)  # fmt: skip
    pattern = reader.fields.get("gemma3.attention.sliding_window_pattern")
    if prune == "depth":
        assert pattern is None and "gemma3.attention.sliding_window" not in reader.fields
    else:
        assert pattern.contents() == [True, False] and reader.fields["gemma3.rope.freq_base_swa"].contents() == 10000


def test_gemma3_that_llama_cpp_would_compute_otherwise_is_refused():
    with pytest.raises(ExportError, match="query_pre_attn_scalar 256 differs from the head size 16"):
        model_shape(tiny_gemma(query_pre_attn_scalar=256))


# --- Phi-3 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune", ["dense", "depth"])
def test_phi3_round_trips_with_its_fused_projections(prune, tmp_path):
    model = tiny_model("phi3")
    if prune == "depth":
        remove_blocks(model, adapter_for(model), [0])
    record, expected, got = round_trip(model, tmp_path)
    assert record["arch"] == "phi3"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    names = {t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert "blk.0.attn_qkv.weight" in names and "blk.0.ffn_up.weight" in names and "output.weight" in names


def test_phi3_with_fewer_heads_than_llama_cpp_holds_is_refused():
    model = tiny_model("phi3")
    width_prune(model, WidthConfig(0.5, "magnitude", "uniform", "kv-groups", bias_compensation=False), calibration())
    with pytest.raises(ExportError, match="query heads x head size = hidden size"):
        model_shape(model)


# --- vocabulary ------------------------------------------------------------------------------------


def test_vocabulary_is_written_with_types_merges_and_padding(tmp_path):
    tokenizer = bpe_tokenizer()
    export_gguf(saved(tiny_model("llama"), tmp_path), tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == VOCAB and reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert tokens[: len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert types[:3] == [3, 3, 3] and types[3] == 1 and tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == 5
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0


def test_an_unrecognised_pre_tokenizer_is_refused_unless_named(tmp_path):
    tokenizer = bpe_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    out = tmp_path / "model"
    save(tiny_model("llama"), tokenizer, out, {})
    with pytest.raises(ExportError, match="--tokenizer-pre"):
        export_gguf(out, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    export_gguf(out, tmp_path / "a.gguf", tokenizer_pre="llama-bpe")
    assert gguf.GGUFReader(tmp_path / "a.gguf").fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


# --- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt"])
def test_families_without_an_exporter_are_refused(family, tmp_path):
    with pytest.raises(ExportError, match="cannot be exported yet"):
        model_shape(tiny_model(family))


def test_per_layer_widths_of_qwen3_are_refused_with_the_reason(tmp_path):
    model = tiny_model("qwen3")
    width_prune(model, WidthConfig(0.4, "taylor", "adaptive", "queries"), calibration())
    with pytest.raises(ExportError, match="q/k norms"):
        model_shape(model)


def test_per_layer_widths_keep_the_compensation_biases(tmp_path):
    model = tiny_model("llama")
    width_prune(model, WidthConfig(0.4, "taylor", "adaptive", "queries", bias_compensation=True), calibration())
    assert model.config.mlp_bias and model_shape(model).arch == "deci"
    export_gguf(saved(model, tmp_path), tmp_path / "model.gguf", kind="f32")
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    block = adapter_for(model).block_list(model)[0]
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.bias"], block.mlp.down_proj.bias.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.0.attn_output.bias"], block.self_attn.o_proj.bias.detach().numpy())


def test_cli_refuses_before_writing_and_never_overwrites(tmp_path, capsys):
    out = saved(tiny_model("llama"), tmp_path)
    target = tmp_path / "m.gguf"
    assert main(["export", str(out), "--gguf", str(tmp_path / "m.bin")]) == 2
    assert "must end in .gguf" in capsys.readouterr().err
    assert main(["export", str(out), "--gguf", str(target), "--type", "f32"]) == 0
    assert "llama (uniform widths), f32" in capsys.readouterr().out
    before = target.read_bytes()
    assert main(["export", str(out), "--gguf", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err and target.read_bytes() == before
    assert main(["export", str(out), "--gguf", str(target), "--overwrite"]) == 0  # f16 now
    assert len(target.read_bytes()) < len(before)
    assert not list(tmp_path.glob(".m.gguf.partial-*"))
    assert main(["export", str(target), "--gguf", str(tmp_path / "again.gguf")]) == 2
    assert "already GGUF" in capsys.readouterr().err and not (tmp_path / "again.gguf").exists()
    neox = tmp_path / "neox"
    save(tiny_model("gpt_neox"), bpe_tokenizer(), neox, {})
    assert main(["export", str(neox), "--gguf", str(tmp_path / "n.gguf")]) == 2
    assert "cannot be exported yet" in capsys.readouterr().err and not (tmp_path / "n.gguf").exists()


def test_a_pruned_vocabulary_takes_the_source_gguf_tokenizer_at_its_kept_tokens(tmp_path):
    from secateur.recipe import prune
    from secateur.vocabulary import VocabularyConfig

    tokenizer = bpe_tokenizer()
    source = tmp_path / "source.gguf"
    dense = tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=None)
    save(dense, tokenizer, tmp_path / "dense", {})
    export_gguf(tmp_path / "dense", source)  # the file a user's model came from
    windows = torch.tensor(tokenizer(tiny_text(300), add_special_tokens=False)["input_ids"][:480]).view(15, 32)
    report = prune(dense, VocabularyConfig(keep_tokens=80), windows, tokenizer=tokenizer, progress=False)
    save(dense, report.tokenizer, tmp_path / "pruned", {"converted_from": str(source)})
    record = export_gguf(tmp_path / "pruned", tmp_path / "pruned.gguf")
    assert "80 of its" in record["tokenizer"]
    fields = gguf.GGUFReader(tmp_path / "pruned.gguf").fields
    full = gguf.GGUFReader(source).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == report.tokenizer.convert_ids_to_tokens(list(range(80)))
    old = {t: i for i, t in enumerate(full["tokenizer.ggml.tokens"].contents())}
    types = full["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.token_type"].contents() == [types[old[t]] for t in tokens]
    merges = fields["tokenizer.ggml.merges"].contents()
    assert 0 < len(merges) < len(full["tokenizer.ggml.merges"].contents())
    assert all(a in tokens and b in tokens and a + b in tokens for a, b in (m.split(" ") for m in merges))
    assert tokens[fields["tokenizer.ggml.eos_token_id"].contents()] == "</s>"


def test_sentencepiece_whitespace_tokens_match_their_transformers_spelling(tmp_path):
    """Gemma's GGUF holds runs of spaces as user-defined tokens; transformers spells them with ▁."""
    from secateur.export.vocab import from_gguf

    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<s>", "\u2581a", "  ", "b"])
    writer.add_token_scores([0.0, -1.0, -2.0, -3.0])
    writer.add_token_types([3, 1, 4, 1])
    writer.add_bos_token_id(0)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    same = from_gguf(path, ["<s>", "\u2581a", "\u2581\u2581", "b"])
    assert same.origin.startswith("copied from")
    sliced = {key: value for key, value, _, _ in from_gguf(path, ["<s>", "\u2581\u2581"]).fields}
    assert sliced["tokenizer.ggml.tokens"] == ["<s>", "  "] and sliced["tokenizer.ggml.token_type"] == [3, 4]
    assert sliced["tokenizer.ggml.scores"] == [0.0, -2.0] and sliced["tokenizer.ggml.bos_token_id"] == 0
    assert from_gguf(path, ["<s>", "c"]) is None


# --- SentencePiece-style tokenizers written from tokenizer.json -----------------------------------------


def sentencepiece_tokenizer(complete: bool = True) -> PreTrainedTokenizerFast:
    """BPE with byte fallback as transformers converts a SentencePiece model: ▁ for spaces, <0xNN> byte
    tokens, and (`complete`) a merge for every pair of tokens whose join is a token, ranked by the
    join's id (its score); else the trainer's own merges, which lack some of those pairs."""
    from tokenizers import normalizers

    specials = ["<unk>", "<s>", "</s>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)],
                                  show_progress=False)  # fmt: skip
    backend.train_from_iterator([tiny_text(2000).replace(" ", "\u2581") + " é 中文"], trainer)
    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    vocab = data["model"]["vocab"]
    if complete:
        pairs = [(vocab[t], vocab[t[:k]], vocab[t[k:]], t[:k], t[k:]) for t in vocab for k in range(1, len(t))
                 if t[:k] in vocab and t[k:] in vocab]  # fmt: skip
        data["model"]["merges"] = [[a, b] for *_, a, b in sorted(pairs)]
    data["decoder"] = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"},
                                                         "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")  # fmt: skip


def llama_cpp_spm(text: str, tokens: list[str], scores: list[float], space_prefix: bool) -> list[int]:
    """llama.cpp's llama (SentencePiece) tokenizer, as its llm_tokenizer_spm does it: the text's characters
    (spaces as ▁), then again and again the adjacent pair whose join is the token of highest score
    (leftmost on a tie) joined; characters no token holds as their byte tokens."""
    import heapq

    vocab = {t: i for i, t in enumerate(tokens)}
    symbols = list(("\u2581" if space_prefix else "") + text.replace(" ", "\u2581"))
    after = list(range(1, len(symbols))) + [-1]
    before = list(range(-1, len(symbols) - 1))
    queue: list = []

    def pair(left: int, right: int) -> None:
        if left >= 0 and right >= 0 and symbols[left] + symbols[right] in vocab:
            heapq.heappush(queue, (-scores[vocab[symbols[left] + symbols[right]]], left, symbols[left] + symbols[right]))

    for i in range(len(symbols) - 1):
        pair(i, i + 1)
    while queue:
        _, left, joined = heapq.heappop(queue)
        right = after[left]
        if symbols[left] is None or right < 0 or symbols[left] + symbols[right] != joined:
            continue  # a pair that an earlier join changed
        symbols[left], symbols[right], after[left] = joined, None, after[right]
        if after[left] >= 0:
            before[after[left]] = left
        pair(before[left], left), pair(left, after[left])
    out = []
    for symbol in (s for s in symbols if s is not None):
        out += [vocab[symbol]] if symbol in vocab else [vocab[f"<0x{b:02X}>"] for b in symbol.encode()]
    return out


def test_a_sentencepiece_tokenizer_is_written_so_llama_cpp_tokenizes_as_transformers(tmp_path):
    tokenizer = sentencepiece_tokenizer()
    out = tmp_path / "model"
    save(tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=None),
         tokenizer, out, {})  # fmt: skip
    record = export_gguf(out, tmp_path / "model.gguf")
    assert "SentencePiece-style" in record["tokenizer"]
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "llama" and fields["tokenizer.ggml.pre"].contents() == "default"
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert types[:3] == [3, 3, 3] and types[tokens.index("<0x41>")] == 6 and types[len(tokens) - 1] == 1
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is False
    scores = fields["tokenizer.ggml.scores"].contents()
    rng = np.random.default_rng(0)
    words = tiny_text(400).split()
    texts = [" ".join(rng.choice(words, 12)) for _ in range(20)] + [
        "naïve café 中文 ok", "def f(x):\n    return x ** 2  # 🙂", "ÿ€ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢  two  spaces", "🙂🙃 emoji"]
    for text in texts:
        assert llama_cpp_spm(text, tokens, scores, False) == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_a_byte_fallback_bpe_that_llama_cpp_would_split_otherwise_is_refused(tmp_path, capsys):
    out = tmp_path / "model"
    tokenizer = sentencepiece_tokenizer(complete=False)
    save(tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=None),
         tokenizer, out, {})  # fmt: skip
    assert main(["export", str(out), "--gguf", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "have no merge" in err[-1] and "llama tokenizer" in err[-1] and not (tmp_path / "a.gguf").exists()
    with pytest.raises(ExportError, match="--tokenizer-pre names the pre-tokenizer of a byte-level BPE"):
        save(tiny_model("llama", vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=None),
             sentencepiece_tokenizer(), tmp_path / "complete", {})  # fmt: skip
        export_gguf(tmp_path / "complete", tmp_path / "b.gguf", tokenizer_pre="gpt-2")
    assert not (tmp_path / "b.gguf").exists()
