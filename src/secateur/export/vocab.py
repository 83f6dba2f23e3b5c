"""The tokenizer of an exported GGUF: copied from the GGUF the model came from, or built from the
HF tokenizer.

When the model traces back (through its manifests) to a GGUF file whose vocabulary is this
tokenizer's, its `tokenizer.*` metadata is copied as is: the pre-tokenizer name, token types, merges,
special ids and chat template the original file's authors chose; when this tokenizer keeps a subset
of that file's tokens (vocabulary pruning), the same metadata at the kept tokens. Otherwise the
tokenizer is written from `tokenizer.json`: a byte-level BPE (GPT-2 style) as llama.cpp's `gpt2`
tokenizer, whose pre-tokenizer llama.cpp needs by name (recognised from the tokenizer's structure
for the layouts below, or given by the user); a BPE with byte fallback (SentencePiece's, as
transformers converts Llama 2, Mistral and Gemma tokenizers) as llama.cpp's `llama` tokenizer, with
scores that make its joins BPE's merges (gguf's own `LlamaHfVocab` writes one score for every token,
which would leave the joins to their position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateur.data.bytes import BYTE_TOKEN, is_byte_level
from secateur.export.errors import ExportError
from secateur.vocabulary.bpe import first_merges, parse_merges

TOKEN_TYPES = {"normal": 1, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}  # gguf.TokenType values

# The pre-tokenizer names llama.cpp accepts (`tokenizer.ggml.pre`), as its llama-vocab.cpp lists them
# (llama.cpp vendored by llama-cpp-python 0.3.36); another name makes llama.cpp refuse the file.
LLAMA_CPP_PRE_TOKENIZERS = frozenset({
    "a.x-4.0", "afmoe", "bailingmoe", "bailingmoe2", "bloom", "chameleon", "chatglm-bpe", "codeshell", "cohere2moe",
    "command-r", "dbrx", "deepseek-coder", "deepseek-llm", "deepseek-r1-qwen", "deepseek-v3", "default", "exaone",
    "exaone-moe", "exaone4", "f2llmv2", "falcon", "falcon-h1", "falcon3", "gemma4", "gigachat", "glm4", "glm5",
    "gpt-2", "gpt-4o", "gpt3-finnish", "granite-docling", "granite-embed-multi-311m", "granite-embed-multi-97m",
    "grok-2", "hunyuan", "hunyuan-dense", "hy_v4", "jais", "jais-2", "jina-de", "jina-es", "jina-v1-en",
    "jina-v2-code", "jina-v2-de", "jina-v2-es", "jina-v5-nano", "joyai-llm", "kanana2", "kimi-k2", "kormo",
    "laguna", "lfm2", "llada-moe", "llama-bpe", "llama-v3", "llama3", "llama4", "megrez", "mellum", "mellum2",
    "midm-2.0", "minerva-7b", "minicpm5", "minimax-m2", "modern-bert", "mpt", "olmo", "phi-2", "pixtral",
    "poro-chat", "qwen2", "qwen35", "refact", "roberta-bpe", "sarvam-moe", "seed-coder", "smaug-bpe", "smollm",
    "solar-open", "spark2_5", "stablelm2", "starcoder", "superbpe", "talkie", "tekken", "tiny_aya", "trillion",
    "ufakzeka", "viking", "whitespace", "youtu"
})

# llama.cpp's pre-tokenizer for a `tokenizer.json` pre_tokenizer section (its structure, as JSON)
PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "use_regex": True}): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      {"type": "ByteLevel", "use_regex": True}]}): "smollm",
}


def _structure(node: Any) -> Any:
    """The parts of a pre_tokenizer that decide how text splits (types, regex use, digit splitting)."""
    if isinstance(node, dict):
        keep = ("type", "use_regex", "individual_digits", "pretokenizers")
        return {k: _structure(v) for k, v in node.items() if k in keep}
    if isinstance(node, list):
        return [_structure(v) for v in node]
    return node


@dataclass
class Vocabulary:
    """tokenizer.* metadata to write: (key, value, GGUFValueType, item type for arrays)."""

    fields: list[tuple[str, Any, Any, Any]] = field(default_factory=list)
    origin: str = ""

    def write(self, writer) -> None:
        for key, value, vtype, sub_type in self.fields:
            writer.add_key_value(key, value, vtype, sub_type=sub_type)


def from_gguf(path: Path, tokens: list[str]) -> Vocabulary | None:
    """The tokenizer metadata of GGUF `path` for the token list `tokens`: copied as is when the lists are
    the same; when `tokens` is a subset of the file's (a pruned vocabulary), the file's per-token arrays
    (types, scores) taken at the kept tokens, its merges kept where both parts and the result are kept,
    its special ids renumbered; None when `tokens` holds a token the file lacks."""
    import gguf

    reader = gguf.GGUFReader(path)
    listed = reader.fields.get("tokenizer.ggml.tokens")
    if listed is None:
        return None
    original = list(listed.contents())
    same = len(original) == len(tokens) and all(map(_same_token, tokens, original))
    index: dict[str, int] = {}
    for spelling in (lambda t: t, _as_hf):  # exact spellings first
        for i, token in enumerate(original):
            index.setdefault(spelling(token), i)
    if not same and not all(t in index for t in tokens):
        return None
    picks = list(range(len(original))) if same else [index[t] for t in tokens]
    new_id = {old: new for new, old in enumerate(picks)}
    kept = {original[i] for i in picks}
    fields = []
    for key, item in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub_type = item.types[-1] if item.types[0] == gguf.GGUFValueType.ARRAY else None
        value = item.contents()
        if not same:
            if key == "tokenizer.ggml.tokens":
                value = [original[i] for i in picks]  # the file's own spelling
            elif key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
                value = [value[i] for i in picks]
            elif key == "tokenizer.ggml.merges":
                value = [m for m in value if _merge_kept(m, kept)]
            elif key.endswith("_token_id"):
                if value not in new_id:
                    continue  # a special token the pruned vocabulary does not hold
                value = new_id[value]
        fields.append((key, value, item.types[0], sub_type))
    how = "copied from" if same else f"{len(tokens):,} of its {len(original):,} tokens taken from"
    return Vocabulary(fields, origin=f"{how} {path}")


def _as_hf(token: str) -> str:
    """A GGUF token as transformers spells it: SentencePiece's user-defined whitespace tokens (Gemma's runs
    of spaces) hold spaces in the file and `▁` in the HF tokenizer."""
    return token.replace(" ", "\u2581")


def _same_token(ours: str, theirs: str) -> bool:
    return ours == theirs or ours == _as_hf(theirs)


def _merge_kept(merge: str, kept: set[str]) -> bool:
    left, _, right = merge.partition(" ")
    return left in kept and right in kept and left + right in kept


def source_ggufs(manifest: dict[str, Any] | None, limit: int = 8) -> list[Path]:
    """GGUF files the model came from, following each manifest's source (nearest first)."""
    from secateur.io import read_manifest

    found: list[Path] = []
    while manifest and limit > 0:
        limit -= 1
        source = (manifest.get("source") or {}).get("path") or manifest.get("converted_from")
        if not isinstance(source, str) or not Path(source).exists():
            break
        path = Path(source)
        if path.is_file():
            found.append(path)
            break
        manifest = read_manifest(path)
    return found


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; ids the tokenizer does not use are padding."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPES["unused"])
            continue
        tokens.append(by_id[i])
        token = added.get(i)
        kind = "normal" if token is None else "control" if token.special else "user_defined"
        types.append(TOKEN_TYPES[kind])
    return tokens, types


