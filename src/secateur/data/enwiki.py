"""The offline English sample: ~100 Wikipedia articles shipped inside the gensim 4.4.0 wheel.

Fetched with `pip download --no-deps` (PyPI is reachable where model hubs are not), markup
stripped with mwparserfromhell, cached as plain text under the user's cache directory.
"""

from __future__ import annotations

import bz2
import logging
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

WHEEL = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE_NAME = "enwiki-sample.txt"


def cache_dir() -> Path:
    root = os.environ.get("SECATEUR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "secateur"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _download_wheel(dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
        "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "-d", str(dest), WHEEL,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(dest.glob("gensim-*.whl"))
    if result.returncode or not wheels:
        raise RuntimeError(f"could not fetch {WHEEL} from PyPI for the enwiki sample:\n{result.stderr.strip()}")
    return wheels[0]


def _strip(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags(recursive=False, matches=lambda node: str(node.tag).lower() == "ref"):
        try:
            code.remove(tag)
        except ValueError:
            pass
    text = code.strip_code(normalize=True, collapse=True)
    paragraphs = [" ".join(line.split()) for line in text.split("\n")]
    return "\n\n".join(p for p in paragraphs if len(p.split()) > 3)  # drop headings, list debris


def articles(xml_bytes: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of each main-namespace, non-redirect page of a MediaWiki XML dump."""
    root = ET.fromstring(xml_bytes)
    ns = root.tag.split("}")[0] + "}"
    pages = []
    for page in root.iter(f"{ns}page"):
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") == "0" and not text.lower().startswith("#redirect"):
            pages.append((page.findtext(f"{ns}title") or "", _strip(text)))
    return pages


def load() -> str:
    """The sample as plain text, articles separated by blank lines (fetched and cached on first use)."""
    cached = cache_dir() / CACHE_NAME
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    log.info("fetching the enwiki sample from the %s wheel", WHEEL)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            xml_bytes = bz2.decompress(archive.read(MEMBER))
    text = "\n\n".join(f"{title}\n\n{body}" for title, body in articles(xml_bytes) if body)
    partial = cached.with_suffix(f".tmp-{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(cached)  # atomic: a crash never leaves a truncated cache
    return text
