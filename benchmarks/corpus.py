#!/usr/bin/env python3
"""Build a reproducible English prose corpus for distillation from Debian bookworm main packages.

WikiText-2 test (our held-out text) has ~250k tokens; distilling the SmolLM2 teacher needs tens of
millions. This script downloads documentation packages with `apt-get download` (the one network
source here), unpacks them with `dpkg-deb -x` (files only: no maintainer script ever runs), turns
their text into plain prose and writes one JSON document per line:

    python benchmarks/corpus.py --out DIR [--packages bible-kjv-text,python3.11-doc,...]
                                [--max-chars N] [--xz] [--cache DIR] [--overwrite] [-q]

DIR/corpus.jsonl  {"text": ..., "source": "<package>:<path or book>"} sorted by source; markup removed,
                  code blocks and tables dropped, one paragraph per blank-line-separated block,
                  documents under 50 words and exact duplicates dropped.
DIR/corpus.jsonl.xz  with --xz (lzma preset 9), small enough for the device's 64 MiB transfers.
DIR/manifest.json the command, date, each package's version, .deb, sha256, license, documents and
                  characters, the totals and a token estimate (characters / 4, not a tokenizer count).

DIR is built in a temporary folder beside it and renamed into place; an existing non-empty DIR is
refused unless --overwrite. The .debs stay in --cache (default ~/.cache/mixerswap-corpus) and are
checked against the sha256 that apt lists, so a rerun downloads nothing.

The default corpus as measured here (`--out /tmp/corpus-default --xz`: 100 s with an empty cache,
~170 MB of .debs downloaded; corpus.jsonl 47.5 MiB, corpus.jsonl.xz 10.1 MiB; two runs gave the same
sha256 for corpus.jsonl; with `--tokenizer` SmolLM2-135M's tokenizer counts 11.88M tokens):

    package               version             documents  characters
    bible-kjv-text        4.38                       66   4,138,904  (one document per book)
    debian-handbook       11.20220922               124     991,094
    gnome-user-docs       43.0-2                    302     389,258
    gimp-help-en          2.10.34-2                 633   1,505,704
    python3.11-doc        3.11.2-6+deb12u8          464   6,946,949
    linux-doc-6.1         6.1.176-1                2362  14,581,815  (translations, devicetree left out)
    perl-doc              5.36.0-7+deb12u3          200   6,301,081
    postgresql-doc-15     15.18-0+deb12u1          1026   5,064,122
    python-django-doc     3:3.2.25-0+deb12u3        466   3,705,297
    git-doc               1:2.39.5-0+deb12u3        233   2,890,799
    bash-doc              5.2.15-2                    1     442,141
    gnu-standards         2022.03.23-0.1              2     340,063
    debian-reference-en   2.100                      15     310,180
    developers-reference  12.18                      10     265,827
    debian-policy         4.6.2.0                    23     387,577
    maint-guide           1.2.53                     11     137,646
    total                                          5938  48,398,457  (~12.1M tokens at 4 characters each)

Security updates replace versions in bookworm over time; NAME=VERSION in --packages pins one while
the archive still has it, and the manifest's sha256 says exactly which .deb a corpus came from.
"""

import argparse
import datetime
import gzip
import hashlib
import html
import html.parser
import json
import lzma
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIN_WORDS = 50


@dataclass(frozen=True)
class Source:
    """Where a package keeps its prose and how to read it."""

    kind: str  # "bible", "rst", "html" or "pod": which *_to_text reads the files
    include: tuple  # globs relative to the unpacked package
    exclude: tuple = ()  # substrings of relative paths to leave out (indexes, translations, ...)
    license: str = ""  # said instead of the copyright file's first License: line (missing or misleading)


