"""Vocabulary pruning: the merge closure by hand, token selection, the rewritten tokenizer.json, real
tokenizers of both BPE styles (round trips, kept ids only, unchanged tokenizations and logits), the
stage in recipes and on the command line, bits per byte, and the refusals."""

import json
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from conftest import ATTN, HIDDEN, FFN
from secateur.cli import main
from secateur.data.bytes import token_bytes
from secateur.errors import ConfigError
from secateur.evaluate import perplexity
from secateur.recipe import build_stage, prune
from secateur.vocabulary import VocabularyConfig, VocabularyError
from secateur.vocabulary.bpe import Bpe, Closure, merge_order, merge_path, prune_tokenizer_json, read_bpe, select

SYLLABLES = ["th", "e", "an", "re", "in", "on", "at", "er", "es", "ing", "ed", "ou", "st", "al", "é", "ü", "ß", "中",
             "文", "k", "z", "q", "x", "y", "w", "pl", "gr"]  # fmt: skip


def english_like(words: int, seed: int) -> str:
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    weights = [1 / (rank + 1) for rank in range(len(lexicon))]  # Zipf: a long tail of rare words
    out = rng.choices(lexicon, weights, k=words)
    return " ".join(w + ("," if rng.random() < 0.05 else "") for w in out)


CORPUS = english_like(4000, 0)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")  # fmt: skip


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma / Llama 2 style: spaces as ▁, characters as base tokens, <0xNN> for the rest."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS + byte_tokens)
    backend.train_from_iterator([CORPUS], trainer)
    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIALS]  # bytes: plain vocabulary
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>")  # fmt: skip


TOKENIZERS = {"byte-level": byte_level_tokenizer, "byte-fallback": byte_fallback_tokenizer}


def model_for(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **ATTN)  # fmt: skip
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def windows_of(tokenizer, text: str, seq_len: int = 32) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = len(ids) // seq_len
    return ids[: count * seq_len].view(count, seq_len)


# --- the closure and the selection by hand ------------------------------------------------------------------


def hand_bpe() -> Bpe:
    """a b c are base tokens. Merges in rank order: (b,c) (ab,c) (a,b) (a,bc). BPE builds "abc" as
    a + bc (b,c outranks a,b), although the first merge that yields "abc" is (ab, c)."""
    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5, "d": 6}
    return Bpe(vocab, [("b", "c"), ("ab", "c"), ("a", "b"), ("a", "bc")], "byte-level", "", frozenset({0, 1, 2, 6}))


def test_merge_path_applies_the_best_ranked_merge_first():
    ranks = {pair: rank for rank, pair in enumerate(hand_bpe().merges)}
    assert merge_path("abc", ranks) == ["a", "b", "c", "bc", "abc"]
    assert merge_path("ab", ranks) == ["a", "b", "ab"]


def test_a_kept_token_keeps_the_token_its_merge_path_runs_through():
    need = Closure(hand_bpe())
    assert need([5]) == {5, 3, 0, 1, 2}  # bc, not ab: the first merge yielding abc is not the one BPE uses
    assert need([5], kept={0, 1, 2, 3}) == {5}


def test_selection_by_coverage_and_by_size_with_the_merge_order_fill():
    bpe = hand_bpe()
    counts = {5: 10, 4: 5, 6: 1}  # abc, ab, d
    assert select(counts, bpe, coverage=0.6) == [0, 1, 2, 3, 5, 6]  # abc (10 of 16) and its path
    assert select(counts, bpe, coverage=1.0) == [0, 1, 2, 3, 4, 5, 6]
    assert select(counts, bpe, keep_tokens=5) == [0, 1, 2, 4, 6]  # abc needs 2 more: does not fit, ab fits
    assert merge_order(bpe) == [3, 5, 4, 0, 1, 2, 6]
    assert select({}, bpe, keep_tokens=5) == [0, 1, 2, 3, 6]  # no corpus: the tokenizer's own order (bc first)
    with pytest.raises(VocabularyError, match="fewer than the 4 tokens"):
        select(counts, bpe, keep_tokens=3)


