"""GemFilter token pruning: the selection on hand-computed scores, the scores against the attention
a model computes, padding, generation, the haystacks, and `secateur generate` / `filter-layer`."""

import json

import pytest
import torch

from conftest import FAMILIES, MOE_FAMILIES, VOCAB, tiny_model, tiny_tokenizer
from secateur.cli import main
from secateur.data.haystack import answered, haystacks
from secateur.errors import ConfigError
from secateur.generate.filter_layer import depths, recommend_layer
from secateur.generate.tokens import (TokenPruning, attention_modules, filter_scores, generate, last_query_scores,
                                      left_pad, prune_prompts, select)  # fmt: skip


def ids(length, seed=0):
    return torch.randint(4, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- the math ----------------------------------------------------------------------------------------


def test_select_keeps_the_highest_scores_in_their_order():
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 4.0, 0.0])
    assert select(scores, 3, pool=1).tolist() == [1, 3, 4]


def test_select_pools_before_the_top_k():
    # moving average of width 3, zeros beyond the ends: 0, 3, 3, 3, 0, 1, 2, 3, 2
    scores = torch.tensor([0.0, 0, 9, 0, 0, 0, 3, 3, 3])
    assert select(scores, 4, pool=3).tolist() == [1, 2, 3, 7]
    assert select(scores, 4, pool=1).tolist() == [2, 6, 7, 8]  # without pooling: the single peaks


def test_select_keeps_a_prompt_within_the_budget_whole():
    assert select(torch.randn(5), 5).tolist() == [0, 1, 2, 3, 4]
    assert select(torch.randn(5), 9).tolist() == [0, 1, 2, 3, 4]


def test_last_query_scores_sum_the_heads_dot_products_by_hand():
    query = torch.zeros(1, 2, 2, 2)
    query[0, 0, -1] = torch.tensor([1.0, 0.0])
    query[0, 1, -1] = torch.tensor([0.0, 2.0])
    query[0, :, 0] = 100.0  # an earlier query: not read
    key = torch.tensor([[[[1.0, 1.0], [2.0, 0.0], [0.0, 3.0]]]])  # one key/value group, 3 positions
    # head 0: 1, 2, 0; head 1: 2, 0, 6
    assert last_query_scores(query, key).tolist() == [[3.0, 2.0, 6.0]]


def test_last_query_scores_read_each_head_s_own_key_group():
    query = torch.zeros(1, 4, 1, 2)
    query[0, 1, -1] = torch.tensor([1.0, 0.0])  # head 1 of 4 reads group 0 of 2 (heads 0, 1 -> 0; 2, 3 -> 1)
    key = torch.stack([torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[5.0, 0.0], [7.0, 0.0]])])[None]
    assert last_query_scores(query, key).tolist() == [[1.0, 2.0]]


def test_settings_are_checked():
    for bad in (dict(filter_layer=-1), dict(filter_layer=0, budget=0), dict(filter_layer=0, pool=4)):
        with pytest.raises(ConfigError):
            TokenPruning(**bad)


