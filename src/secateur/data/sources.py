"""Text sources for calibration and evaluation: files, JSONL, `datasets` directories, named sets."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from secateur.data.corpora import CORPORA, load as load_corpus
from secateur.errors import DataError

__all__ = ["NAMED", "DataError", "check_text_field", "has_fields", "load_text", "needs_holdout"]

Purpose = Literal["calibration", "evaluation"]
JSONL = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class NamedSource:
    load: Callable[[Purpose, str], str]
    separate_splits: bool  # calibration and evaluation text differ (no hold-out needed)
    description: str
    fields: bool = True  # rows with fields (--text-field picks one); False: plain text


def _hub(name: str, config: str | None, splits: dict[str, str], data_files: dict[str, str] | None = None):
    def load(purpose: Purpose, field: str) -> str:
        try:
            import datasets
        except ImportError:
            raise DataError(f"source {name!r} needs the `datasets` package: pip install 'secateur[datasets]'") from None
        try:
            data = datasets.load_dataset(name, config, split=splits[purpose], data_files=data_files)
        except Exception as exc:  # network, auth, missing dataset: all end the same way for the user
            raise DataError(f"could not load {name!r} from the Hugging Face hub ({exc}); it needs the internet") from None
        return "\n\n".join(row for row in data[field] if row.strip())

    return load


def _offline(name: str) -> NamedSource:
    corpus = CORPORA[name]
    return NamedSource(lambda purpose, field: load_corpus(name), False, f"offline {corpus.kind}: {corpus.origin}",
                       fields=False)


NAMED: dict[str, NamedSource] = {
    **{name: _offline(name) for name in CORPORA},
    "wikitext2": NamedSource(
        _hub("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"}), True, "WikiText-2 raw"
    ),
    "c4": NamedSource(
        _hub(
            "allenai/c4",
            None,
            {"calibration": "train", "evaluation": "validation"},
            {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
        ),
        True,
        "C4 (first shard)",
    ),
}


def _from_disk(path: Path, purpose: Purpose, field: str) -> str:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        preferred = ("train",) if purpose == "calibration" else ("test", "validation")
        split = next((s for s in preferred if s in data), next(iter(data)))
        data = data[split]
    if field not in data.column_names:
        raise DataError(f"{path} has no column {field!r} (columns: {data.column_names}); pass --text-field")
    return "\n\n".join(row for row in data[field] if row and row.strip())


def has_fields(source: str) -> bool:
    """Whether a source's rows have fields (a .jsonl file, a `datasets` directory, a hub set), so that
    --text-field applies to it."""
    from secateur.data.mixture import MIXTURES

    path = Path(source)
    if source in NAMED:
        return NAMED[source].fields
    if source in MIXTURES:
        return False
    return path.is_dir() or path.suffix in JSONL


def check_text_field(source: str) -> None:
    if not has_fields(source):
        raise DataError(f"--text-field applies to .jsonl files and `datasets` directories; {source} is plain text")


def _read_text(path: Path) -> str:
    """A file's text; binary files and files that are not UTF-8 are refused."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; check its permissions") from None
    if b"\0" in data[:65536]:
        raise DataError(f"{path} is a binary file, not text; give a UTF-8 text file, a .jsonl file or a `datasets` directory")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); convert it, e.g. iconv -t utf-8") from None


def _from_jsonl(path: Path, field: str) -> str:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{number} has no field {field!r}; pass --text-field")
            if not isinstance(record[field], str):
                raise DataError(f"{path}:{number}: field {field!r} is {type(record[field]).__name__}, not a string")
            texts.append(record[field])
    return "\n\n".join(texts)


def load_text(source: str, purpose: Purpose = "evaluation", text_field: str = "text") -> str:
    """Plain text from a named source, a `datasets` directory, a .jsonl file or any text file."""
    path = Path(source)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size, os.access(path, os.R_OK)) if path.is_file() else None  # a changed file is read anew
    text = _load_text(str(source), purpose, text_field, stamp)
    if not text.strip():
        raise DataError(f"text source {source} is empty (for {purpose}); give a source with text in it")
    return text


@functools.lru_cache(maxsize=8)  # checked before a run, read again during it (a mixture's corpora and more)
def _load_text(source: str, purpose: Purpose, text_field: str, stamp: tuple[int, int, bool] | None) -> str:
    from secateur.data.mixture import MIXTURES

    if source in NAMED:
        return NAMED[source].load(purpose, text_field)
    if source in MIXTURES:  # all its corpora, joined (what counting tokens over it reads)
        return "\n\n".join(load_text(name, purpose) for name in MIXTURES[source].sources)
    path = Path(source)
    if path.is_dir():
        if not (path / "dataset_dict.json").exists() and not (path / "dataset_info.json").exists():
            raise DataError(f"{path} is a directory but not a `datasets` save_to_disk directory")
        return _from_disk(path, purpose, text_field)
    if path.is_file():
        return _from_jsonl(path, text_field) if path.suffix in JSONL else _read_text(path)
    raise DataError(
        f"unknown text source {source!r}: give a text file, a .jsonl file, a `datasets` directory, "
        f"or one of {', '.join([*NAMED, *MIXTURES])}"
    )


def needs_holdout(source: str) -> bool:
    """Whether calibration reads the evaluation text of `source` (it has no separate splits), so
    calibration must skip the evaluation region. Holding out is harmless when evaluation uses
    another source."""
    return not (source in NAMED and NAMED[source].separate_splits)