SOURCES = {
    "bible-kjv-text": Source("bible", ("usr/lib/bible.data",),
                             license="public domain (King James Version, 1611; per the copyright file)"),
    "python3.11-doc": Source("rst", ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",),
                             license="PSF-2.0 (Python Software Foundation License, see the copyright file)"),
    "linux-doc-6.1": Source("rst", ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",),
                            exclude=("/translations/", "/devicetree/", "/ABI/")),
    "postgresql-doc-15": Source("html", ("usr/share/doc/postgresql-doc-15/html/*.html",),
                                exclude=("/bookindex.html",)),
    "python-django-doc": Source("html", ("usr/share/doc/python-django-doc/html/**/*.html",),
                                exclude=("/_modules/", "/genindex", "/py-modindex", "/search.html")),
    "debian-handbook": Source("html", ("usr/share/doc/debian-handbook/html/en-US/*.html",)),
    "perl-doc": Source("pod", ("usr/share/perl/*/pod/*.pod",)),
    "gimp-help-en": Source("html", ("usr/share/gimp/2.0/help/en/**/*.html",),
                           license="GFDL-1.2 (gimp-help, see gimp-help-common's copyright file)"),
    "git-doc": Source("html", ("usr/share/doc/git-doc/**/*.html",)),
    "debian-reference-en": Source("html", ("usr/share/debian-reference/*.en.html",)),
    "developers-reference": Source("rst", ("usr/share/developers-reference/_sources/*.rst.txt",)),
    "debian-policy": Source("rst", ("usr/share/doc/debian-policy/policy.html/_sources/*.rst.txt",)),
    "maint-guide": Source("html", ("usr/share/doc/maint-guide/html/*.en.html",)),
    "gnu-standards": Source("html", ("usr/share/doc/gnu-standards/*.html",),
                            license="GFDL-1.3+ (see the copyright file)"),
    "gnome-user-docs": Source("html", ("usr/share/help/C/**/*.page",)),  # Mallard XML reads like HTML here
    "bash-doc": Source("html", ("usr/share/doc/bash/bashref.html",)),
    "sphinx-doc": Source("rst", ("usr/share/doc/sphinx-doc/html/_sources/**/*.rst.txt",)),
}
# natural prose first (a --max-chars budget takes packages in this order), then the big manuals;
# sphinx-doc is left out: much of it is about markup itself
DEFAULT_PACKAGES = ",".join((
    "bible-kjv-text", "debian-handbook", "gnome-user-docs", "gimp-help-en", "python3.11-doc", "linux-doc-6.1",
    "perl-doc", "postgresql-doc-15", "python-django-doc", "git-doc", "bash-doc", "gnu-standards",
    "debian-reference-en", "developers-reference", "debian-policy", "maint-guide"))



def join_paragraphs(paragraphs):
    """Collapse whitespace inside each paragraph and keep one blank line between them; paragraphs
    without a letter (leftover punctuation of widgets and diagrams) go."""
    cleaned = (re.sub(r"\s+", " ", p).strip() for p in paragraphs)
    return "\n\n".join(p for p in cleaned if re.search(r"[^\W\d_]", p))



SKIP_TAGS = {"head", "info", "screen", "script", "style", "pre", "table", "nav", "header", "footer", "noscript", "svg",
             "math", "form", "button", "select", "textarea"}
# navigation, sidebars, permalinks and code boxes of the Sphinx, DocBook and Publican templates
SKIP_CLASSES = {"navheader", "navfooter", "docnav", "related", "sphinxsidebar", "footer", "headerlink",
                "toc", "breadcrumbs", "highlight", "reportbug", "indexterm", "doc-nav", "nav", "synopsis",
                "cmdsynopsis", "funcsynopsis", "literallayout", "screen", "programlisting", "mediaobject"}
SKIP_IDS = {"banner", "hd", "ft", "header", "footer", "sidebar", "search", "toc", "breadcrumbs"}
BLOCK_TAGS = {"p", "div", "section", "article", "main", "aside", "h1", "h2", "h3", "h4", "h5", "h6",
              "li", "ul", "ol", "dl", "dt", "dd", "br", "hr", "blockquote", "figure", "figcaption",
              "caption", "tr", "td", "th", "body", "title", "address"}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr", "source"}


