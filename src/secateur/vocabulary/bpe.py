"""The BPE vocabulary of a `tokenizers` tokenizer.json as data, and the pure functions of vocabulary
pruning over it: which tokens build which (the merge closure), which tokens a corpus needs, and the
tokenizer.json that keeps only those.

Two BPE styles are read: byte-level (GPT-2, Llama 3, Qwen, SmolLM2: every byte is a one-character
base token) and SentencePiece-style with byte fallback (Gemma, Llama 2, Mistral: characters are base
tokens, a character outside the vocabulary becomes its UTF-8 bytes `<0x00>`..`<0xFF>`). Either way,
once the base tokens are kept and a merge is kept only with both its parts and its result, the
pruned tokenizer can emit kept tokens only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from secateur.data.bytes import BYTE_TOKEN, is_byte_level
from secateur.errors import ConfigError

Style = Literal["byte-level", "byte-fallback"]


class VocabularyError(ConfigError):
    """A tokenizer that vocabulary pruning cannot rewrite, or a vocabulary request it cannot meet."""


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the base tokens of byte-level BPE)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return ByteLevel.alphabet()


@dataclass(frozen=True)
class Bpe:
    """A BPE tokenizer's vocabulary (token -> id, added tokens included), its merges in rank order, its
    style, and the ids every pruned vocabulary keeps (base tokens, unknown, special added tokens)."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    style: Style
    prefix: str  # continuing_subword_prefix: dropped from a merge's right part
    required: frozenset[int]

    def merged(self, left: str, right: str) -> str:
        return left + (right[len(self.prefix):] if self.prefix and right.startswith(self.prefix) else right)


def read_bpe(data: dict[str, Any]) -> Bpe:
    """The vocabulary of a parsed tokenizer.json; refuses anything but byte-level BPE and BPE with byte
    fallback, in one line naming what it found. The byte tokens the tokenizer has are required (a
    byte it lacks was never tokenizable, and stays so)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise VocabularyError(f"vocabulary pruning rewrites BPE tokenizers only; this one is "
                              f"{model.get('type') or 'of an unknown type'}")
    vocab = dict(model["vocab"])
    for token in data.get("added_tokens", []):
        vocab.setdefault(token["content"], token["id"])
    merges = parse_merges(model)
    if is_byte_level(data):
        style: Style = "byte-level"
        required = {vocab[c] for c in byte_alphabet() if c in vocab}  # some lack a few (SmolLM2: 21)
    elif model.get("byte_fallback"):
        style = "byte-fallback"
        required = {i for t, i in vocab.items() if BYTE_TOKEN.fullmatch(t)}
    else:
        required = set()
    if not required:
        raise VocabularyError("vocabulary pruning needs byte-level BPE or BPE with byte fallback (so that any "
                              "text still tokenizes); this BPE has no byte tokens")
    if model.get("unk_token") is not None:
        required.add(vocab[model["unk_token"]])
    required |= {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    required |= set(_processor_ids(data.get("post_processor")))
    return Bpe(vocab, merges, style, model.get("continuing_subword_prefix") or "", frozenset(required))


def parse_merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """A tokenizer.json BPE model's merges in rank order, as pairs (stored as "a b" or ["a", "b"])."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def first_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The rank of the first merge that builds each token, by its text."""
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    return first


def merge_path(token: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The symbols BPE goes through to build `token` from its characters: the characters, then each
    merge's result, applying the best-ranked merge present first. Inside any word, the merges that
    build a final token run in this same order (a merge across the token's edge would have made the
    token's span part of a larger symbol), so these are the tokens a kept token needs."""
    symbols = list(token)
    seen = list(symbols)
    while len(symbols) > 1:
        rank, at = min((ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:])))
        if rank == len(ranks):
            break
        symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
        seen.append(symbols[at])
    return seen


class Closure:
    """The tokens that kept tokens need: each kept token with every symbol of its merge path (a kept
    token whose path runs through a removed token could no longer be built, and text that used it
    would tokenize differently)."""

    def __init__(self, bpe: Bpe) -> None:
        if bpe.prefix:
            raise VocabularyError(f"vocabulary pruning does not rewrite BPE with a continuing-subword prefix "
                                  f"({bpe.prefix!r})")
        self.vocab = bpe.vocab
        self.ranks = {pair: rank for rank, pair in reversed(list(enumerate(bpe.merges)))}
        self.tokens = {i: t for t, i in bpe.vocab.items()}

    def __call__(self, ids: Iterable[int], kept: set[int] | frozenset[int] = frozenset()) -> set[int]:
        """The ids that `ids` need and `kept` does not hold yet (the ids themselves included)."""
        new: set[int] = set()
        for token in ids:
            if token in kept or token in new:
                continue
            new.add(token)
            for symbol in merge_path(self.tokens[token], self.ranks):
                part = self.vocab.get(symbol)  # a character outside the vocabulary falls back to bytes
                if part is not None and part not in kept:
                    new.add(part)
        return new


