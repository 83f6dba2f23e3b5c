"""Offline corpora of several kinds, cut from pinned package files that PyPI and Debian serve (where
model and dataset hubs are out of reach): each fetched once, turned into plain text and cached.

    enwiki-sample      encyclopedic prose: ~100 Wikipedia articles (gensim 4.4.0 wheel's test data)
    news-sample        news reports: the Lee corpus's background articles (gensim 4.4.0 wheel)
    newsgroups-sample  discussion: Usenet posts of the 20 Newsgroups set, headers dropped (gensim 4.4.0 wheel)
    code-sample        source code: the Python modules of the gensim 4.4.0 wheel
    docs-sample        technical documentation: the reStructuredText manuals of the docutils 0.21.2 sdist
    legal-sample       legal English: the licence texts of Debian's base-files (/usr/share/common-licenses)
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
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


def _news() -> str:
    """The Lee corpus's 300 background news articles (Lee, Pincombe & Welsh 2005), one per line."""
    lines = GENSIM.read(TEST_DATA + "lee_background.cor").decode("utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


class _Bunch(dict):
    """Stands in for scikit-learn's Bunch when the newsgroups pickle is read (no scikit-learn needed)."""

    def __setstate__(self, state: dict) -> None:
        self.update(state)


class _Ignored:
    """Stands in for the NumPy arrays of the pickle (the labels): built and dropped, NumPy never imported."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _Unpickler(pickle.Unpickler):
    """Reads the newsgroups pickle, resolving only the classes that file names (texts kept, arrays dropped)."""

    ALLOWED = {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"), ("__builtin__", "dict"),
               ("builtins", "dict"), ("__builtin__", "object"), ("builtins", "object")}  # fmt: skip

    def find_class(self, module: str, name: str):
        if name == "Bunch" and module.startswith("sklearn"):
            return _Bunch
        if module.split(".")[0] == "numpy":
            return _Ignored
        if (module, name) in self.ALLOWED:
            return super().find_class(module.replace("__builtin__", "builtins"), name)
        raise pickle.UnpicklingError(f"the newsgroups file names {module}.{name}, which is not read")


def post_body(post: str) -> str:
    """A Usenet post without its header lines (everything before the first blank line)."""
    head, _, body = post.replace("\r\n", "\n").partition("\n\n")
    return body.strip() if body.strip() else head.strip()


def _newsgroups() -> str:
    bunch = _Unpickler(io.BytesIO(zlib.decompress(GENSIM.read(TEST_DATA + "mini_newsgroup"))), encoding="latin-1").load()
    return "\n\n".join(body for body in map(post_body, bunch["data"]) if body)


def _code() -> str:
    """Every Python module of the gensim wheel, path first, in path order."""
    files = GENSIM.members(lambda name: name.endswith(".py"))
    return "\n\n".join(f"# {name}\n{data.decode('utf-8').strip()}" for name, data in files.items() if data.strip())


def _docs() -> str:
    """The docutils manuals (reStructuredText), in path order."""
    files = DOCUTILS.members(lambda name: "/docs/" in name and name.endswith(".txt"))
    return "\n\n".join(data.decode("utf-8").strip() for data in files.values() if data.strip())


LICENSES = Path("/usr/share/common-licenses")


def _legal() -> str:
    """Debian's licence texts (package base-files), joined in name order."""
    if not LICENSES.is_dir():
        raise FileNotFoundError(f"{LICENSES} is not there: legal-sample reads the licences of Debian's base-files")
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


@dataclass(frozen=True)
class Corpus:
    kind: str
    build: Callable[[], str]
    origin: str


def _enwiki() -> str:
    from secateur.data.enwiki import build

    return build()


CORPORA: dict[str, Corpus] = {
    "enwiki-sample": Corpus("encyclopedic", _enwiki, "Wikipedia articles in the gensim 4.4.0 wheel (PyPI)"),
    "news-sample": Corpus("news", _news, "the Lee news corpus in the gensim 4.4.0 wheel (PyPI)"),
    "newsgroups-sample": Corpus("discussion", _newsgroups, "20 Newsgroups posts in the gensim 4.4.0 wheel (PyPI)"),
    "code-sample": Corpus("code", _code, "the Python modules of the gensim 4.4.0 wheel (PyPI)"),
    "docs-sample": Corpus("documentation", _docs, "the docutils 0.21.2 manuals (PyPI sdist)"),
    "legal-sample": Corpus("legal", _legal, "Debian base-files' licence texts"),
}


def load(name: str) -> str:
    """A corpus as plain text, built and cached on first use (the cache is written atomically)."""
    cached = cache_dir() / f"{name}.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    log.info("building the %s corpus from %s", name, CORPORA[name].origin)
    text = CORPORA[name].build()
    partial = cached.with_suffix(f".tmp-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(cached)
    return text