def from_tokenizer(tokenizer: Any, directory: Path, vocab_size: int, pre: str | None) -> Vocabulary:
    """A vocabulary built from the HF tokenizer saved in `directory`: byte-level BPE as llama.cpp's
    `gpt2` tokenizer, BPE with byte fallback (SentencePiece's, as transformers converts it) as its
    `llama` tokenizer; anything else is refused."""
    file = directory / "tokenizer.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    model = data.get("model") or {}
    if model.get("type") == "BPE" and is_byte_level(data):
        return _byte_level(tokenizer, directory, vocab_size, pre, data)
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        if pre is not None:
            raise ExportError("--tokenizer-pre names the pre-tokenizer of a byte-level BPE; this tokenizer is "
                              "SentencePiece-style (byte fallback), which llama.cpp's llama tokenizer runs without one")
        return _sentencepiece(tokenizer, directory, vocab_size, data)
    raise ExportError(f"{directory}: only BPE tokenizers (byte-level, or with byte fallback) are written to GGUF; this "
                      f"one is {model.get('type') or 'unknown'}, and the model comes from no GGUF whose vocabulary "
                      "could be copied")


def _special_fields(directory: Path, vocab_size: int) -> tuple[Any, list[tuple[str, Any, Any, Any]]]:
    """gguf's SpecialVocab of `directory` and the fields it gives: special ids, whether BOS / EOS are
    added, the chat template."""
    import gguf

    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    V = gguf.GGUFValueType
    fields = []
    for kind, token_id in special.special_token_ids.items():
        key = "padding" if kind == "pad" else "unknown" if kind == "unk" else kind
        fields.append((f"tokenizer.ggml.{key}_token_id", int(token_id), V.UINT32, None))
    for kind, value in special.add_special_token.items():
        fields.append((f"tokenizer.ggml.add_{kind}_token", bool(value), V.BOOL, None))
    if special.chat_template:
        fields.append(("tokenizer.chat_template", special.chat_template, V.STRING, None))
    return special, fields