class _HTMLText(html.parser.HTMLParser):
    """Collects the visible prose of a page as paragraphs, skipping whole code/table/navigation elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self.current = [], []
        self.skip_tag, self.skip_depth = None, 0

    def flush(self):
        if self.current:
            self.paragraphs.append("".join(self.current))
            self.current = []

    def handle_starttag(self, tag, attrs):
        if self.skip_tag:
            # count only the skipped tag's own name: HTML's unclosed <p>/<li> cannot upset the count
            self.skip_depth += tag == self.skip_tag
            return
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag in SKIP_TAGS or classes & SKIP_CLASSES or attrs.get("id") in SKIP_IDS:
            if tag not in VOID_TAGS:
                self.flush()
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self.flush()

    def handle_endtag(self, tag):
        if self.skip_tag:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if not self.skip_depth:
                    self.skip_tag = None
            return
        if tag in BLOCK_TAGS:
            self.flush()

    def handle_data(self, data):
        if not self.skip_tag:
            self.current.append(data)


def html_to_text(source):
    """Visible prose of an HTML page: tags and entities gone, pre/table/script/style/navigation dropped.

    Inline <code> keeps its words (dropping them would leave holes in sentences); code blocks go.
    """
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    parser.flush()
    return join_paragraphs(parser.paragraphs)



# directives whose body is prose (admonitions, API descriptions): everything else (code-block,
# toctree, image, tables, math, kernel-doc, ...) is dropped with its body
PROSE_DIRECTIVES = {
    "note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "error", "seealso",
    "admonition", "topic", "sidebar", "rubric", "versionadded", "versionchanged", "deprecated",
    "deprecated-removed", "impl-detail", "function", "method", "class", "attribute", "data", "exception",
    "describe", "object", "decorator", "decoratormethod", "classmethod", "staticmethod", "abstractmethod",
    "coroutinefunction", "coroutinemethod", "property", "envvar", "option", "cmdoption", "opcode",
    "pdbcommand", "member", "macro", "type", "var", "struct", "union", "enum", "enumerator", "only",
    "container", "glossary", "epigraph", "highlights", "pull-quote", "compound", "centered", "setting",
    "django-admin", "django-admin-option", "templatetag", "templatefilter", "fieldlookup", "confval",
}
# of those, the ones whose argument is a signature (continued on the next lines up to a blank line)
SIGNATURE_DIRECTIVES = PROSE_DIRECTIVES - {
    "note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "error", "seealso",
    "admonition", "topic", "sidebar", "rubric", "versionadded", "versionchanged", "deprecated",
    "deprecated-removed", "impl-detail", "only", "container", "glossary", "epigraph", "highlights",
    "pull-quote", "compound", "centered"}
# and the ones whose argument is a sentence or a title
TITLE_DIRECTIVES = {"note", "warning", "tip", "hint", "important", "caution", "attention", "danger",
                    "error", "seealso", "admonition", "topic", "sidebar", "rubric"}
DIRECTIVE = re.compile(r"\.\.\s+([\w:.+-]+)::(.*)$")
UNDERLINE = re.compile(r"""^([=\-~^"'`#*+<>:._])\1{2,}\s*$""")
SIMPLE_TABLE_BORDER = re.compile(r"^=+( +=+)+\s*$")
BULLET = re.compile(r"^(?:[-*+\u2022]|#\.|\d+[.)]|\(?[a-zA-Z][.)])\s+")


def _indent(line):
    return len(line) - len(line.lstrip())


def _skip_indented(lines, i, base):
    """Index of the first line after i that is not blank and not indented deeper than base."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        i += 1
    return i


def _role_text(match):
    """:role:`title <target>` shows title; :role:`~a.b.c` shows c; otherwise the text itself."""
    text = match.group(1)
    titled = re.match(r"(.+?)\s*<[^<>]*>$", text, re.S)
    if titled:
        return titled.group(1)
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!")


def _rst_markup(text):
    """Roles, links, emphasis, footnote and substitution references, escapes: to plain words."""
    text = re.sub(r":[\w:+.-]+:`([^`]*)`", _role_text, text)
    text = re.sub(r"`([^`]+?)(?:\s*<[^`<>]*>)?`__?", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    text = re.sub(r"\s?\[(?:#\w*|\d+|\*)\]_", "", text)
    text = re.sub(r"\b([A-Za-z][\w-]*[A-Za-z0-9])__?(?=[\s.,;:!?)]|$)", r"\1", text)
    text = re.sub(r"\|(\w[\w -]*)\|", r"\1", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])", r"\1", text)
    return re.sub(r"\\(.)", r"\1", text)


def rst_inline(text):
    """Inline reST markup to the words a reader sees; ``literals`` keep their text verbatim."""
    parts = re.split(r"(``.+?``)", text)
    return "".join(part[2:-2] if k % 2 else _rst_markup(part) for k, part in enumerate(parts))


def _finish_rst_paragraph(lines):
    """A paragraph's text, or None for a doctest; a closing '::' (literal block next) becomes ':'."""
    if lines[0].lstrip().startswith(">>>"):
        return None
    text = " ".join(line.strip() for line in lines)
    text = re.sub(r"\s+::$", "", text)
    text = re.sub(r"::$", ":", text)
    return rst_inline(text)


def rst_to_text(source):
    """Prose of a reST page: directives other than admonitions/API entries, literal blocks after '::',
    doctests, comments, targets and tables are dropped; titles and paragraphs stay, markup removed."""
    lines = source.expandtabs(8).splitlines()
    paragraphs, para, literal_after = [], [], None

    def flush():
        nonlocal para, literal_after
        if para:
            if para[-1].rstrip().endswith("::"):
                literal_after = _indent(para[0])
            text = _finish_rst_paragraph(para)
            if text and text.strip() != ":":
                paragraphs.append(text)
            para = []

    i = 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        if not stripped:
            flush()
            i += 1
            continue
        if literal_after is not None and not para:
            base, literal_after = literal_after, None
            if _indent(line) > base:  # the literal block announced by '::'
                i = _skip_indented(lines, i, base)
                continue
        if stripped.startswith(".. ") or stripped == "..":
            flush()
            directive = DIRECTIVE.match(stripped)
            name = directive.group(1).split(":")[-1] if directive else None
            if name in PROSE_DIRECTIVES:
                if name in TITLE_DIRECTIVES and directive.group(2).strip():
                    paragraphs.append(rst_inline(directive.group(2).strip()))
                i += 1
                while i < len(lines) and lines[i].strip() and (  # signature lines, then options
                        name in SIGNATURE_DIRECTIVES or re.match(r"\s+:[\w -]+:(\s|$)", lines[i])):
                    i += 1
            else:  # comments, targets, substitutions, footnotes and non-prose directives
                i = _skip_indented(lines, i + 1, _indent(line))
            continue
        if SIMPLE_TABLE_BORDER.match(stripped):
            flush()
            i += 1  # a simple table ends at a border line followed by a blank line
            while i < len(lines) and not (SIMPLE_TABLE_BORDER.match(lines[i].strip())
                                          and (i + 1 == len(lines) or not lines[i + 1].strip())):
                i += 1
            i += 1
            continue
        if re.match(r"^\+[-=+]+\+$", stripped):  # grid table
            flush()
            while i < len(lines) and lines[i].strip()[:1] in ("+", "|"):
                i += 1
            continue
        if UNDERLINE.match(stripped):  # section over/underline: the title becomes its own paragraph
            flush()
            i += 1
            continue
        if BULLET.match(stripped) or re.match(r":[\w -]+:(\s|$)", stripped):
            flush()
            line = " " * _indent(line) + re.sub(r"^:[\w -]+:\s*", "", BULLET.sub("", stripped))
        para.append(line)
        i += 1
    flush()
    return join_paragraphs(paragraphs)



def _pod_code(match):
    """One POD formatting code, innermost first: L<text|target>, E<gt>, X<index>, C<code>, ..."""
    code, body = match.group(1), match.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        named = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|"}
        return named.get(body) or html.unescape(f"&{body};" if not body.isdigit() else f"&#{body};")
    if code == "L":
        if "|" in body:
            return body.split("|", 1)[0]
        page, _, section = body.partition("/")
        section = section.strip('"')
        return f"{section} in {page}" if section and page else section or page
    return body


def pod_to_text(source):
    """Prose of a POD page: headings, items and ordinary paragraphs; verbatim (indented) paragraphs
    and =begin/=end blocks dropped; formatting codes replaced by their text."""
    paragraphs, in_block = [], False
    for para in re.split(r"\n[ \t]*\n", source):
        if not para.strip():
            continue
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command = command.split("\n")[0]
            if command in ("begin", "end"):
                in_block = command == "begin"
            if command.startswith("head") or (command == "item" and rest.strip() not in ("", "*")):
                para = rest
            else:
                continue
        elif para[0] in " \t":  # verbatim: code
            continue
        if in_block:
            continue
        text = re.sub(r"([A-Z])<<+\s+(.*?)\s+>>+", lambda m: _pod_code(m), para, flags=re.S)
        while True:
            replaced = re.sub(r"([A-Z])<([^<>]*)>", _pod_code, text)
            if replaced == text:
                break
            text = replaced
        paragraphs.append(text)
    return join_paragraphs(paragraphs)



BOOKS = ("Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings "
         "2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes "
         "Song_of_Solomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah "
         "Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans "
         "1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians 1_Thessalonians "
         "2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John "
         "3_John Jude Revelation").replace("_", "\0").split()
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def strip_verse(line):
    """'Ge1:3 And God said...' -> ('Ge', 1, 'And God said...'); None for other lines (the title)."""
    match = VERSE.match(line.strip())
    return (match.group(1), int(match.group(2)), match.group(4)) if match else None


def bible_books(text):
    """(source name, text) per book, in canonical order: one paragraph per chapter, verse numbers gone."""
    books = {}  # abbreviation -> {chapter: [verse text]}, in the order of the file
    for line in text.splitlines():
        verse = strip_verse(line)
        if verse:
            books.setdefault(verse[0], {}).setdefault(verse[1], []).append(verse[2])
    names = [b.replace("\0", " ") for b in BOOKS] if len(books) == len(BOOKS) else list(books)
    return [(f"{n:02d}-{name}", join_paragraphs(" ".join(v) for v in chapters.values()))
            for n, (name, chapters) in enumerate(zip(names, books.values()), 1)]


def _lzw_window(data):
    """Decompress one window: Unix `compress` LZW (16 bits, block mode), as in the package's
    compresslib.c, including compress's habit of reading codes in groups of n_bits bytes."""
    prefix, suffix = [0] * 65536, bytearray(range(256)) + bytearray(65536 - 256)
    out, n_bits, free_ent, pos = bytearray(), 9, 257, 0
    group, offset, size, reset = 0, 0, 0, False
    old = fin = None
    while True:
        if reset or offset >= size or free_ent > (1 << n_bits) - 1 + (n_bits == 16):
            if free_ent > (1 << n_bits) - 1 and n_bits < 16:
                n_bits += 1  # codes got wider: compress starts a new group of n_bits bytes
            if reset:
                n_bits, reset = 9, False
            chunk = data[pos:pos + n_bits]
            if not chunk:
                return bytes(out)
            pos += len(chunk)
            group, offset, size = int.from_bytes(chunk, "little"), 0, len(chunk) * 8 - (n_bits - 1)
        code = (group >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        if old is None:
            old = fin = code
            out.append(code)
            continue
        if code == 256:  # CLEAR: table and code width restart; the next code is a literal again
            free_ent, reset, old = 257, True, None
            continue
        incode, stack = code, bytearray()
        if code >= free_ent:  # the KwKwK case
            stack.append(fin)
            code = old
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        fin = suffix[code]
        stack.append(fin)
        out += stack[::-1]
        if free_ent < 65536:
            prefix[free_ent], suffix[free_ent] = old, fin
            free_ent += 1
        old = incode


def read_bible_data(raw):
    """Text of a `bible` data file: an 'EC02' header, a table of window offsets, then LZW windows."""
    if raw[:4] != b"EC02":
        raise ValueError("not a bible-kjv data file (no EC02 header)")
    window_count = int.from_bytes(raw[88:92], "big")
    offsets = [int.from_bytes(raw[92 + 4 * k:96 + 4 * k], "big") for k in range(window_count + 1)]
    return b"".join(_lzw_window(raw[a:b]) for a, b in zip(offsets, offsets[1:])).decode("latin-1")



def log(quiet, message):
    """A progress line on stderr (the table goes to stdout)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def apt_record(spec):
    """apt's record for 'name' or 'name=version': Package, Version, Filename, SHA256, ... (no network)."""
    result = subprocess.run(["apt-cache", "show", "--no-all-versions", spec], capture_output=True, text=True)
    if result.returncode or not result.stdout.strip():
        raise SystemExit(f"corpus.py: apt-cache knows no package {spec!r} (run apt-get update?)")
    record = {}
    for line in result.stdout.split("\n\n")[0].splitlines():
        if line[:1] not in (" ", "") and ":" in line:
            key, _, value = line.partition(":")
            record[key] = value.strip()
    return record


def sha256_of(path):
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def license_of(root, name, note):
    """The Source's note if it has one (for copyright files whose first License: line misleads or is
    missing), else the first License: of usr/share/doc/NAME/copyright, else a pointer to that file."""
    copyright_file = root / "usr/share/doc" / name / "copyright"
    if not note and copyright_file.is_file():
        for line in copyright_file.read_text(errors="replace").splitlines():
            if line.startswith("License:") and line[8:].strip():
                return line[8:].strip()
    return note or f"see usr/share/doc/{name}/copyright"


def fetch_package(spec, cache, workdir, quiet=False):
    """Download (or reuse from cache) and unpack one package; returns (manifest entry, unpacked root).

    Only files are extracted (dpkg-deb -x): nothing from the package is ever run."""
    record = apt_record(spec)
    # apt-get download names the file Package_Version_Arch.deb with an epoch's ':' written as %3a
    deb = cache / f"{record['Package']}_{record['Version'].replace(':', '%3a')}_{record['Architecture']}.deb"
    if not (deb.is_file() and sha256_of(deb) == record["SHA256"]):
        log(quiet, f"  downloading {spec} {record['Version']} ({int(record['Size']) / 1e6:.1f} MB)")
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["apt-get", "download", spec], cwd=cache, capture_output=True, text=True)
        if result.returncode or not deb.is_file():
            raise SystemExit(f"corpus.py: apt-get download {spec} failed: {result.stderr.strip()}")
        if sha256_of(deb) != record["SHA256"]:
            raise SystemExit(f"corpus.py: {deb} does not match the sha256 apt lists")
    root = workdir / record["Package"]
    root.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    entry = {"package": record["Package"], "version": record["Version"], "deb": deb.name,
             "sha256": record["SHA256"]}
    return entry, root


def read_file(path):
    """Text of a (possibly gzipped) file."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def package_documents(name, source, root):
    """(source, text) for every document of an unpacked package."""
    if source.kind == "bible":
        text = read_bible_data((root / source.include[0]).read_bytes())
        return [(f"{name}:{book}", body) for book, body in bible_books(text)]
    convert = {"rst": rst_to_text, "html": html_to_text, "pod": pod_to_text}[source.kind]
    paths = sorted({p for pattern in source.include for p in root.glob(pattern) if p.is_file()})
    documents = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        if not any(part in "/" + relative for part in source.exclude):
            documents.append((f"{name}:{relative}", convert(read_file(path))))
    return documents


def keep_documents(documents, seen, min_words=MIN_WORDS):
    """Documents with at least min_words words whose text is not in seen (updated), sorted by source."""
    kept = []
    for source, text in sorted(documents):
        digest = hashlib.sha256(text.encode()).hexdigest()
        if len(text.split()) >= min_words and digest not in seen:
            seen.add(digest)
            kept.append({"text": text, "source": source})
    return kept



def collect(packages, cache, workdir, max_chars, quiet):
    """Documents and manifest entries of the packages, in order, stopping at max_chars characters."""
    documents, entries, seen, total = [], [], set(), 0
    for spec in packages:
        name = spec.split("=")[0]
        if max_chars and total >= max_chars:
            break
        started = time.time()
        entry, root = fetch_package(spec, cache, workdir, quiet)
        kept = keep_documents(package_documents(name, SOURCES[name], root), seen)
        if max_chars:  # a budget for quick trials: whole documents until it is spent
            budget, kept_within = max_chars - total, []
            for doc in kept:
                if len(doc["text"]) > budget:
                    break
                kept_within.append(doc)
                budget -= len(doc["text"])
            kept = kept_within
        chars = sum(len(d["text"]) for d in kept)
        total += chars
        entry.update(license=license_of(root, name, SOURCES[name].license), documents=len(kept),
                     characters=chars)
        entries.append(entry)
        documents += kept
        shutil.rmtree(root)  # unpacked trees are large (linux-doc: 230 MB); the .deb stays cached
        log(quiet, f"  {name}: {len(kept)} documents, {chars / 1e6:.2f}M characters ({time.time() - started:.0f} s)")
    return sorted(documents, key=lambda d: d["source"]), entries


def count_tokens(documents, tokenizer_dir):
    """Tokens of the documents' text with the tokenizer saved in ``tokenizer_dir`` (no special tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [d["text"] for d in documents]
    return sum(len(ids) for start in range(0, len(texts), 64)
               for ids in tokenizer(texts[start : start + 64], add_special_tokens=False)["input_ids"])


def write_corpus(folder, documents, entries, command, xz, quiet, tokenizer=None):
    """corpus.jsonl (+ .xz) and manifest.json into folder; returns the manifest."""
    corpus = folder / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    characters = sum(e["characters"] for e in entries)
    manifest = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "distribution": "Debian bookworm main",
        "packages": entries,
        "documents": len(documents),
        "characters": characters,
        "tokens_estimate": characters // 4,
        "tokens_estimate_note": "characters / 4, a rule of thumb for English with a BPE tokenizer, not a count",
        "corpus_bytes": corpus.stat().st_size,
    }
    if tokenizer is not None:
        log(quiet, f"  counting tokens with {tokenizer}")
        manifest["tokens"] = count_tokens(documents, tokenizer)
        manifest["tokenizer"] = str(tokenizer)
    if xz:
        log(quiet, "  compressing corpus.jsonl.xz (lzma preset 9)")
        with open(corpus, "rb") as src, lzma.open(folder / "corpus.jsonl.xz", "wb", preset=9) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        manifest["xz_bytes"] = (folder / "corpus.jsonl.xz").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def print_table(manifest):
    """package | version | documents | characters, then the total."""
    print("| package | version | documents | characters |")
    print("| --- | --- | ---: | ---: |")
    for e in manifest["packages"]:
        print(f"| {e['package']} | {e['version']} | {e['documents']} | {e['characters']:,} |")
    print(f"| total | | {manifest['documents']} | {manifest['characters']:,} |")
    size = f", xz {manifest['xz_bytes'] / 2**20:.1f} MiB" if "xz_bytes" in manifest else ""
    counted = f"{manifest['tokens'] / 1e6:.2f}M tokens of {manifest['tokenizer']}, " if "tokens" in manifest else ""
    print(f"{counted}~{manifest['tokens_estimate'] / 1e6:.1f}M tokens (characters / 4); "
          f"corpus.jsonl {manifest['corpus_bytes'] / 2**20:.1f} MiB{size}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="corpus.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--packages", default=DEFAULT_PACKAGES,
                        help=f"comma-separated, NAME or NAME=VERSION, from: {', '.join(SOURCES)}")
    parser.add_argument("--max-chars", type=int, default=0, help="stop after this many characters")
    parser.add_argument("--xz", action="store_true", help="also write corpus.jsonl.xz")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/mixerswap-corpus",
                        help="where the .deb files are kept between runs")
    parser.add_argument("--tokenizer", type=Path,
                        help="a folder holding a Hugging Face tokenizer: the manifest then counts the corpus's tokens")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    args.packages = [p.strip() for p in args.packages.split(",") if p.strip()]
    unknown = [p for p in args.packages if p.split("=")[0] not in SOURCES]
    if unknown:
        raise SystemExit(f"corpus.py: error: no recipe for {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
        raise SystemExit(f"corpus.py: error: {args.out} exists and is not empty (give --overwrite to replace it)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    building.chmod(0o755)  # mkdtemp's 0700 would otherwise become the corpus folder's mode
    try:
        with tempfile.TemporaryDirectory(prefix="corpus-unpack-") as workdir:
            documents, entries = collect(args.packages, args.cache.expanduser(), Path(workdir),
                                         args.max_chars, args.quiet)
        command = shlex.join(["python", "benchmarks/corpus.py", *argv])
        manifest = write_corpus(building, documents, entries, command, args.xz, args.quiet, args.tokenizer)
        if out.exists():  # empty, or --overwrite: checked before any work
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    log(args.quiet, f"wrote {out} in {time.time() - started:.0f} s")
    print_table(manifest)
    return manifest


if __name__ == "__main__":
    main()
