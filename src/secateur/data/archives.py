"""Pinned files of PyPI projects that offline text and tasks are cut from, fetched once into the
user's cache directory, and the cache of the texts built from them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("SECATEUR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "secateur"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Archive:
    """A pinned file of a PyPI project: its wheel for this platform or its source distribution."""

    requirement: str
    wheel: bool

    def path(self) -> Path:
        """The file, fetched with `pip download --no-deps` into the cache on first use."""
        folder = cache_dir() / "archives"
        name = self.requirement.replace("==", "-")
        found = sorted(folder.glob(f"{name}*")) if folder.is_dir() else []
        if found:
            return found[0]
        folder.mkdir(parents=True, exist_ok=True)
        kind = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"] if self.wheel \
            else ["--no-binary=:all:"]
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, "-d", tmp, self.requirement]
            result = subprocess.run(command, capture_output=True, text=True)
            files = sorted(Path(tmp).iterdir())
            if result.returncode or not files:
                raise RuntimeError(f"could not fetch {self.requirement} from PyPI:\n{result.stderr.strip()}")
            target = folder / files[0].name
            files[0].replace(target)  # atomic: a crash never leaves a partial archive under its name
        return target

    def read(self, member: str) -> bytes:
        return self.members(lambda name: name == member)[member]

    def members(self, keep: Callable[[str], bool]) -> dict[str, bytes]:
        """The archive's members whose names `keep` accepts, by name (sorted)."""
        path = self.path()
        if self.wheel:
            with zipfile.ZipFile(path) as archive:
                return {n: archive.read(n) for n in sorted(archive.namelist()) if keep(n)}
        with tarfile.open(path) as archive:
            return {m.name: archive.extractfile(m).read() for m in sorted(archive.getmembers(), key=lambda m: m.name)
                    if m.isfile() and keep(m.name)}  # fmt: skip


GENSIM = Archive("gensim==4.4.0", wheel=True)
DOCUTILS = Archive("docutils==0.21.2", wheel=False)
TEST_DATA = "gensim/test/test_data/"


def cached(name: str, build: Callable[[], str], origin: str) -> str:
    """The text `name` from the cache, or built by `build` and cached (written atomically: a crash
    never leaves a truncated text)."""
    target = cache_dir() / f"{name}.txt"
    if target.is_file():
        return target.read_text(encoding="utf-8")
    log.info("building the %s text from %s", name, origin)
    text = build()
    partial = target.with_suffix(f".tmp-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)
    return text
