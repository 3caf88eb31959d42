"""benchmarks/corpus.py: its text converters on small written inputs, and the atomic build with a fake package."""

import json
import lzma
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ..conftest import load_benchmark


@pytest.fixture(scope="module")
def corpus():
    return load_benchmark("corpus")


def test_html_keeps_prose_and_drops_code_tables_scripts_and_navigation(corpus):
    page = """<html><head><title>Page title</title><style>p {color: red}</style></head><body>
    <div class="navheader"><a href="x">Prev</a> Up <a href="y">Next</a></div>
    <h1>Caf&eacute; &amp; bar<a class="headerlink" href="#h">¶</a></h1>
    <p>The <code>open()</code> call returns a   file
       object&#8217;s handle &lt;fd&gt;.</p>
    <script>var leaked = "script";</script>
    <pre><code>for x in range(3):
    print(x)</code></pre>
    <div class="highlight"><pre>leaked_code = 1</pre></div>
    <table><tr><td>leaked cell</td></tr></table>
    <ul><li>First item</li><li>Second <b>bold</b> item<br>after a break</li></ul>
    <p>12.3 /</p>
    </body></html>"""
    text = corpus.html_to_text(page)
    assert text.split("\n\n") == [
        "Café & bar", "The open() call returns a file object’s handle <fd>.", "First item",
        "Second bold item", "after a break"]  # "12.3 /" has no letter: not prose
    for leaked in ("Page title", "color", "Prev", "Next", "¶", "leaked", "range", "print"):
        assert leaked not in text


RST = """\
.. SPDX-License-Identifier: GPL-2.0

.. _label-target:

==========
Page Title
==========

Intro paragraph with :func:`os.path.join`, :ref:`the guide <guide-label>`, :class:`~a.b.Cls`,
``literal \\x`` text, *emphasis*, **strong**, `a link <https://example.com>`_ and a footnote [#]_.

Section
-------

Here is an example::

    code_line = 1
      more_code()

After the example.

.. code-block:: python

   hidden = True

.. toctree::
   :maxdepth: 2

   intro

.. note:: Notes are prose.

   Second note paragraph.

.. function:: spam(eggs,
              ham=None)
   :noindex:

   Return spam made of eggs.

>>> print("doctest")
doctest

+-------+-------+
| grid  | table |
+=======+=======+
| a     | b     |
+-------+-------+

=====  =====
col    col2
=====  =====
x      y
=====  =====

- first bullet
- second bullet

::

    only code

The end.
"""


def test_rst_keeps_titles_and_prose_and_drops_directives_code_and_tables(corpus):
    text = corpus.rst_to_text(RST)
    assert text.split("\n\n") == [
        "Page Title",
        "Intro paragraph with os.path.join, the guide, Cls, literal \\x text, emphasis, strong, a link and "
        "a footnote.",
        "Section", "Here is an example:", "After the example.", "Notes are prose.", "Second note paragraph.",
        "Return spam made of eggs.", "first bullet", "second bullet", "The end."]
    for leaked in ("SPDX", "label", "code_line", "hidden", "maxdepth", "intro", "spam(", "noindex", "doctest",
                   "grid", "col2", "only code", "::"):
        assert leaked not in text


def test_pod_drops_verbatim_and_formatting_codes(corpus):
    pod = ("=head1 NAME\n\nperlfoo - about B<foo>\n\n=head2 Use C<< $x->y >>\n\n"
           "    my $code = 1;\n\nSee L<the manual|perlfunc> and L<perlop/\"Precedence\">, E<lt>tagE<gt>X<index>.\n\n"
           "=begin html\n\n<p>raw</p>\n\n=end html\n\n=over 4\n\n=item *\n\nBulleted.\n\n=back\n\n=cut\n")
    assert corpus.pod_to_text(pod).split("\n\n") == [
        "NAME", "perlfoo - about foo", "Use $x->y", "See the manual and Precedence in perlop, <tag>.", "Bulleted."]


