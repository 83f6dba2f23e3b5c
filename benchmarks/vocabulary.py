"""Vocabulary pruning on SmolLM2-135M-Instruct and Gemma-3-270M: how many tokens, parameters and bytes
go, what it costs in bits per byte on the calibration domain and on another one, how much held-out
text tokenizes differently, the WordNet probe, and (SmolLM2) decode and prefill speed in llama.cpp.

Kept tokens are counted on the default calibration windows of the vocabulary stage (256 windows of
2,048 tokens drawn from the enwiki sample after its evaluation region), by `--coverage` (the corpus's
most frequent tokens up to that share of its tokens, with the tokens their merge paths need) or
`--keep-tokens` (that many ids in all, the room the corpus leaves filled in the tokenizer's own
merge order). Quality on text no stage saw: bits per byte (and perplexity per token, which does not
compare across tokenizers) on the enwiki sample's evaluation windows and on legal English (the
license texts of Debian's /usr/share/common-licenses), SmolLM2 on 64 windows of 512 tokens (protocol
v1), Gemma on 16 windows of 512 (BOS first), and the WordNet probe (`secateur_wordnet`, four-choice,
chance 25%, the first 200 items). "changed" is the share of the dense tokenizer's tokens of those
windows that the pruned vocabulary lacks (the text they stand for is split into smaller kept tokens).
A pruned tokenizer needs more tokens for the same text, so its windows cover a prefix of the text the
dense model's cover (`bytes` says how much).

"-dict" rows count on more English: the enwiki sample past its first 200,000 characters (past every
evaluation region) followed by an English word list (Debian's `wamerican`, 104,334 words, each once,
space-separated), 400 windows of 2,048 tokens (most of it).

Composition (Gemma, about 110M parameters each): the vocabulary kept at 60,000 tokens, then angular
depth 10% and width 20% (`--reconstruct`), against depth 10% and width 60% with 55% of the hidden
channels (which shrinks the embedding and LM head) and no vocabulary pruning.
`gemma-plan110M`: what `secateur plan --target params=110M` chooses with the vocabulary axis
(`--vocabulary 48000,60000` over depth 0/10/20% and width 0/20/40%), its recipe run as written.
`gemma-spm-export`: Gemma exported from its HF directory alone (no manifest leading to the GGUF it
came from), so its tokenizer is written from tokenizer.json as llama.cpp's SentencePiece tokenizer;
llama.cpp's tokenization of held-out lines (enwiki, legal English, code) against transformers', and
perplexity inside llama.cpp against secateur's.

Recovery (`smol-cov1.0+recovery`): `secateur train` with the default recipe on 65,536 enwiki tokens
(and `-lr1e-4`: the same at a tenth of the default peak learning rate), distilling from the dense model, whose probability of a removed token goes to the first token of its
text in the pruned tokenizer.

Speed (`llamacpp-speed` row): every SmolLM2 row exported with `secateur export` in f16 and q8_0,
`llama-bench` prefill 512 and decode 128 tokens/s, 2 threads, 3 interleaved rounds, medians of
per-round ratios to dense of the same type; the bytes ideal is the dense bytes of weights read per
decoded token over the row's (the LM head is read whole, the embedding one row). The same for
Gemma dense and vocabulary-pruned (`gemma-llamacpp` row), with perplexity inside llama.cpp (its
Python bindings, f16) against secateur's on the same 8 token windows.

Resumable: every finished row is a line of benchmarks/results/vocabulary.jsonl.

    python benchmarks/vocabulary.py [--only smol-dense,smol-cov0.999] [--probe-items 200]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "vocabulary.jsonl"
WORK = ROOT / "bench-out" / "vocabulary"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import cli, cli_timed, quality, run_rows  # noqa: E402

RECIPES = {
    "vocab60k+depth10+width20": ('[[stage]]\nmethod = "vocabulary"\nkeep_tokens = 60000\n\n'
                                 '[[stage]]\nmethod = "angular"\nremove_fraction = 0.1\n\n'
                                 '[[stage]]\nmethod = "width"\nremove_fraction = 0.2\nreconstruct = true\n'),
    "depth10+width60-hidden55": ('[[stage]]\nmethod = "angular"\nremove_fraction = 0.1\n\n'
                                 '[[stage]]\nmethod = "width"\nremove_fraction = 0.6\nhidden_fraction = 0.55\n'
                                 'reconstruct = true\n'),
}
EVAL = {"smol": ["--windows", "64", "--seq-len", "512"], "gemma": ["--windows", "16", "--seq-len", "512"]}
ROWS = {  # name: `secateur prune` arguments (None: the dense model)
    "smol-dense": None,
    "smol-cov0.999": ["--coverage", "0.999"],
    "smol-cov1.0": ["--coverage", "1.0"],
    "smol-keep16k": ["--keep-tokens", "16384"],
    "smol-keep32k": ["--keep-tokens", "32768"],
    "gemma-dense": None,
    "gemma-cov1.0": ["--coverage", "1.0"],
    "gemma-keep32k": ["--keep-tokens", "32768"],
    "gemma-keep60k": ["--keep-tokens", "60000"],
    # counted on the enwiki sample after its first 200,000 characters (past every evaluation region) and an
    # English word list (Debian's wamerican, each word once, space-separated), all of it
    "smol-keep32k-dict": ["--keep-tokens", "32768", "--calib", "DICT", "--calib-samples", "400"],
    "gemma-keep60k-dict": ["--keep-tokens", "60000", "--calib", "DICT", "--calib-samples", "400"],
    "smol-cov1.0+recovery": ["--tokens", "65536"],  # `secateur train` on smol-cov1.0, distilling from dense
    "smol-cov1.0+recovery-lr1e-4": ["--tokens", "65536", "--lr", "1e-4"],
    # about 110M parameters on Gemma: the vocabulary with depth and width, against depth and width alone
    # (the hidden size shrinks the embedding and LM head too)
    "gemma-vocab60k+depth10+width20": ["--recipe", "vocab60k+depth10+width20"],
    "gemma-depth10+width60-hidden55": ["--recipe", "depth10+width60-hidden55"],
    # `secateur plan` with the vocabulary axis at the same size, its recipe run as written
    "gemma-plan110M": ["--plan", "--target", "params=110M", "--depth", "0,0.1,0.2", "--width", "0,0.2,0.4",
                       "--hidden", "0", "--vocabulary", "48000,60000"],
    # the same for a decode speed in llama.cpp: a smaller vocabulary predicted from the blocks-only cost model
    "gemma-plan-decode1.6": ["--plan", "--target", "decode-speedup=1.6", "--depth", "0,0.1,0.2", "--width", "0,0.2",
                             "--hidden", "0", "--vocabulary", "60000"],
    "llamacpp-speed": None,
    "gemma-llamacpp": None,
    "gemma-spm-export": None,  # the tokenizer written from tokenizer.json alone, run by llama.cpp
}
GEMMA_IN_LLAMACPP = ("gemma-dense", "gemma-keep60k")
LLAMACPP_WINDOWS = 8  # Gemma's 262,144-entry logits for every position of a window: ~0.5 GB each
TYPES = ("f16", "q8_0")


def english_text() -> Path:
    """The enwiki sample past its evaluation regions, then an English word list: 'an English vocabulary'."""
    target = WORK / "enwiki-and-words.txt"
    if not target.exists():
        words = Path("/usr/share/dict/words")
        if not words.is_file():
            raise SystemExit("the -dict rows need an English word list at /usr/share/dict/words (apt install wamerican)")
        from secateur.data.enwiki import load as enwiki

        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(enwiki()[200_000:] + "\n\n" + " ".join(words.read_text().split()))
    return target


def dense_of(name: str) -> Path:
    if name.startswith("smol"):
        from secateur.demo import default_model_dir

        return default_model_dir()
    from gemma import gemma_dir

    return gemma_dir()


def path_of(name: str) -> Path:
    return dense_of(name) if ROWS[name] is None else WORK / name


def build(name: str) -> dict:
    out = path_of(name)
    facts = {}
    if ROWS[name] is not None and not (out / "secateur.json").exists():
        if "+recovery" in name:
            printed, seconds, peak = cli_timed("train", path_of(name.split("+recovery")[0]), "--out", out,
                                               *ROWS[name])  # fmt: skip
        elif ROWS[name][0] == "--plan":
            plan = WORK / f"{name}.plan"
            if not (plan / "plan.toml").exists():
                printed, planning, _ = cli_timed("plan", dense_of(name), "--out", plan, *ROWS[name][1:])
                print(printed, flush=True)
                (plan / "seconds.json").write_text(json.dumps({"plan_seconds": planning}))
            printed, seconds, peak = cli_timed("prune", dense_of(name), "--out", out, "--recipe", plan / "plan.toml")
            facts = json.loads((plan / "seconds.json").read_text())
        elif ROWS[name][0] == "--recipe":
            recipe = WORK / f"{ROWS[name][1]}.toml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(RECIPES[ROWS[name][1]])
            printed, seconds, peak = cli_timed("prune", dense_of(name), "--out", out, "--recipe", recipe)
        else:
            args = [str(english_text()) if a == "DICT" else a for a in ROWS[name]]
            printed, seconds, peak = cli_timed("prune", dense_of(name), "--out", out, "--method", "vocabulary",
                                               *args)  # fmt: skip
        print(printed, flush=True)
        facts = {**facts, "prune_seconds": seconds, "peak_mib": peak}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    from safetensors import safe_open

    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    parameters = 0
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            parameters += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    record = json.loads((out / "secateur.json").read_text())["history"][-1] if ROWS[name] is not None else {}
    result = record.get("result", {})
    return {**facts, "tokens": getattr(config, "text_config", config).vocab_size, "safetensors_bytes": weights,
            "parameters": parameters, "corpus_kept": result.get("corpus_kept"),
            "not_in_corpus": result.get("not_in_corpus"), "check": record.get("check")}  # fmt: skip


def speed(names: list[str]) -> dict:
    from llamacpp import file_facts, llama_bench

    files = {}
    for name in names:
        for kind in TYPES:
            out = WORK / f"{name}-{kind}.gguf"
            if not out.exists():
                cli("export", path_of(name), "--gguf", out, "--type", kind)
            files[f"{name}:{kind}"] = out
    rounds = {key: [] for key in files}
    for r in range(3):
        keys = list(files)
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            rounds[key].append(llama_bench(files[key], 3))
            print(key, rounds[key][-1], flush=True)
    out = {}
    for key, runs in rounds.items():
        name, kind = key.split(":")
        dense = rounds[f"{names[0]}:{kind}"]
        facts = file_facts(files[key])
        out[key] = {"read_bytes": facts["read_bytes"], "file_bytes": facts["bytes"],
                    "decode_tps": statistics.median(r["decode_tps"] for r in runs),
                    "prefill_tps": statistics.median(r["prefill_tps"] for r in runs),
                    "decode_x": statistics.median(r["decode_tps"] / d["decode_tps"] for r, d in zip(runs, dense)),
                    "prefill_x": statistics.median(r["prefill_tps"] / d["prefill_tps"] for r, d in zip(runs, dense)),
                    "bytes_ideal": file_facts(files[f"{names[0]}:{kind}"])["read_bytes"] / facts["read_bytes"]}
    return {"speed": out}


def inside_llamacpp(names: tuple[str, ...]) -> dict:
    """Perplexity inside llama.cpp (its Python bindings, f16 file) against secateur's on the same token
    windows: the first windows of the enwiki evaluation region in each model's own tokenizer."""
    from llamacpp import bindings_perplexity

    from secateur.data.calibration import evaluation_data
    from secateur.evaluate import perplexity
    from secateur.io import load

    out = {}
    for name in names:
        gguf = WORK / f"{name}-f16.gguf"
        if not gguf.exists():
            cli("export", path_of(name), "--gguf", gguf, "--type", "f16")
        model, tokenizer = load(path_of(name))
        data = evaluation_data(model, tokenizer, "enwiki-sample", 512, LLAMACPP_WINDOWS)
        ours = perplexity(model, data)["perplexity"]
        del model
        theirs = bindings_perplexity(gguf, data)["perplexity"]
        out[name] = {"secateur": ours, "llama_cpp": theirs, "difference": theirs / ours - 1}
        print(name, out[name], flush=True)
    return {"inside": out}


