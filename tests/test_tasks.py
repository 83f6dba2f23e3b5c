"""lm-eval tasks on secateur's model objects, and the WordNet knowledge probe's generator."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from secateur.cli import main
from secateur.io import save
from secateur.tasks.harness import run_tasks
from secateur.tasks.wordnet import CHOICES, build_items, parse_counts, parse_data_line, read_wordnet, write_task

# --- the probe's generator, on a small WordNet in WordNet's own format ---------------------------------

LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton University",
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus Canis; \"the dog barked\"",
    "02121620 05 n 01 cat 0 000 | feline mammal usually having thick soft fur",
    "02402425 05 n 01 cattle 0 000 | domesticated bovine animals as a group",
    "01503061 05 n 01 bird 0 000 | warm-blooded egg-laying vertebrates with feathers",
    "02374451 05 n 01 horse 0 000 | solid-hoofed herbivorous quadruped domesticated since prehistoric times",
    "02411705 05 n 01 sheep 1 000 | woolly usually horned ruminant mammal",
    "02512053 05 n 01 fish 0 000 | any of various mostly cold-blooded aquatic vertebrates usually having scales",
    "03791235 06 n 01 motor_vehicle 0 000 | a self-propelled wheeled vehicle",
    "02958343 06 n 01 car 0 000 | a motor vehicle with four wheels; usually propelled by an engine",
    "04490091 06 n 01 truck 0 000 | an automotive vehicle suitable for hauling",
    "02834778 06 n 01 bicycle 0 000 | a wheeled vehicle that has two wheels and is moved by foot pedals",
    "03594945 06 n 01 jeep 0 000 | a car suitable for traveling over rough terrain",
    "02690373 06 n 01 airliner 0 000 | an airplane that carries passengers",
]
COUNTS = [f"{w}%1:{f}:{i:02d}:: 1 {n}" for w, f, i, n in [
    ("dog", "05", 0, 40), ("cat", "05", 0, 20), ("cattle", "05", 0, 9), ("bird", "05", 0, 12), ("horse", "05", 0, 30),
    ("sheep", "05", 1, 6), ("fish", "05", 0, 3), ("car", "06", 0, 50), ("truck", "06", 0, 12),
    ("bicycle", "06", 0, 8), ("jeep", "06", 0, 5), ("airliner", "06", 0, 7)]] + ["cat%1:05:01:: 2 99"]  # fmt: skip


@pytest.fixture
def wordnet(tmp_path):
    (tmp_path / "data.noun").write_text("\n".join(LINES) + "\n")
    (tmp_path / "cntlist.rev").write_text("\n".join(COUNTS) + "\n")
    return tmp_path


def test_parse_data_line_reads_words_lex_ids_and_the_definition_only():
    assert parse_data_line(LINES[0]) is None
    dog = parse_data_line(LINES[1])
    assert dog.offset == "02084071" and dog.lexfile == 5
    assert dog.words == ("dog", "domestic_dog", "Canis_familiaris") and dog.lex_ids == (0, 0, 0)
    assert dog.gloss == "a member of the genus Canis"  # the usage example is gone
    assert parse_data_line(LINES[6]).lex_ids == (1,)  # lex ids are hexadecimal digits
    assert parse_counts(iter(["dog%1:05:00:: 1 40"])) == {"dog%1:05:00::": (1, 40)}


def test_items_are_deterministic_and_well_formed(wordnet):
    synsets, counts = read_wordnet(wordnet)
    items = build_items(synsets, counts, n=20, min_tags=5)
    assert items == build_items(*read_wordnet(wordnet), n=20, min_tags=5)
    assert items != build_items(synsets, counts, n=20, min_tags=5, seed=1)
    answers = {item["choices"][item["answer"]] for item in items}
    # fish has 3 tags (rare); jeep's gloss holds "car" but not "jeep"; the car's gloss names no car
    assert answers == {"dog", "cat", "cattle", "bird", "horse", "sheep", "car", "truck", "bicycle", "jeep", "airliner"}
    animals = {"dog", "cat", "cattle", "bird", "horse", "sheep"}
    for item in items:
        word = item["choices"][item["answer"]]
        assert len(set(item["choices"])) == CHOICES and word not in item["question"].split('"')[1]
        assert set(item["choices"]) <= animals or not set(item["choices"]) & animals  # distractors of the same file
        assert item["question"].startswith('The word for "') and item["question"].endswith('" is')
    dog = next(i for i in items if i["choices"][i["answer"]] == "dog")
    assert dog["question"] == 'The word for "a member of the genus Canis" is'


def test_a_word_whose_first_sense_is_elsewhere_is_not_asked(wordnet):
    (wordnet / "cntlist.rev").write_text("\n".join(c for c in COUNTS if not c.startswith("cat%1:05:00")) + "\n")
    items = build_items(*read_wordnet(wordnet), n=20, min_tags=5)
    assert "cat" not in {i["choices"][i["answer"]] for i in items}  # its sense 1 is another synset


def test_missing_wordnet_says_what_to_install(tmp_path):
    with pytest.raises(Exception, match="wordnet-base"):
        read_wordnet(tmp_path)


# --- lm-eval on a model whose preference is known ----------------------------------------------------


def always_w0():
    """A GPT-2 whose final LayerNorm outputs one constant vector, whose dot product with the tied
    embeddings is 10 for token w0 and about 0 for every other token: it prefers w0 everywhere."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        w0 = tiny_tokenizer().convert_tokens_to_ids("w0")
        model.transformer.wte.weight[w0] = 0.0
        model.transformer.wte.weight[w0, 0] = 10.0
    return model