def _literal_lzw(text):
    """A compress-style LZW stream of only literal 9-bit codes (under 255 of them, so the width never grows)."""
    bits = sum(byte << (9 * k) for k, byte in enumerate(text))
    return bits.to_bytes((9 * len(text) + 7) // 8, "little")


def test_bible_verses_lose_their_numbers_and_books_become_documents(corpus):
    assert corpus.strip_verse("1Sm3:10 And the LORD came.") == ("1Sm", 3, "And the LORD came.")
    assert corpus.strip_verse("Holy Bible, Authorized (King James) Version.") is None
    text = "Holy Bible.\nGe1:1 In the beginning.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\nExo1:1 Now these.\n"
    assert corpus.bible_books(text) == [("01-Ge", "In the beginning. And the earth.\n\nThus the heavens."),
                                        ("02-Exo", "Now these.")]
    window = _literal_lzw(text.encode())
    header = b"EC02" + b"\0" * 80 + (65536).to_bytes(4, "big") + (1).to_bytes(4, "big")
    start = len(header) + 8
    raw = header + start.to_bytes(4, "big") + (start + len(window)).to_bytes(4, "big") + window
    assert corpus.read_bible_data(raw) == text
    with pytest.raises(ValueError, match="EC02"):
        corpus.read_bible_data(b"\x1f\x9d" + raw)


def test_keep_documents_drops_short_and_duplicate_texts_and_sorts(corpus):
    long_a, long_b = "word " * 60, "other " * 60
    seen = set()
    kept = corpus.keep_documents([("p:z", long_a), ("p:a", long_b), ("p:m", long_a), ("p:short", "too few words")],
                                 seen)
    assert [d["source"] for d in kept] == ["p:a", "p:m"]  # p:z is p:m's duplicate, p:short under 50 words
    assert corpus.keep_documents([("q:x", long_b)], seen) == []  # duplicates across packages go too


def _fake_fetch(spec, cache, workdir, quiet=False):
    """Stands in for apt-get download + dpkg-deb -x: a package with two prose pages and a copyright file."""
    root = workdir / spec
    doc = root / "usr/share/doc/fake-doc"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Format: x\n\nFiles: *\nLicense: CC0-1.0\n")
    (doc / "b.html").write_text("<p>" + "Second page words. " * 20 + "</p><pre>code</pre>")
    (doc / "a.html").write_text("<h1>First</h1><p>" + "Some prose here. " * 20 + "</p>")
    (doc / "short.html").write_text("<p>Too short.</p>")
    return {"package": spec, "version": "1.0-1", "deb": f"{spec}_1.0-1_all.deb", "sha256": "0" * 64}, root


def test_build_writes_atomically_and_refuses_a_non_empty_out(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(corpus.SOURCES, "fake-doc", corpus.Source("html", ("usr/share/doc/fake-doc/*.html",)))
    monkeypatch.setattr(corpus, "fetch_package", _fake_fetch)
    out = tmp_path / "out"
    out.mkdir()  # an empty folder may be filled
    args = ["--out", str(out), "--packages", "fake-doc", "--xz", "--cache", str(tmp_path / "cache"), "-q"]
    manifest = corpus.main(args)
    lines = (out / "corpus.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d["source"] for d in docs] == ["fake-doc:usr/share/doc/fake-doc/a.html",
                                           "fake-doc:usr/share/doc/fake-doc/b.html"]
    assert docs[0]["text"].startswith("First\n\nSome prose here.") and "code" not in docs[1]["text"]
    assert lzma.decompress((out / "corpus.jsonl.xz").read_bytes()).decode().splitlines() == lines
    written = json.loads((out / "manifest.json").read_text())
    assert written == manifest and written["documents"] == 2
    assert written["packages"][0]["license"] == "CC0-1.0" and written["packages"][0]["documents"] == 2
    assert written["characters"] == sum(len(d["text"]) for d in docs)
    assert written["tokens_estimate"] == written["characters"] // 4 and "--xz" in written["command"]
    assert "| fake-doc | 1.0-1 | 2 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it

    with pytest.raises(SystemExit, match=r"exists and is not empty \(give --overwrite"):
        corpus.main(args)
    assert (out / "manifest.json").read_text() == json.dumps(manifest, indent=2) + "\n"  # untouched

    # budget: only the first page fits; the packaged stories260k tokenizer counts its tokens
    tokenizer = Path(__file__).parents[2] / "mixerswap" / "data" / "stories260k"
    counted = corpus.main(args + ["--max-chars", "400", "--overwrite", "--tokenizer", str(tokenizer)])
    kept = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    assert [d["source"] for d in kept] == ["fake-doc:usr/share/doc/fake-doc/a.html"]
    expected = len(AutoTokenizer.from_pretrained(tokenizer)(kept[0]["text"], add_special_tokens=False)["input_ids"])
    assert counted["tokens"] == expected > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_package_is_refused_before_any_work(corpus, tmp_path):
    with pytest.raises(SystemExit, match="no recipe for no-such-doc"):
        corpus.main(["--out", str(tmp_path / "o"), "--packages", "no-such-doc"])
    assert not (tmp_path / "o").exists()