def spm_export() -> dict:
    """Gemma exported from its HF directory alone (no manifest leading to its GGUF, so the tokenizer is
    written from tokenizer.json as llama.cpp's SentencePiece tokenizer): llama.cpp's tokenization of
    held-out text against transformers', line by line, and perplexity inside llama.cpp against
    secateur's on the same token windows."""
    from llamacpp import bindings_perplexity, llama_cpp_module

    from secateur.data.calibration import evaluation_data
    from secateur.data.sources import load_text
    from secateur.evaluate import perplexity
    from secateur.io import load

    dense = dense_of("gemma-dense")
    alone = WORK / "gemma-hf-alone"
    alone.mkdir(parents=True, exist_ok=True)
    for file in dense.iterdir():
        if file.name != "secateur.json" and not (alone / file.name).exists():
            (alone / file.name).symlink_to(file)
    gguf = WORK / "gemma-hf-alone-f16.gguf"
    if not gguf.exists():
        print(cli("export", alone, "--gguf", gguf, "--type", "f16"), flush=True)
    model, tokenizer = load(alone)
    llm = llama_cpp_module().Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    out: dict = {}
    for source in ("enwiki-sample", "legal-sample", "code-sample"):
        lines = [line for line in load_text(source, "evaluation")[:200_000].split("\n") if line.strip()]
        same = tokens = 0
        for line in lines:
            ours = tokenizer(line, add_special_tokens=False)["input_ids"]
            same += llm.tokenize(line.encode(), add_bos=False, special=False) == ours
            tokens += len(ours)
        out[source] = {"lines": len(lines), "identical_lines": same, "tokens": tokens}
        print(source, out[source], flush=True)
    del llm
    data = evaluation_data(model, tokenizer, "enwiki-sample", 512, LLAMACPP_WINDOWS)
    out["perplexity"] = {"secateur": perplexity(model, data)["perplexity"],
                         "llama_cpp": bindings_perplexity(gguf, data)["perplexity"]}
    print(out["perplexity"], flush=True)
    return {"tokenization": out}