def test_the_rewritten_tokenizer_json_renumbers_everything():
    data = {"model": {"type": "BPE", "vocab": {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5}, "merges":
                      ["a b", "b c"], "byte_fallback": False},
            "pre_tokenizer": {"type": "ByteLevel"}, "added_tokens": [{"id": 0, "content": "<s>", "special": True}],
            "post_processor": {"type": "Sequence", "processors": [{"type": "TemplateProcessing", "special_tokens":
                               {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}]}}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # three base tokens stand in for the 256 bytes
        patch.setattr("secateur.vocabulary.bpe.byte_alphabet", lambda: ["a", "b", "c"])
        out = prune_tokenizer_json(data, [0, 1, 2, 3, 5])
    assert out["model"]["vocab"] == {"<s>": 0, "a": 1, "b": 2, "c": 3, "bc": 4}
    assert out["model"]["merges"] == ["b c"]  # a b goes with ab; the string format is kept
    assert out["post_processor"]["processors"][0]["special_tokens"]["<s>"]["ids"] == [0]
    assert data["model"]["vocab"]["ab"] == 4  # the input is not touched


# --- real tokenizers of both styles ---------------------------------------------------------------------------


@pytest.fixture(params=list(TOKENIZERS))
def pruned(request):
    """(style, original tokenizer, model, pruned model, pruned tokenizer, kept old ids) at coverage 0.9."""
    tokenizer = TOKENIZERS[request.param]()
    model = model_for(tokenizer)
    original = model_for(tokenizer)
    original.load_state_dict(model.state_dict())
    report = prune(model, VocabularyConfig(coverage=0.9), windows_of(tokenizer, CORPUS[: len(CORPUS) // 2]),
                   tokenizer=tokenizer, progress=False)  # fmt: skip
    new = report.tokenizer
    kept = [tokenizer.convert_tokens_to_ids(t) for t in new.convert_ids_to_tokens(list(range(len(new))))]
    return request.param, tokenizer, original, model, new, kept


def test_every_text_round_trips_and_tokenizes_into_kept_ids_only(pruned):
    style, tokenizer, _, model, new, kept = pruned
    assert read_bpe(json.loads(new.backend_tokenizer.to_str())).style == style
    assert len(new) == len(kept) < len(tokenizer) and model.get_input_embeddings().num_embeddings == len(new)
    rng = random.Random(1)
    texts = [CORPUS[-3000:], "def f(x):\n\treturn {'k': x ** 2}  # 🎉🚀 naïve café 東京 Ω≈ç√",
             "".join(chr(rng.choice([c for c in range(32, 0x2FFFF) if not 0xD800 <= c < 0xE000])) for _ in range(500))]
    for text in texts:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(ids) == text and max(ids) < len(new)


def test_words_made_of_kept_tokens_tokenize_and_score_as_before(pruned):
    _, tokenizer, original, model, new, kept = pruned
    text = CORPUS[len(CORPUS) // 2 :]  # held out: some words need removed tokens
    words = set(text.split(" "))
    same = [w for w in words if all(i in set(kept) for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"])]
    assert 0 < len(same) < len(words)
    for word in same:
        old = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        assert [kept[i] for i in new(" " + word, add_special_tokens=False)["input_ids"]] == old
    ids = new(" ".join(sorted(same)[:40]), add_special_tokens=False)["input_ids"]
    old_ids = torch.tensor([[kept[i] for i in ids]])
    with torch.no_grad():
        expected = original(old_ids).logits[..., kept]
        assert torch.allclose(model(torch.tensor([ids])).logits, expected, atol=1e-5)


def test_the_output_reloads_with_stock_classes(pruned, tmp_path):
    _, _, _, model, new, _ = pruned
    model.save_pretrained(tmp_path), new.save_pretrained(tmp_path)
    again, tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("the ending", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert again.config.vocab_size == len(tokenizer) and again.config.bos_token_id == tokenizer.bos_token_id


# --- bits per byte ----------------------------------------------------------------------------------------------


def test_token_bytes_count_the_text_each_id_stands_for():
    level = byte_level_tokenizer()
    sizes = token_bytes(level, len(level))
    assert sizes[level.convert_tokens_to_ids("<s>")] == 0 and sizes[level.convert_tokens_to_ids("Ã©")] == 2  # é
    ids = level("the é 文 🎉", add_special_tokens=False)["input_ids"]
    assert int(sizes[ids].sum()) == len("the é 文 🎉".encode())
    fallback = byte_fallback_tokenizer()
    sizes = token_bytes(fallback, len(fallback) + 3)
    assert sizes[fallback.convert_tokens_to_ids("<0xE4>")] == 1 and sizes[-1] == 0
    assert sizes[fallback.convert_tokens_to_ids("\u2581e")] == 2
    ids = fallback("the é 文", add_special_tokens=False)["input_ids"]
    assert int(sizes[ids].sum()) == len("the é 文".encode())


class Uniform(torch.nn.Module):
    """Equal logits over `vocab` ids: every prediction costs ln(vocab) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})


def test_bits_per_byte_by_hand():
    windows = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    sizes = torch.tensor([1, 3, 2])  # predicted: 1 2 1 | 2 0 1 -> 3+2+3+2+1+3 = 14 bytes
    result = perplexity(Uniform(3), windows, token_bytes=sizes)
    assert result["bytes"] == 14 and result["bits_per_byte"] == pytest.approx(6 * math.log2(3) / 14)


# --- the stage in recipes, on the command line, and the refusals ------------------------------------------------------


@pytest.fixture
def bpe_model_dir(tmp_path):
    tokenizer = byte_level_tokenizer()
    path = tmp_path / "model"
    model_for(tokenizer).save_pretrained(path), tokenizer.save_pretrained(path)
    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS * 3)
    return path, text


SMALL = ["--calib-samples", "8", "--calib-seq-len", "64", "--eval-windows", "4", "--eval-seq-len", "32"]


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_a_model_and_tokenizer_that_agree(bpe_model_dir, tmp_path, capsys):
    path, text = bpe_model_dir
    out = tmp_path / "out"
    code, stdout, err = run(["prune", path, "--out", out, "--method", "vocabulary", "--keep-tokens", 400, "--calib",
                             text, "--eval", text, *SMALL], capsys)  # fmt: skip
    assert code == 0, err
    assert "-> 400 tokens" in stdout
    manifest = json.loads((out / "secateur.json").read_text())
    evaluation = manifest["evaluation"]
    assert manifest["history"][-1]["result"]["tokens_after"] == 400 and "bits_per_byte" in evaluation
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == 400
    code, stdout, _ = run(["eval", out, "--data", text, "--windows", 4, "--seq-len", 32, "--json"], capsys)
    again = json.loads(stdout)
    assert code == 0 and again["bits_per_byte"] == pytest.approx(evaluation["bits_per_byte"], rel=1e-4)
    assert 0 < again["changed_tokens"] == pytest.approx(evaluation["changed_tokens"])
    original = AutoTokenizer.from_pretrained(path)  # by hand: the original's tokens the pruned vocabulary lacks
    ids = original(text.read_text(), add_special_tokens=False)["input_ids"][:4 * 32]
    gone = [t for t in original.convert_ids_to_tokens(ids) if t not in tokenizer.get_vocab()]
    assert again["changed_tokens"] == len(gone) / len(ids)


def test_a_stage_after_the_vocabulary_calibrates_on_the_new_ids(bpe_model_dir, tmp_path):
    path, text = bpe_model_dir
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nmethod = "vocabulary"\ncoverage = 0.95\n\n[[stage]]\nmethod = "width"\n'
                      'remove_fraction = 0.25\n')
    out = tmp_path / "out"
    assert main(["prune", str(path), "--out", str(out), "--recipe", str(recipe), "--calib", str(text), *SMALL]) == 0
    history = json.loads((out / "secateur.json").read_text())["history"]
    assert [h["kind"] for h in history] == ["vocabulary", "width"]
    assert all(h["check"]["ratio"] > 0 for h in history)


def test_windows_after_a_vocabulary_stage_are_the_same_text():
    from secateur.data.calibration import retokenize

    tokenizer = byte_level_tokenizer()
    model = model_for(tokenizer)
    windows = windows_of(tokenizer, CORPUS[:4000], 48)
    report = prune(model, VocabularyConfig(keep_tokens=300), windows, tokenizer=tokenizer, progress=False)
    again = retokenize(windows, tokenizer, report.tokenizer, model)
    assert again.shape == windows.shape and int(again.max()) < 300
    text = "".join(report.tokenizer.decode(row) for row in again)
    assert "".join(tokenizer.decode(row) for row in windows).startswith(text)


@pytest.mark.parametrize("args, message", [
    (["--method", "vocabulary"], "exactly one of --keep-tokens"),
    (["--method", "vocabulary", "--coverage", "0.9", "--keep-tokens", "300"], "exactly one of --keep-tokens"),
    (["--method", "vocabulary", "--coverage", "1.5"], "--coverage must be in (0, 1]"),
    (["--method", "vocabulary", "--keep-tokens", "10"], "fewer than the"),
    (["--method", "wanda", "--coverage", "0.9"], "--coverage belongs to vocabulary"),
])  # fmt: skip
def test_bad_vocabulary_requests_refuse_in_one_line(args, message, bpe_model_dir, tmp_path, capsys):
    path, text = bpe_model_dir
    code, _, err = run(["prune", path, "--out", tmp_path / "out", "--calib", text, *SMALL, *args], capsys)
    errors = [line for line in err.splitlines() if "error" in line]  # (the model's loading bar may come first)
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "out").exists()


def test_tokenizers_it_cannot_rewrite_refuse_in_one_line(model_dir, text_file, tmp_path, capsys):
    code, _, err = run(["prune", model_dir("llama"), "--out", tmp_path / "out", "--method", "vocabulary",
                        "--coverage", "0.9", "--calib", text_file, *SMALL], capsys)  # fmt: skip
    assert code == 2 and "rewrites BPE tokenizers only; this one is WordLevel" in err
    assert not (tmp_path / "out").exists()


def test_the_teacher_folds_a_removed_token_onto_the_first_token_of_its_text():
    from secateur.vocabulary.teacher import KeptVocabulary, first_pieces

    tokenizer = byte_level_tokenizer()
    model = model_for(tokenizer)
    teacher = model_for(tokenizer)
    teacher.load_state_dict(model.state_dict())
    report = prune(model, VocabularyConfig(keep_tokens=350), windows_of(tokenizer, CORPUS[:3000]), tokenizer=tokenizer,
                   progress=False)  # fmt: skip
    new = report.tokenizer
    fold = first_pieces(new, tokenizer, len(tokenizer))
    checked = 0
    for token, i in tokenizer.get_vocab().items():  # by hand: the pruned tokenizer on the token's own text
        text = tokenizer.convert_tokens_to_string([token])
        if i in tokenizer.all_special_ids or "\ufffd" in text:
            continue
        assert int(fold[i]) == new(text, add_special_tokens=False)["input_ids"][0], token
        checked += 1
    assert checked > 300 and int((fold >= 0).sum()) == len(tokenizer)
    view = KeptVocabulary(teacher, tokenizer, new)
    kept = view.ids
    ids = torch.randint(0, 350, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = torch.softmax(teacher(kept[ids]).logits, dim=-1)  # (2, 24, teacher vocabulary)
        folded = torch.zeros(2, 24, 350).index_add_(2, fold, original)
        assert torch.allclose(torch.softmax(view(input_ids=ids).logits, dim=-1), folded, atol=1e-6)
        student = torch.softmax(model(ids).logits, dim=-1)  # the pruned student renormalises over kept tokens
        assert torch.allclose(student, original[..., kept] / original[..., kept].sum(-1, keepdim=True), atol=1e-5)
    twice = KeptVocabulary(view, tokenizer, new)  # a second pruning starts from the first teacher again
    assert twice.teacher is teacher and torch.equal(twice.ids, kept)


RECOVERY = 'method = "recovery"\ntokens = 256\ntrain_seq_len = 16\nval_windows = 2\n'


def test_recovery_after_a_vocabulary_stage_distils_from_the_original(bpe_model_dir, tmp_path):
    path, text = bpe_model_dir
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[[stage]]\nmethod = "vocabulary"\nkeep_tokens = 350\n\n[[stage]]\n{RECOVERY}')
    out = tmp_path / "out"
    assert main(["prune", str(path), "--out", str(out), "--recipe", str(recipe), "--calib", str(text), *SMALL]) == 0
    record = json.loads((out / "secateur.json").read_text())["history"][-1]
    assert record["kind"] == "recovery" and record["result"]["teacher"]["path"] == str(path.resolve())
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 350


def test_a_later_run_distils_from_the_origin_and_refuses_a_teacher_without_the_tokens(bpe_model_dir, model_dir,
                                                                                    tmp_path, capsys):  # fmt: skip
    path, text = bpe_model_dir
    pruned = tmp_path / "pruned"
    assert main(["prune", str(path), "--out", str(pruned), "--method", "vocabulary", "--keep-tokens", "350",
                 "--calib", str(text), *SMALL]) == 0  # fmt: skip
    train = ["train", pruned, "--tokens", 256, "--train-seq-len", 16, "--val-windows", 2, "--calib", text, *SMALL[4:]]
    assert main([str(a) for a in [*train, "--out", tmp_path / "trained"]]) == 0
    code, _, err = run([*train, "--out", tmp_path / "other", "--teacher", model_dir("llama")], capsys)
    assert code == 2 and "the teacher's tokenizer lacks" in err and not (tmp_path / "other").exists()


def test_the_config_is_a_stage_like_the_others():
    config = build_stage({"method": "vocabulary", "coverage": 0.99})
    assert config == VocabularyConfig(coverage=0.99)
    with pytest.raises(ConfigError):
        VocabularyConfig(keep_tokens=0)