def _byte_level(tokenizer: Any, directory: Path, vocab_size: int, pre: str | None, data: dict[str, Any]) -> Vocabulary:
    import gguf

    if pre is None:
        pre = PRE_TOKENIZERS.get(json.dumps(_structure(data.get("pre_tokenizer"))))
        if pre is None:
            raise ExportError("the tokenizer's pre-tokenizer is not one secateur recognises; pass --tokenizer-pre "
                              "with llama.cpp's name for it (for example llama-bpe, qwen2, gpt-2)")
    tokens, types = token_list(tokenizer, vocab_size)
    special, specials = _special_fields(directory, vocab_size)
    if not special.merges:
        raise ExportError(f"{directory / 'tokenizer.json'} holds no merges; a BPE vocabulary without them cannot tokenize")
    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "gpt2", V.STRING, None), ("tokenizer.ggml.pre", pre, V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
              ("tokenizer.ggml.merges", special.merges, V.ARRAY, V.STRING), *specials]  # fmt: skip
    return Vocabulary(fields, origin=f"built from {directory / 'tokenizer.json'} (pre-tokenizer {pre})")


def sentencepiece_merges(vocab: dict[str, int], merges: list[tuple[str, str]], first: dict[str, int]) -> str | None:
    """None when the merges are SentencePiece's as transformers converts them (every pair of tokens whose
    join is a token has one, ranked by the join's first merge, `first`), else what breaks that, in
    words. Then llama.cpp's llama tokenizer, which joins at every step the adjacent pair whose join is
    the token of highest score (the leftmost on a tie), is BPE with these merges when each token's
    score is minus the rank of its first merge."""
    listed = set(merges)
    missing = [(t[:k], t[k:]) for t in vocab for k in range(1, len(t))
               if t[:k] in vocab and t[k:] in vocab and (t[:k], t[k:]) not in listed]  # fmt: skip
    if missing:
        return (f"{len(missing):,} pairs of tokens whose join is a token have no merge (first: {missing[0]!r}), so "
                "llama.cpp's llama tokenizer, which joins any such pair, would split text differently")
    order = [first[a + b] for a, b in merges]
    if any(x > y for x, y in zip(order, order[1:])):
        return "its merges are not ranked by the tokens they build, which llama.cpp's llama tokenizer needs"
    return None


def _sentencepiece(tokenizer: Any, directory: Path, vocab_size: int, data: dict[str, Any]) -> Vocabulary:
    """llama.cpp's `llama` (SentencePiece) tokenizer: the tokens as transformers spells them (user-defined
    tokens with spaces for `▁`, as llama.cpp matches them in the raw text), scores from the merges,
    byte, control and user-defined types, and whether a space is put before the text."""
    import gguf

    vocab, merges = data["model"]["vocab"], parse_merges(data["model"])
    first = first_merges(merges)
    broken = sentencepiece_merges(vocab, merges, first)
    if broken:
        raise ExportError(f"{directory / 'tokenizer.json'} is BPE with byte fallback, but {broken}")
    tokens, types = token_list(tokenizer, vocab_size)
    scores = {vocab[token]: -float(rank) for token, rank in first.items() if token in vocab}
    listed = len(merges)
    values = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if BYTE_TOKEN.fullmatch(token):
            types[i], score = TOKEN_TYPES["byte"], 0.0
        elif kind == TOKEN_TYPES["normal"]:  # the tokens no merge builds (characters) rank below the rest
            score = scores.get(i, -float(listed + i))
        else:
            score = -1000.0
        if kind == TOKEN_TYPES["user_defined"]:
            tokens[i] = token.replace("\u2581", " ")
        values.append(score)
    _, specials = _special_fields(directory, vocab_size)
    prefix = '"Prepend"' in json.dumps(data.get("normalizer")) or '"Metaspace"' in json.dumps(data.get("pre_tokenizer"))
    V = gguf.GGUFValueType
    fields = [("tokenizer.ggml.model", "llama", V.STRING, None), ("tokenizer.ggml.pre", "default", V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.scores", values, V.ARRAY, V.FLOAT32),
              ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
              ("tokenizer.ggml.add_space_prefix", prefix, V.BOOL, None), *specials]  # fmt: skip
    return Vocabulary(fields, origin=f"built from {directory / 'tokenizer.json'} (SentencePiece-style BPE)")


def vocabulary(tokenizer: Any, directory: Path, vocab_size: int, manifest: dict[str, Any] | None,
               pre: str | None) -> Vocabulary:
    """The source GGUF's tokenizer when it is this one (unless a pre-tokenizer is forced), else one
    built from the HF tokenizer."""
    if pre is None:
        tokens, _ = token_list(tokenizer, vocab_size)
        for path in source_ggufs(manifest):
            found = from_gguf(path, tokens)
            if found is not None:
                return found
    return from_tokenizer(tokenizer, directory, vocab_size, pre)