def merge_order(bpe: Bpe) -> list[int]:
    """Every id in the order of the merge that first builds it (BPE learns merges by frequency, so this
    is the tokenizer's own frequency order), then the ids no merge builds, by id."""
    order = dict.fromkeys(bpe.vocab.get(bpe.merged(a, b)) for a, b in bpe.merges)
    order.pop(None, None)
    return [*order, *sorted(set(bpe.vocab.values()) - order.keys())]


def select(counts: dict[int, int], bpe: Bpe, *, keep_tokens: int | None = None,
           coverage: float | None = None) -> list[int]:  # fmt: skip
    """The kept ids, sorted: the required ones, then the corpus's tokens by count (ties by id), each with
    the tokens its merge path needs. `keep_tokens`: as many as fit in that many ids in all, the room the
    corpus leaves filled in the tokenizer's own frequency order (`merge_order`); `coverage`: the most
    frequent tokens that together make up that share of the corpus's tokens."""
    need = Closure(bpe)
    kept = set(bpe.required)
    ranked = sorted((i for i, c in counts.items() if c > 0), key=lambda i: (-counts[i], i))
    if coverage is not None:
        total, running, chosen = sum(counts[i] for i in ranked), 0, []
        for token in ranked:
            if running >= coverage * total:
                break
            chosen.append(token)
            running += counts[token]
        return sorted(kept | need(chosen, kept))
    if keep_tokens is not None and keep_tokens < len(kept):
        raise VocabularyError(f"--keep-tokens {keep_tokens} is fewer than the {len(kept)} tokens every pruned "
                              "vocabulary keeps (bytes, unknown and special tokens): ask for more")
    fill = [i for i in merge_order(bpe) if i not in counts] if keep_tokens is not None else []
    for token in [*ranked, *fill]:
        if keep_tokens is not None and len(kept) >= keep_tokens:
            break
        add = need([token], kept)
        if keep_tokens is None or len(kept) + len(add) <= keep_tokens:
            kept |= add
    return sorted(kept)


def _processor_ids(node: Any) -> Iterable[int]:
    """The ids a post-processor inserts (BOS, EOS, separators)."""
    if isinstance(node, dict):
        if node.get("type") == "TemplateProcessing":
            for special in node.get("special_tokens", {}).values():
                yield from special["ids"]
        for key in ("sep", "cls"):
            if isinstance(node.get(key), list) and len(node[key]) == 2:
                yield node[key][1]
        for processor in node.get("processors", []):
            yield from _processor_ids(processor)


def _remap_processor(node: Any, new_id: dict[int, int]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "TemplateProcessing":
            for special in node.get("special_tokens", {}).values():
                special["ids"] = [new_id[i] for i in special["ids"]]
        for key in ("sep", "cls"):
            if isinstance(node.get(key), list) and len(node[key]) == 2:
                node[key][1] = new_id[node[key][1]]
        for processor in node.get("processors", []):
            _remap_processor(processor, new_id)


def kept_merges(bpe: Bpe, kept: Iterable[int]) -> list[tuple[str, str]]:
    """The merges whose two parts and result are all kept, in their ranks."""
    kept = set(kept)
    keep = lambda t: bpe.vocab.get(t) in kept  # noqa: E731
    return [(a, b) for a, b in bpe.merges if keep(a) and keep(b) and keep(bpe.merged(a, b))]


def prune_tokenizer_json(data: dict[str, Any], kept: list[int], bpe: Bpe | None = None) -> dict[str, Any]:
    """A copy of a parsed tokenizer.json that holds the `kept` ids only, renumbered 0.. in their old
    order: the vocabulary, the merges whose parts and result are all kept (in their old ranks), the
    added tokens, and the ids the post-processor inserts. `bpe`: `data` as `read_bpe` reads it, when
    the caller has it already."""
    bpe = bpe or read_bpe(data)
    new_id = {old: new for new, old in enumerate(kept)}
    missing = sorted(bpe.required - new_id.keys())
    if missing:
        raise VocabularyError(f"the kept ids lack {len(missing)} required tokens (first id {missing[0]})")
    out = copy.deepcopy(data)
    model = out["model"]
    model["vocab"] = {t: new_id[i] for t, i in data["model"]["vocab"].items() if i in new_id}
    strings = bool(model.get("merges")) and isinstance(model["merges"][0], str)
    merges = kept_merges(bpe, new_id.keys())
    model["merges"] = [f"{a} {b}" for a, b in merges] if strings else [[a, b] for a, b in merges]
    out["added_tokens"] = [{**t, "id": new_id[t["id"]]} for t in data.get("added_tokens", []) if t["id"] in new_id]
    _remap_processor(out.get("post_processor"), new_id)
    return out
