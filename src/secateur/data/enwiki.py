"""The offline English sample: ~100 Wikipedia articles shipped inside the gensim 4.4.0 wheel.

Fetched with `pip download --no-deps` (PyPI is reachable where model hubs are not), markup
stripped with mwparserfromhell, cached as plain text under the user's cache directory.
"""

from __future__ import annotations

import bz2
import xml.etree.ElementTree as ET

from secateur.data.archives import GENSIM, TEST_DATA, cache_dir, cached

MEMBER = TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
__all__ = ["articles", "build", "cache_dir", "load"]


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


def build() -> str:
    """The sample as plain text, articles separated by blank lines."""
    xml_bytes = bz2.decompress(GENSIM.read(MEMBER))
    return "\n\n".join(f"{title}\n\n{body}" for title, body in articles(xml_bytes) if body)


def load() -> str:
    """The sample, fetched and cached on first use."""
    return cached("enwiki-sample", build, "the gensim 4.4.0 wheel")
