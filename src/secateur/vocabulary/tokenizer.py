"""A Hugging Face tokenizer with a pruned vocabulary: the original's files with tokenizer.json (and
any ids tokenizer_config.json names) rewritten, loaded back by the tokenizer's own class, so special
tokens, the chat template and the class's settings carry over."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

from secateur.vocabulary.bpe import VocabularyError


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabularyError(f"vocabulary pruning rewrites fast (tokenizers) tokenizers; {type(tokenizer).__name__} "
                              "is a slow one")
    return json.loads(backend.to_str())


def prune_tokenizer(tokenizer: Any, pruned: dict[str, Any], kept: Sequence[int]) -> Any:
    """A new tokenizer of the same class as `tokenizer` whose tokenizer.json is `pruned` (the `kept` ids
    only, renumbered 0.. in their old order: `prune_tokenizer_json`)."""
    from transformers import AutoTokenizer

    new_id = {old: new for new, old in enumerate(kept)}
    with tempfile.TemporaryDirectory(prefix="secateur-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(pruned, ensure_ascii=False), encoding="utf-8")
        settings_file = Path(tmp) / "tokenizer_config.json"
        if settings_file.exists():
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
            if "added_tokens_decoder" in settings:
                settings["added_tokens_decoder"] = {str(new_id[int(i)]): t for i, t in
                                                    settings["added_tokens_decoder"].items() if int(i) in new_id}
            settings_file.write_text(json.dumps(settings, ensure_ascii=False, indent=2), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp)
