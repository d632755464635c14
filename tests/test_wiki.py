"""Wiki markup → prose, the dump reader, and the ``wiki`` corpus built from gensim's dump."""

from __future__ import annotations

import bz2

from gqaprune_core.data import load_corpus
from gqaprune_core.wiki import plain_text, read_articles

MARKUP = """{{Short description|Political philosophy}}
{{Infobox|name={{nested|x}}|y=1}}
'''Anarchism''' is a [[political philosophy]] that opposes [[State (polity)|states]].\
<ref name="a">{{cite book|title=X}}</ref> It is old.<ref name="b"/>
[[File:Flag.svg|thumb|A flag of [[Spain|Spanish]] anarchists]]
<!-- a hidden comment -->
== History ==
{| class="wikitable"
|-
| cell || cell
|}
* A list item with [http://example.org an external link].
Ampersand &amp; done. A formula <math>{{a} \\over {b}}</math>.
[[Category:Anarchism]]
[[de:Anarchismus]]
== See also ==
* [[Libertarianism]]
== References ==
{{reflist}}
"""


def test_plain_text_keeps_prose_and_link_labels_only():
    text = plain_text(MARKUP)
    assert text.splitlines()[0] == ("Anarchism is a political philosophy that opposes states. "
                                    "It is old.")
    assert "History" in text.splitlines()
    assert "A list item with an external link." in text
    assert "Ampersand & done. A formula ." in text
    for gone in ("{{", "}}", "[[", "]]", "<ref", "cite book", "thumb", "Spanish", "hidden comment",
                 "wikitable", "cell", "over", "Category", "Anarchismus", "Libertarianism", "reflist",
                 "'''"):
        assert gone not in text, gone


def test_read_articles_skips_redirects_and_other_namespaces(tmp_path):
    page = ("<page><title>{t}</title><ns>{ns}</ns><revision><text>{body}</text></revision>"
            "</page>")
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + page.format(t="A", ns=0, body="Article text")
           + page.format(t="B", ns=0, body="#REDIRECT [[A]]")
           + page.format(t="Talk:A", ns=1, body="Talk text")
           + page.format(t="C", ns=0, body="More text") + "</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert read_articles(path) == ["Article text", "More text"]


def test_wiki_corpus_is_plain_prose_split_by_article():
    corpus = load_corpus("wiki")
    assert len(corpus.calibration) == len(corpus.evaluation) == 48
    assert not set(corpus.calibration) & set(corpus.evaluation)
    assert corpus.calibration[0].startswith("Anarchism is a political philosophy")
    text = corpus.text("evaluation")
    assert len(text) > 1_000_000
    assert text.count("{{") + text.count("[[") + text.count("<ref") == 0
