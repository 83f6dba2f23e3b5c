"""Greedy and speculative decoding: the speculative output is the target's greedy output whatever the
draft, the acceptance counts by hand, and `secateur bench --draft`."""

import json

import pytest
import torch

from conftest import tiny_model
from secateur.cli import main
from secateur.depth.structure import remove_blocks
from secateur.errors import SecateurError
from secateur.generate import greedy, speculative
from secateur.io import save
from secateur.models import adapter_for


def prompt(length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def by_hand(model, ids, new_tokens):
    """Greedy without a cache: the whole sequence through the model for every token."""
    sequence = ids[0].tolist()
    for _ in range(new_tokens):
        with torch.no_grad():
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[ids.shape[1]:]


def test_greedy_with_the_cache_is_greedy_without_it():
    model = tiny_model("llama")
    assert greedy(model, prompt(), 20).tokens == by_hand(model, prompt(), 20)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_output_is_the_target_greedy_output_whatever_the_draft(k):
    target = tiny_model("llama", seed=0)
    shallow = tiny_model("llama", seed=0)
    remove_blocks(shallow, adapter_for(shallow), [1])
    for draft in (tiny_model("llama", seed=1), shallow):  # a stranger, and the target's own first block
        for seed in range(3):
            result = speculative(target, draft, prompt(seed=seed), 25, k=k)
            assert result.tokens == greedy(target, prompt(seed=seed), 25).tokens
            assert result.proposed == k * result.target_calls and 0 <= result.accepted <= result.proposed
            assert sum(result.accepted_per_round) == result.accepted


def test_a_draft_that_is_the_target_is_always_accepted():
    target = tiny_model("llama")
    result = speculative(target, target, prompt(), 21, k=4)
    assert result.acceptance == 1.0 and result.accepted_per_round == [4] * 4  # 1 + 4 x (4 + 1) = 21 tokens
    assert result.tokens == greedy(target, prompt(), 21).tokens


def test_acceptance_counts_the_matching_prefix_only():
    """A draft that always proposes one fixed token (the target's most frequent one here): accepted exactly
    where the target would pick it too."""
    target = tiny_model("llama")
    reference = greedy(target, prompt(), 30).tokens
    fixed = max(set(reference), key=reference.count)

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("llama", seed=3)

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
            out = self.inner(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache)
            out.logits = torch.full_like(out.logits, -1.0)
            out.logits[..., fixed] = 1.0
            return out

    result = speculative(target, Fixed(), prompt(), 30, k=2)
    assert result.tokens == reference
    expected, position = [], 1  # walk the reference: each round proposes the token twice after the last one
    while position < 30:
        accepted = 0
        while accepted < 2 and position + accepted < len(reference) and reference[position + accepted] == fixed:
            accepted += 1
        expected.append(accepted)
        position += accepted + 1
    assert result.accepted_per_round == expected and result.accepted > 0


def test_a_draft_of_another_vocabulary_is_refused():
    with pytest.raises(SecateurError, match="share the target's vocabulary"):
        speculative(tiny_model("llama"), tiny_model("llama", vocab_size=64), prompt(), 5)


def test_bench_with_a_draft(model_dir, text_file, tmp_path, capsys):
    shallow = tiny_model("llama")
    remove_blocks(shallow, adapter_for(shallow), [1])
    draft = tmp_path / "draft"
    from conftest import tiny_tokenizer

    save(shallow, tiny_tokenizer(), draft, {})
    args = ["bench", str(model_dir("llama")), "--draft", str(draft), "--prompt", "16", "--new-tokens", "10",
            "--repeats", "1", "--prompt-text", str(text_file)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert result["identical"] and 0 <= result["acceptance"] <= 1 and result["speedup"] > 0
    assert main([*args, "--rounds", "2"]) == 2
    assert "--rounds applies only with several models (not --draft)" in capsys.readouterr().err
    assert main(["bench", str(model_dir("llama")), str(draft), "--draft", str(draft)]) == 2
    assert "one model with its draft" in capsys.readouterr().err
    assert main(["bench", str(model_dir("llama")), "--draft-tokens", "3"]) == 2
    assert "--draft-tokens applies only with --draft" in capsys.readouterr().err


def test_bench_with_the_model_s_own_first_blocks_as_draft(model_dir, text_file, capsys):
    args = ["bench", str(model_dir("llama")), "--prompt", "16", "--new-tokens", "10", "--repeats", "1",
            "--prompt-text", str(text_file)]
    assert main([*args, "--draft-blocks", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert result["identical"] and result["draft"] == "its first 1 blocks"
    assert main([*args, "--draft-blocks", "2"]) == 2
    assert "fewer than the model's 2 blocks" in capsys.readouterr().err
    assert main([*args, "--draft-blocks", "1", "--draft", str(model_dir("llama"))]) == 2
    assert "give one" in capsys.readouterr().err


def test_speculation_rolls_back_sliding_window_caches():
    """Gemma 3's sliding layers drop states beyond their window; the caches record them after the
    prefill, so rounds can be cut back past the window (prompt 30 > window 8)."""
    from secateur.generate import self_speculative

    target = tiny_model("gemma3_text")
    ids = prompt(30, seed=3)
    reference = greedy(target, ids, 25).tokens
    assert speculative(target, tiny_model("gemma3_text", seed=1), ids, 25, k=4).tokens == reference
    assert self_speculative(target, ids, 25, 1, 3).tokens == reference


def test_the_cache_goes_under_the_name_the_forward_takes():
    """The installed transformers' own name for the KV cache (no deprecation warning from a decode), and
    the old name for a forward that only knows `past_key_values`."""
    import warnings

    from secateur.models.cache import with_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    model = tiny_model("llama")
    assert set(with_cache(Old(), "c")) == {"past_key_values", "use_cache"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert greedy(model, prompt(), 6).tokens == by_hand(model, prompt(), 6)
        assert speculative(model, tiny_model("llama", seed=3), prompt(), 6).tokens == by_hand(model, prompt(), 6)
