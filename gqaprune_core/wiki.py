"""Encyclopedic English offline: the shortened Wikipedia dump that ships with gensim's tests.

gensim's test data holds the first pages of an English Wikipedia dump (``enwiki-latest-pages-
articles1.xml-p000000010p000030302-shortened.bz2``: 106 articles from "Anarchism" to about
"Apollo 11", 5.7 MB of wiki markup). :func:`wiki_documents` turns each article into plain prose
much like WikiText's: templates, tables, references, formulas, code, files and categories are
dropped, links keep their label, and everything from "See also" / "References" on is cut.
Redirects and pages under 2,000 characters (disambiguation pages, stubs) are skipped; 96
articles remain (2.8 M characters).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_CHARS = 2000

_TAIL = re.compile(r"^==+\s*(References|Notes|External links|See also|Further reading|"
                   r"Bibliography|Sources|Citations|Footnotes)\s*==+\s*$", re.M | re.I)
# [[File:...]], [[Category:...]], interlanguage links: no prose to keep
_NAMESPACED = re.compile(r"^\s*(File|Image|Category|wikt|Wiktionary|Wikisource|commons|"
                         r"[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}", re.S)
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)


def _remove_nested(text: str, innermost: re.Pattern) -> str:
    """Remove matches of ``innermost`` until none is left (nested ones surface in turn)."""
    while True:
        text, count = innermost.subn("", text)
        if not count:
            return text


def _link_label(match: re.Match) -> str:
    target, label = match.group(1), match.group(2)
    if _NAMESPACED.match(target):
        return ""
    return target if label is None else label


def plain_text(markup: str) -> str:
    """Wiki markup → plain prose (headings kept as lines of their own)."""
    text = _TAIL.split(markup, maxsplit=1)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<(math|chem|gallery|syntaxhighlight|source|score|timeline)\b[^>]*>.*?</\1>", "",
                  text, flags=re.S)  # formulas, code, galleries: not prose
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _remove_nested(text, _TEMPLATE)
    text = _remove_nested(text, _TABLE)
    while True:  # innermost links first: captions of [[File:...]] may hold links
        text, count = _LINK.subn(_link_label, text)
        if not count:
            break
    text = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    lines = [re.sub(r"^[*#:;]+\s*", "", line.strip()) for line in text.splitlines()
             if not line.strip().startswith(("|", "!", "{", "}"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_articles(path: str | Path) -> list[str]:
    """The wiki markup of every article (namespace 0, not a redirect) in a ``.xml.bz2`` dump."""
    articles = []
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            namespace = element.find("{*}ns")
            text = element.find("{*}revision/{*}text")
            if (namespace is not None and namespace.text == "0" and text is not None
                    and text.text and not text.text.lstrip().upper().startswith("#REDIRECT")):
                articles.append(text.text)
            element.clear()
    return articles


def wiki_documents(path: str | Path) -> list[str]:
    """Plain-text articles of at least :data:`MIN_CHARS` characters, in dump order."""
    return [text for text in map(plain_text, read_articles(path)) if len(text) >= MIN_CHARS]