# --- the scores in a model ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_scores_are_the_attention_logits_the_model_computes(family):
    """scale * score_j - sum over heads of log attention_h,j is the same for every key j (the sum of the
    heads' log-normalisers): the scores are the summed logits of the last query, in the filter block."""
    model = tiny_model(family)
    block = len(attention_modules(model)) - 1  # Gemma 3's last block attends globally
    prompt = torch.tensor([ids(24)])
    scores = filter_scores(model, prompt, None, [block])[block][0]
    model.set_attn_implementation("eager")
    weights = model(prompt, output_attentions=True).attentions[block][0, :, -1]  # (heads, positions)
    logs = weights.double().log().sum(0)
    # logs = scale * scores - constant: a line through the points, whatever the family's scale
    design = torch.stack([scores.double(), torch.ones_like(logs)], 1)
    (scale, constant), *_ = torch.linalg.lstsq(design, logs[:, None]).solution.view(-1), None
    assert scale > 0
    assert torch.allclose(design @ torch.stack([scale, constant]), logs, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_padded_prompt_scores_as_it_does_alone(family):
    model = tiny_model(family)
    short, long = ids(10, 1), ids(17, 2)
    batch, mask = left_pad([long, short], pad=3)
    together = filter_scores(model, batch, mask, [1])[1]
    alone = filter_scores(model, torch.tensor([short]), None, [1])[1]
    assert torch.allclose(together[1, -10:], alone[0], atol=1e-4)


def test_the_filter_pass_restores_the_attention_and_refuses_missing_blocks():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    filter_scores(model, torch.tensor([ids(8)]), None, [0])
    assert model.config._attn_implementation == before
    with pytest.raises(ConfigError, match="0..1"):
        filter_scores(model, torch.tensor([ids(8)]), None, [2])
    assert model.config._attn_implementation == before


def test_the_filter_pass_stops_after_the_filter_block():
    model = tiny_model("llama")
    ran = []
    model.model.layers[1].register_forward_pre_hook(lambda *a: ran.append(1))
    filter_scores(model, torch.tensor([ids(8)]), None, [0])
    assert ran == []
    filter_scores(model, torch.tensor([ids(8)]), None, [1])
    assert ran == [1]


# --- pruning prompts and generating ------------------------------------------------------------------


def test_kept_tokens_are_the_selection_of_the_filter_block():
    model = tiny_model("llama")
    prompt = ids(30)
    settings = TokenPruning(filter_layer=1, budget=8, pool=3)
    scores = filter_scores(model, torch.tensor([prompt]), None, [1])[1][0]
    chosen = select(scores, 8, 3).tolist()
    assert prune_prompts(model, [prompt], settings) == [[prompt[j] for j in chosen]]


def test_a_batch_of_lengths_prunes_each_prompt_as_alone():
    model = tiny_model("qwen3")
    prompts = [ids(30, 1), ids(6, 2), ids(21, 3)]
    settings = TokenPruning(filter_layer=0, budget=8)
    together = prune_prompts(model, prompts, settings, pad=3)
    assert together[1] == prompts[1]  # within the budget: whole
    assert [len(p) for p in together] == [8, 6, 8]
    assert together == [prune_prompts(model, [p], settings, pad=3)[0] for p in prompts]


def test_generation_with_a_budget_covering_the_prompt_is_plain_generation():
    from secateur.generate import greedy

    model = tiny_model("llama")
    prompt = ids(20)
    plain = generate(model, [prompt], 12)
    covered = generate(model, [prompt], 12, TokenPruning(filter_layer=1, budget=20))
    assert covered.tokens == plain.tokens == [greedy(model, torch.tensor([prompt]), 12).tokens]
    assert covered.kept == [20]


def test_generation_with_pruning_is_generation_on_the_kept_tokens():
    model = tiny_model("llama")
    prompts = [ids(40, 4), ids(25, 5)]
    settings = TokenPruning(filter_layer=0, budget=10)
    pruned = generate(model, prompts, 8, settings, pad=3)
    kept = prune_prompts(model, prompts, settings, pad=3)
    assert pruned.kept == [10, 10] and pruned.prompt_tokens == [40, 25]
    for row, prompt in enumerate(kept):
        assert pruned.tokens[row] == generate(model, [prompt], 8).tokens[0]


def test_generation_stops_at_the_end_token():
    model = tiny_model("llama")
    prompt = ids(12)
    free = generate(model, [prompt], 10).tokens[0]
    stopped = generate(model, [prompt], 10, eos=free[3]).tokens[0]
    assert stopped == free[:free.index(free[3])]


# --- choosing the layer ------------------------------------------------------------------------------


def test_the_earliest_block_near_the_best_is_recommended():
    assert recommend_layer([0.1, 0.5, 0.85, 0.9, 0.7], tolerance=0.1) == 2
    assert recommend_layer([0.1, 0.5, 0.85, 0.9, 0.7], tolerance=0.0) == 3
    assert depths(4) == [0.125, 0.375, 0.625, 0.875]


def test_haystacks_plant_the_number_at_its_depth():
    tokenizer = tiny_tokenizer()
    text = [4 + i % 100 for i in range(2000)]
    stacks = haystacks(tokenizer, text, 120, [0.0, 0.5, 1.0], seed=3)
    for stack in stacks:
        assert len(stack.ids) == 120
        assert stack.answer.isdigit() and len(stack.answer) == 5
    starts = [s.span[0] for s in stacks]
    assert starts[0] < starts[1] < starts[2]
    assert answered(f"It is {stacks[0].answer}.", stacks[0]) and not answered("It is 1.", stacks[0])
    with pytest.raises(ConfigError, match="too few"):
        haystacks(tokenizer, text[:150], 120, [0.5, 0.5], seed=3)


# --- the commands ------------------------------------------------------------------------------------


def test_generate_command_prunes_long_prompts(model_dir, tmp_path, capsys):
    path = model_dir("llama")
    files = []
    for i, length in enumerate((40, 5)):
        files.append(tmp_path / f"p{i}.txt")
        files[-1].write_text(" ".join(f"w{j % 90}" for j in range(length)))
    flags = [a for f in files for a in ("--prompt-file", str(f))]
    assert main(["generate", str(path), *flags, "--max-new-tokens", "4", "--filter-layer", "1", "--budget", "8",
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == [40, 5] and result["kept_tokens"] == [8, 5]
    assert result["token_pruning"] == {"filter_layer": 1, "budget": 8, "pool": 5}


@pytest.mark.parametrize("flags, message", [
    (["--budget", "8"], "applies only with token pruning"),
    (["--no-chat"], "no-chat applies only"),
    (["--filter-layer", "1", "--pool", "2"], "--pool must be an odd"),
    (["--filter-layer", "7", "--budget", "4"], "0..1"),
    (["--max-new-tokens", "0"], "at least 1"),
])  # fmt: skip
def test_generate_command_refuses_bad_settings(model_dir, tmp_path, capsys, flags, message):
    prompt = tmp_path / "p.txt"
    prompt.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10")
    assert main(["generate", str(model_dir("llama")), "--prompt-file", str(prompt), *flags]) == 2
    assert message in capsys.readouterr().err


def test_filter_layer_command_writes_settings_generate_reads(model_dir, tmp_path, text_file, capsys):
    path, out = model_dir("llama"), tmp_path / "filter.json"
    search = ["--text", str(text_file), "--length", "64", "--samples", "2", "--budget", "16"]
    assert main(["filter-layer", str(path), "--out", str(out), *search]) == 0
    record = json.loads(out.read_text())
    assert record["token_pruning"]["budget"] == 16 and len(record["recall"]) == 2
    assert record["token_pruning"]["filter_layer"] == recommend_layer(record["recall"], 0.1)
    assert main(["filter-layer", str(path), "--out", str(out), *search]) == 2  # no overwrite unless asked
    assert "already exists" in capsys.readouterr().err
    assert main(["filter-layer", str(path), "--out", str(out), *search, "--overwrite"]) == 0
    prompt = tmp_path / "p.txt"
    prompt.write_text(" ".join(f"w{j}" for j in range(30)))
    capsys.readouterr()
    assert main(["generate", str(path), "--prompt-file", str(prompt), "--settings", str(out), "--budget", "12",
                 "--max-new-tokens", "2", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["kept_tokens"] == [12]  # the flag overrides the file
    assert main(["generate", str(path), "--prompt-file", str(prompt), "--settings", str(prompt)]) == 2
    assert "cannot read it as JSON" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text('{"filter_layer": 1}')
    assert main(["generate", str(path), "--prompt-file", str(prompt), "--settings", str(other)]) == 2
    assert "not a file written by secateur filter-layer" in capsys.readouterr().err


# --- early exit and self-speculation -----------------------------------------------------------------


def test_early_exit_at_threshold_one_is_greedy_decoding():
    from secateur.generate import greedy
    from secateur.generate.early_exit import early_exit

    for family in ("llama", "qwen3", "gemma3_text"):
        model = tiny_model(family)
        prompt = torch.tensor([ids(10, 6)])
        exited = early_exit(model, prompt, 12, 1.0, [0])
        assert exited.tokens == greedy(model, prompt, 12).tokens
        assert exited.exit_blocks == [2] * 11


def test_an_exited_token_is_the_exit_block_s_readout():
    """Exiting after block 0 at every token: each new token is the LM head's argmax over the final norm
    of block 0's output at the last position (block 0 always runs in full, so a plain forward over the
    sequence so far gives that state)."""
    from secateur.generate.early_exit import early_exit

    model = tiny_model("llama")
    prompt = ids(10, 7)
    exited = early_exit(model, torch.tensor([prompt]), 10, 0.0, [0])
    assert exited.exit_blocks == [1] * 9
    for i in range(1, 10):
        sequence = torch.tensor([prompt + exited.tokens[:i]])
        with torch.no_grad():
            state = model(sequence, output_hidden_states=True).hidden_states[1][0, -1]
            assert int(model.lm_head(model.model.norm(state)).argmax()) == exited.tokens[i]


def test_blocks_after_the_exit_cache_the_exited_state():
    """CALM's state propagation: blocks 1 and 2's cached keys of a token that exited after block 0 are
    their key projections of the exited state (through their input norms, with the rotary embedding
    at that position), not of what block 1 would have passed on."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from secateur.generate.early_exit import _exiting

    model = tiny_model("llama", num_hidden_layers=3)
    prompt = torch.tensor([ids(10, 8)])
    with torch.no_grad(), _exiting(model, 0.0, [0]) as run:
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        run.active = True
        model(input_ids=token, past_key_values=cache, use_cache=True)
        state = run.state
    assert run.block == 1
    for index in (1, 2):
        block = model.model.layers[index]
        hidden = block.input_layernorm(state)
        key = block.self_attn.k_proj(hidden).view(1, 1, -1, 16).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.tensor([[10]]))
        _, key = apply_rotary_pos_emb(key, key, cos, sin)
        assert cache.layers[index].keys.shape[2] == 11
        assert torch.allclose(cache.layers[index].keys[:, :, -1:], key, atol=1e-5)


def test_early_exit_leaves_the_model_as_it_was():
    from secateur.generate.early_exit import early_exit

    model = tiny_model("llama")
    prompt = torch.tensor([ids(10, 9)])
    before = model(prompt).logits
    early_exit(model, prompt, 6, 0.0, [0])
    assert "forward" not in vars(model.model.layers[0])
    assert type(model.model.layers[1].mlp).__name__ == "LlamaMLP"
    assert torch.equal(model(prompt).logits, before)
    with pytest.raises(ConfigError, match="exit blocks"):
        early_exit(model, prompt, 6, 0.5, [1])  # after the last block nothing is left to skip


def test_self_speculation_is_lossless_and_shares_the_weights():
    from secateur.generate import greedy
    from secateur.generate.early_exit import self_speculative, shallow_view

    model = tiny_model("qwen3")
    prompt = torch.tensor([ids(10, 10)])
    assert self_speculative(model, prompt, 16, 1, 3).tokens == greedy(model, prompt, 16).tokens
    view = shallow_view(model, 1)
    assert len(view.model.layers) == 1 and len(model.model.layers) == 2
    assert model.config.num_hidden_layers == 2 and view.config.num_hidden_layers == 1
    assert view.model.layers[0] is model.model.layers[0] and view.lm_head is model.lm_head
    with pytest.raises(ConfigError, match="1..1"):
        shallow_view(model, 2)


def test_teacher_forced_early_exit_scores_the_given_tokens():
    from secateur.generate.early_exit import early_exit

    model = tiny_model("llama")
    text = ids(20, 11)
    forced = early_exit(model, torch.tensor([text[:8]]), 0, 1.0, [0], forced=text[8:])
    assert forced.tokens == text[8:]
    with torch.no_grad():
        logits = model(torch.tensor([text])).logits[0, 7:-1].log_softmax(-1)
    expected = -logits.gather(1, torch.tensor(text[8:]).view(-1, 1)).view(-1)
    assert torch.allclose(torch.tensor(forced.nll), expected, atol=1e-4)


def test_saturation_exits_where_the_block_barely_turns_the_state():
    """CALM's saturation measure: the cosine of block 0's output with its input at the new token,
    computed by hand, decides the exit on either side of it."""
    from secateur.generate import greedy
    from secateur.generate.early_exit import early_exit

    model = tiny_model("llama")
    prompt = ids(10, 12)
    first = greedy(model, torch.tensor([prompt]), 1).tokens
    with torch.no_grad():
        states = model(torch.tensor([prompt + first]), output_hidden_states=True).hidden_states
    cosine = float(torch.cosine_similarity(states[1][0, -1], states[0][0, -1], dim=0))
    below = early_exit(model, torch.tensor([prompt]), 2, cosine - 1e-4, [0], measure="saturation")
    above = early_exit(model, torch.tensor([prompt]), 2, cosine + 1e-4, [0], measure="saturation")
    assert below.exit_blocks == [1] and above.exit_blocks == [2]
    assert early_exit(model, torch.tensor([prompt]), 8, 1.0, [0], measure="saturation").tokens == \
        greedy(model, torch.tensor([prompt]), 8).tokens


# --- secateur eval with token pruning --------------------------------------------------------------------


def test_continuation_perplexity_after_the_whole_prompt_is_the_windows_own_prediction_of_its_tail():
    import math

    import torch.nn.functional as F

    from secateur.generate.tokens import continuation_perplexity

    model = tiny_model("llama")
    windows = torch.tensor([ids(24, 6), ids(24, 7), ids(24, 8)])
    result = continuation_perplexity(model, windows, 5, None, batch_size=2)
    with torch.no_grad():
        logits = model(windows).logits[:, -6:-1]  # the predictions of the last 5 tokens
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, -5:].flatten())
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert result["prompt_tokens"] == 19 and result["kept_prompt_tokens"] == 19


def test_continuation_perplexity_after_a_cut_prompt_reads_the_kept_tokens_then_the_tail():
    import math

    import torch.nn.functional as F

    from secateur.generate.tokens import continuation_perplexity

    model = tiny_model("qwen3")
    windows = torch.tensor([ids(30, 9), ids(30, 10)])
    settings = TokenPruning(filter_layer=1, budget=7, pool=3)
    result = continuation_perplexity(model, windows, 4, settings, batch_size=2)
    kept = prune_prompts(model, [w[:-4].tolist() for w in windows], settings)
    assert [len(k) for k in kept] == [7, 7] and result["kept_prompt_tokens"] == 7
    total = 0.0
    for prompt, window in zip(kept, windows):  # each alone: the kept prompt as a fresh sequence, then the tail
        sequence = torch.tensor([prompt + window[-4:].tolist()])
        with torch.no_grad():
            logits = model(sequence).logits[0, 6:-1]
        total += float(F.cross_entropy(logits, window[-4:], reduction="sum"))
    assert result["perplexity"] == pytest.approx(math.exp(total / 8), rel=1e-5)
    # a budget that covers the prompt cuts nothing
    covered = continuation_perplexity(model, windows, 4, TokenPruning(filter_layer=1, budget=26), batch_size=2)
    assert covered["perplexity"] == pytest.approx(continuation_perplexity(model, windows, 4, None)["perplexity"])


def test_eval_command_reports_the_tail_after_the_whole_and_the_cut_prompt(model_dir, text_file, capsys):
    path = model_dir("llama")
    assert main(["eval", str(path), "--data", str(text_file), "--seq-len", "40", "--windows", "3",
                 "--filter-layer", "1", "--budget", "10", "--score-tokens", "8", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["token_pruning"] == {"filter_layer": 1, "budget": 10, "pool": 5}
    [one] = result["sources"].values()
    assert one["whole_prompt"]["prompt_tokens"] == 32 and one["pruned_prompt"]["kept_prompt_tokens"] == 10
    assert one["ratio"] == pytest.approx(one["pruned_prompt"]["perplexity"] / one["whole_prompt"]["perplexity"])


@pytest.mark.parametrize("flags, message", [
    (["--budget", "10"], "--budget applies only with --filter-layer (token pruning)"),
    (["--filter-layer", "1", "--budget", "40"], "give a prompt longer than the budget"),
    (["--filter-layer", "5"], "0..1"),
    (["--filter-layer", "1", "--tasks", "secateur_wordnet"], "applies only with perplexity"),
])  # fmt: skip
def test_eval_command_refuses_token_pruning_it_cannot_do(model_dir, text_file, capsys, flags, message):
    assert main(["eval", str(model_dir("llama")), "--seq-len", "48", *flags]) == 2
    assert message in capsys.readouterr().err