def measure(name: str, probe_items: int) -> dict:
    clock = time.perf_counter()
    if name == "llamacpp-speed":
        row = {"row": name, **speed(["smol-dense", "smol-cov0.999", "smol-cov1.0", "smol-keep32k", "smol-keep16k"])}
    elif name == "gemma-spm-export":
        row = {"row": name, **spm_export()}
    elif name == "gemma-llamacpp":
        row = {"row": name, **inside_llamacpp(GEMMA_IN_LLAMACPP), **speed(list(GEMMA_IN_LLAMACPP))}
    else:
        row = {"row": name, "args": ROWS[name], **build(name),
               **quality(path_of(name), EVAL[name.split("-")[0]], probe_items)}
    row["wall_seconds"] = time.perf_counter() - clock
    return row


def table() -> None:
    rows = {r["row"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}
    print("| row | tokens | parameters | enwiki bpb | x dense | changed | legal bpb | x dense | changed | probe acc | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "speed" in r or "tokenization" in r:
            continue
        dense = rows.get(f"{name.split('-')[0]}-dense", {})
        ratio = lambda k: f"{r[k] / dense[k]:.3f}" if k in dense else ""  # noqa: E731
        share = lambda k: f"{r[k]:.2%}" if k in r else "-"  # noqa: E731
        print(f"| {name} | {r['tokens']:,} | {r['parameters'] or ''} | {r['bpb_enwiki']:.4f} | {ratio('bpb_enwiki')} | "
              f"{share('changed_enwiki')} | {r['bpb_legal']:.4f} | {ratio('bpb_legal')} | {share('changed_legal')} | "
              f"{r['probe_acc']:.3f} | {r.get('prune_seconds', 0):.0f} |")
    print("\n| llama.cpp | decode tok/s | x dense | bytes ideal | prefill tok/s | x dense |\n|---|---|---|---|---|---|")
    for row in ("llamacpp-speed", "gemma-llamacpp"):
        for key, s in rows.get(row, {}).get("speed", {}).items():
            print(f"| {key} | {s['decode_tps']:.1f} | {s['decode_x']:.2f} | {s['bytes_ideal']:.2f} | "
                  f"{s['prefill_tps']:.1f} | {s['prefill_x']:.2f} |")
    for name, q in rows.get("gemma-llamacpp", {}).get("inside", {}).items():
        print(f"{name}: perplexity inside llama.cpp {q['llama_cpp']:.3f}, secateur {q['secateur']:.3f} "
              f"({q['difference']:+.2%}) on the same {LLAMACPP_WINDOWS} windows")


if __name__ == "__main__":
    run_rows(__doc__, RESULTS, list(ROWS), measure, table)
