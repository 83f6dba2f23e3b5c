"""The vocabulary stage kind: keep the tokens a corpus needs, in the model and its tokenizer."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.recipe import Section, StageContext, StageKind, Streaming, register
from secateur.schema import fill, flatten, options_of
from secateur.vocabulary import VocabularyConfig, prune_vocabulary
from secateur.vocabulary.config import METHODS

# counting needs many tokens more than activations do: 256 windows of 2,048 (524,288 tokens)
CALIBRATION = CalibConfig(samples=256, seq_len=2048)


def _run(model: nn.Module, config: VocabularyConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    parameters_before = sum(p.numel() for p in model.parameters())
    ctx.tokenizer, report = prune_vocabulary(model, ctx.tokenizer, config, calibration)
    return {"parameters_before": parameters_before, "parameters_after": sum(p.numel() for p in model.parameters()),
            **report.to_dict()}  # fmt: skip


def _what(r: dict[str, Any]) -> str:
    return (f"{r['tokens_before']:,} -> {r['tokens_after']:,} tokens ({r['corpus_kept']:.2%} of the "
            f"{r['corpus_tokens']:,} calibration tokens kept as they were)")


def _summary(record: dict[str, Any]) -> str:
    r = record["result"]
    return (f"vocabulary: {_what(r)}, {r['parameters_before']:,} -> {r['parameters_after']:,} parameters in "
            f"{record['seconds']:.1f} s; {r['style']} BPE, {r['merges_before']:,} -> {r['merges_after']:,} merges, "
            f"{r['required']:,} tokens always kept (bytes, special), {r['not_in_corpus']:,} kept that the corpus did "
            "not use (merge paths, fill); perplexity per token no longer compares with the input's: read bits per byte")


def _report(record: dict[str, Any]) -> Section:
    r = record["result"]
    rows = (("embedding and LM head rows", f"{r['tokens_before']:,}", f"{r['tokens_after']:,}"),
            ("merges", f"{r['merges_before']:,}", f"{r['merges_after']:,}"),
            ("parameters", f"{r['parameters_before']:,}", f"{r['parameters_after']:,}"))  # fmt: skip
    text = (f"{r['style']} BPE; kept: {r['required']:,} bytes and special tokens, the calibration corpus's tokens by "
            f"count ({r['corpus_distinct']:,} distinct ids in {r['corpus_tokens']:,} tokens; {r['corpus_kept']:.2%} of "
            "those tokens kept as they were), "
            f"and {r['not_in_corpus']:,} tokens the corpus did not use (those kept tokens are merged from, and with "
            "--keep-tokens the tokenizer's own most frequent). The tokenizer is rewritten to emit kept "
            "tokens only.")
    return Section("Vocabulary", text, ("", "before", "after"), rows)


def _stream(*args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from secateur.vocabulary.disk import streamed

    return streamed(*args)


KIND = register(StageKind(
    "vocabulary", VocabularyConfig, lambda: METHODS, lambda method: options_of(VocabularyConfig),
    lambda method, settings: fill(VocabularyConfig, settings), flatten, _run,
    lambda config: True, lambda config: CALIBRATION,
    summary=_summary,
    describe=_what,
    report=_report,
    renumbers_tokens=True,
    streaming=Streaming(lambda config: None, _stream),
))  # fmt: skip