def local_task(tmp_path, answers):
    docs = [{"question": f"w{5 + i} w{6 + i}", "choices": ["w0", "w1", "w2", "w3"], "answer": a}
            for i, a in enumerate(answers)]  # fmt: skip
    data = tmp_path / "tasks" / "always_a.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks" / "always_a.yaml").write_text(
        f"task: always_a\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 2.0\n")
    return tmp_path / "tasks"


def test_a_model_that_always_prefers_a_scores_the_share_of_a(tmp_path):
    answers = [0, 1, 0, 2, 3, 0, 1, 0, 2, 0, 0]  # 6 of 11 are A
    result = run_tasks(always_w0(), tiny_tokenizer(), ["always_a"], include_path=[local_task(tmp_path, answers)])
    task = result["tasks"]["always_a"]
    assert task["metrics"]["acc"] == pytest.approx(6 / 11, abs=1e-12)
    assert task["version"] == 2.0 and task["samples"] == 11 and result["lm_eval_version"]
    limited = run_tasks(always_w0(), tiny_tokenizer(), ["always_a"], include_path=[tmp_path / "tasks"], limit=4)
    assert limited["tasks"]["always_a"]["metrics"]["acc"] == pytest.approx(2 / 4)  # the first four: A, B, A, C


def test_cli_tasks_write_results_and_refuse_what_does_not_apply(tmp_path, capsys):
    tasks = local_task(tmp_path, [0, 1, 0, 0])
    model = tmp_path / "model"
    save(always_w0(), tiny_tokenizer(), model, {})
    results = tmp_path / "results.json"
    args = ["eval", str(model), "--tasks", "always_a", "--include-path", str(tasks), "--device", "cpu"]
    assert main([*args, "--results", str(results)]) == 0
    assert "always_a v2.0: acc 0.7500" in capsys.readouterr().out
    assert json.loads(results.read_text())["tasks"]["always_a"]["metrics"]["acc"] == 0.75
    assert main([*args, "--results", str(results)]) == 2 and "already exists" in capsys.readouterr().err
    assert main([*args, "--windows", "4"]) == 2 and "--windows applies only with perplexity" in capsys.readouterr().err
    assert main(["eval", str(model), "--limit", "3"]) == 2 and "only with --tasks" in capsys.readouterr().err
    assert main(["eval", str(model), "--tasks", "no_such_task", "--include-path", str(tasks)]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err


def test_the_probe_task_file_points_at_its_items(wordnet, tmp_path):
    directory = write_task(tmp_path / "probe", n=5, root=wordnet)
    yaml = (directory / "secateur_wordnet.yaml").read_text()
    assert str(directory / "secateur_wordnet.jsonl") in yaml and "output_type: multiple_choice" in yaml
    assert len((directory / "secateur_wordnet.jsonl").read_text().splitlines()) == 5


# --- generation samples ------------------------------------------------------------------------------


def test_generate_prints_the_reference_from_the_manifest_beside_the_model(tmp_path, capsys, model_dir):
    from secateur.tasks.generate import PROMPTS

    origin = model_dir("llama")
    out = tmp_path / "pruned"
    assert main(["prune", str(origin), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--generate", "--new-tokens", "5", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == str(origin.resolve()) and len(result["samples"]) == len(PROMPTS)
    assert all(s["model"] and s["reference"] for s in result["samples"])
    assert main(["eval", str(out), "--generate", "--windows", "3"]) == 2 and "--windows applies only with perplexity" in capsys.readouterr().err
    assert main(["eval", str(out), "--new-tokens", "3"]) == 2 and "only with --generate" in capsys.readouterr().err


def test_prompts_go_through_the_chat_template_where_there_is_one():
    from secateur.tasks.generate import prompt_ids

    tokenizer = tiny_tokenizer()
    plain = prompt_ids(tokenizer, "w1 w2")
    tokenizer.chat_template = "{% for m in messages %}<s> w9 {{ m['content'] }} w8{% endfor %}"
    templated = prompt_ids(tokenizer, "w1 w2")
    assert plain[0].tolist() == tokenizer("w1 w2").input_ids
    assert templated[0].tolist() == tokenizer.convert_tokens_to_ids(["<s>", "w9", "w1", "w2", "w8"])


def test_prune_records_tasks_in_the_manifest_and_refuses_unknown_ones_first(wordnet, tmp_path, model_dir,
                                                                           monkeypatch, capsys):  # fmt: skip
    import secateur.tasks.harness as harness

    probe = write_task(tmp_path / "probe", n=6, root=wordnet)
    monkeypatch.setattr(harness, "probe_dir", lambda: probe)
    out = tmp_path / "out"
    args = ["prune", str(model_dir("llama")), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)]
    assert main([*args, "--eval-tasks", "secateur_wordnet,no_such_task"]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--eval-tasks", "secateur_wordnet"]) == 0
    tasks = json.loads((out / "secateur.json").read_text())["evaluation"]["tasks"]
    probe_result = tasks["tasks"]["secateur_wordnet"]
    assert probe_result["samples"] == 6 and 0 <= probe_result["metrics"]["acc"] <= 1 and tasks["lm_eval_version"]
    assert json.loads((out / "secateur.json").read_text())["recipe"]["eval_tasks"] == "secateur_wordnet"


# --- the analogy task -----------------------------------------------------------------------------------

ANALOGIES = """: capitals
Athens Greece Berlin Germany
Athens Greece Paris France
Berlin Germany Rome Italy
: plural
cat cats dog dogs
dog dogs bird birds
bird birds cat cats
bird birds horse horses
cow cows horse horses
horse horses cow cows
"""


def test_analogy_items_come_in_turn_from_the_sections_with_their_own_answers():
    from secateur.tasks.analogy import build_items, parse_questions

    sections = parse_questions(ANALOGIES.splitlines())
    assert sections["capitals"][1] == ("Athens", "Greece", "Paris", "France") and len(sections["plural"]) == 6
    items = build_items(sections, n=10, seed=0)
    # capitals' answers are {Germany, France, Italy}: without the question's own words two are left,
    # fewer than three distractors, so it asks nothing; plural's five answers leave three every time
    assert {item["section"] for item in items} == {"plural"} and len(items) == 6
    for item in items:
        a, b, c = item["id"].split(":")[1:]
        answer = item["choices"][item["answer"]]
        assert item["question"] == f"{a} is to {b} as {c} is to"
        assert (a, b, c, answer) in sections["plural"] and len(item["choices"]) == 4
        assert not {a.lower(), b.lower(), c.lower()} & {w.lower() for w in item["choices"]}
        assert set(item["choices"]) <= {"cats", "dogs", "birds", "horses", "cows"}
    assert items == build_items(sections, n=10, seed=0) and items != build_items(sections, n=10, seed=1)


def test_analogy_task_runs_through_the_cli(tmp_path, monkeypatch, capsys):
    """Four answers w0..w3 per section and question words elsewhere: every item offers all four, the
    model that always prefers w0 scores the share of items whose answer is w0 (2 of 5)."""
    import secateur.tasks.harness as harness
    from secateur.tasks import analogy

    text = ": s\n" + "\n".join(f"w{10 + i} w{20 + i} w{30 + i} w{d}" for i, d in enumerate([0, 1, 0, 2, 3])) + "\n"
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(harness.BUILTIN, analogy.TASK, ("test", lambda d: analogy.write_task(d, text=text)))
    model = tmp_path / "model"
    save(always_w0(), tiny_tokenizer(), model, {})
    assert main(["eval", str(model), "--tasks", "secateur_analogy", "--device", "cpu", "--json"]) == 0
    task = json.loads(capsys.readouterr().out)["tasks"]["secateur_analogy"]
    assert task["metrics"]["acc"] == pytest.approx(2 / 5) and task["samples"] == 5 and task["chance"] == 0.25


# --- tasks on contexts cut by GemFilter (secateur eval --tasks ... --filter-layer) --------------------------


def long_task(tmp_path, name="long_mc", output="multiple_choice"):
    docs = [{"question": " ".join(f"w{(7 * i + j) % 80 + 5}" for j in range(12)), "choices": ["w0", "w1", "w2", "w3"],
             "answer": i % 4} for i in range(6)]  # fmt: skip
    directory = tmp_path / name
    directory.mkdir()
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    extra = ("doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
             if output == "multiple_choice" else "doc_to_target: \"{{question}}\"\nmetric_list:\n  - metric: word_perplexity\n")
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / f'{name}.jsonl'}\n"
        f"test_split: test\noutput_type: {output}\ndoc_to_text: \"{{{{question}}}}\"\n{extra}metadata:\n  version: 1.0\n")
    return directory


def test_token_pruned_tasks_read_each_context_as_gemfilter_cuts_it(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from secateur.generate.tokens import TokenPruning, prune_prompts

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    seen = []
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, *args, **kwargs):
        seen.extend(ctx for _, ctx, _ in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    directory = long_task(tmp_path)
    plain = run_tasks(model, tokenizer, ["long_mc"], include_path=[directory])
    whole = list(seen)
    assert all(len(ctx) > 5 for ctx in whole)
    seen.clear()
    settings = TokenPruning(filter_layer=1, budget=5, pool=3)
    cut = run_tasks(model, tokenizer, ["long_mc"], include_path=[directory], token_pruning=settings)
    assert len(seen) == len(whole) and all(len(ctx) == 5 for ctx in seen)
    assert [list(c) for c in seen] == [prune_prompts(model, [list(c)], settings)[0] for c in whole]
    assert cut["token_pruning"]["contexts_cut"] == cut["token_pruning"]["contexts"] == 6
    # a budget that covers every context changes nothing
    covered = run_tasks(model, tokenizer, ["long_mc"], include_path=[directory],
                        token_pruning=TokenPruning(filter_layer=1, budget=64))  # fmt: skip
    assert covered["tasks"]["long_mc"]["metrics"] == plain["tasks"]["long_mc"]["metrics"]
    assert covered["token_pruning"]["contexts_cut"] == 0


def test_cli_token_pruned_tasks_and_what_they_refuse(tmp_path, capsys):
    model = tmp_path / "model"
    save(tiny_model("llama"), tiny_tokenizer(), model, {})
    args = ["eval", str(model), "--device", "cpu", "--include-path", str(long_task(tmp_path))]
    assert main([*args, "--tasks", "long_mc", "--filter-layer", "1", "--budget", "5"]) == 0
    assert "token pruning: 6 of 6 contexts longer than --budget 5 cut by block 1's attention" in capsys.readouterr().out
    assert main([*args, "--tasks", "long_mc", "--filter-layer", "1", "--score-tokens", "8"]) == 2
    assert "--score-tokens applies only with --filter-layer (token pruning) on perplexity" in capsys.readouterr().err
    rolling = long_task(tmp_path, "long_rolling", "loglikelihood_rolling")
    assert main(["eval", str(model), "--device", "cpu", "--include-path", str(rolling), "--tasks", "long_rolling",
                 "--filter-layer", "1"]) == 2  # fmt: skip
    assert "long_rolling (loglikelihood_rolling) cannot be token-pruned" in capsys.readouterr().err
