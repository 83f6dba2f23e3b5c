"""Text sources for calibration and evaluation: files, JSONL, `datasets` directories, named sets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from secateur.data import enwiki

Purpose = Literal["calibration", "evaluation"]


class DataError(ValueError):
    """A text source is missing, unreadable or too short; the message says what was expected."""


@dataclass(frozen=True)
class NamedSource:
    load: Callable[[Purpose, str], str]
    separate_splits: bool  # calibration and evaluation text differ (no hold-out needed)
    description: str


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


NAMED: dict[str, NamedSource] = {
    "enwiki-sample": NamedSource(lambda purpose, field: enwiki.load(), False, "offline Wikipedia sample (gensim wheel)"),
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


def _from_jsonl(path: Path, field: str) -> str:
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
            if field not in record:
                raise DataError(f"{path}:{number} has no field {field!r}; pass --text-field")
            texts.append(str(record[field]))
    return "\n\n".join(texts)


def load_text(source: str, purpose: Purpose = "evaluation", text_field: str = "text") -> str:
    """Plain text from a named source, a `datasets` directory, a .jsonl file or any text file."""
    if source in NAMED:
        return NAMED[source].load(purpose, text_field)
    path = Path(source)
    if path.is_dir():
        if not (path / "dataset_dict.json").exists() and not (path / "dataset_info.json").exists():
            raise DataError(f"{path} is a directory but not a `datasets` save_to_disk directory")
        return _from_disk(path, purpose, text_field)
    if path.is_file():
        return _from_jsonl(path, text_field) if path.suffix in (".jsonl", ".ndjson") else path.read_text(encoding="utf-8")
    raise DataError(
        f"unknown text source {source!r}: give a text file, a .jsonl file, a `datasets` directory, "
        f"or one of {', '.join(NAMED)}"
    )


def needs_holdout(source: str) -> bool:
    """Whether calibration reads the evaluation text of `source` (it has no separate splits), so
    calibration must skip the evaluation region. Holding out is harmless when evaluation uses
    another source."""
    return not (source in NAMED and NAMED[source].separate_splits)
