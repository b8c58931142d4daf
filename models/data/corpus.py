"""Where training text comes from: a corpus spec names a built-in corpus or the user's files.

Built-in corpora are real text shipped inside installed packages, so training works offline:
  "wiki-sample"  gensim's English Wikipedia sample (~100 articles), wiki markup stripped to plain prose
  "lee"          gensim's Lee background corpus: 300 Australian news stories, one per line
Any other spec is a path to the user's files (`models.data.readers`: .txt, .jsonl[.gz|.zst], .parquet, .arrow,
or a directory of them). Documents come as pieces of bounded size (`iter_pieces`); whitespace-only documents
are skipped.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from curvtrain.models.data.readers import Piece, ReadOptions, read_file, split_text, user_files

DEFAULT_CORPUS = "wiki-sample"

# Bump when the text extraction below changes, so that caches keyed by `corpus_fingerprint` are rebuilt.
EXTRACTION_VERSION = 1


# ---- built-in corpora ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuiltinCorpus:
    package: str
    """The installed package that ships the file (also the distribution whose version enters the fingerprint)."""
    relpath: str
    """The file's path inside the package directory."""
    read: Callable[[Path], Iterator[str]]
    """Yields the documents of the file."""


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from (line.strip() for line in f)


def _read_mediawiki(path: Path) -> Iterator[str]:
    """Plain prose of each main-namespace, non-redirect article in a bz2 MediaWiki XML dump."""
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem.iter()}
            if fields["ns"].text == "0" and "redirect" not in fields:
                yield wiki_to_text(fields["text"].text or "")
            elem.clear()  # keep memory flat: the parsed page is no longer needed


def _local(tag: str) -> str:
    """Tag name without its XML namespace: '{http://www.mediawiki.org/...}page' -> 'page'."""
    return tag.rsplit("}", 1)[-1]


BUILTIN_CORPORA = {
    "wiki-sample": BuiltinCorpus(
        package="gensim",
        relpath="test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        read=_read_mediawiki,
    ),
    "lee": BuiltinCorpus(package="gensim", relpath="test/test_data/lee_background.cor", read=_read_lines),
}


def _builtin_path(name: str) -> Path:
    """Locate a built-in corpus file without importing its package (importing gensim costs a second)."""
    corpus = BUILTIN_CORPORA[name]
    spec = importlib.util.find_spec(corpus.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"corpus {name!r} needs the package {corpus.package!r}: pip install it")
    path = Path(spec.submodule_search_locations[0]) / corpus.relpath
    if not path.is_file():
        raise FileNotFoundError(f"corpus {name!r}: {path} is missing from the installed {corpus.package!r}")
    return path


# ---- wiki markup -> prose ------------------------------------------------------------------------

# Elements removed with their content; other tags are dropped and their content kept.
_DROPPED_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|chem|hiero|references|syntaxhighlight|source)\b[^>]*?"
    r"(/>|>.*?</\1\s*>)",
    re.DOTALL | re.IGNORECASE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = r"\[\[\s*(?:file|image|media)\s*:"
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # a [[link]] with no link inside it
_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
# Namespaced links that are not prose: categories and interlanguage links ([[de:...]]).
_NON_PROSE_LINK = re.compile(r"^\s*(category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
# Templates that render prose, kept as text; all other templates are dropped.
_TEXT_TEMPLATE = re.compile(r"\{\{\s*(lang|nowrap|convert)\s*\|([^{}]*)\}\}", re.IGNORECASE)
_TEMPLATE_PIPE = re.compile(r"\|(?![^\[]*\]\])")  # a "|" between template arguments, not inside a [[link|label]]
_CONVERT_RANGES = {"-", "–", "to", "and", "or"}
# Punctuation left at the edges of parentheses by dropped templates: "(; born 1947, )" -> "(born 1947)".
_PAREN_PADDING = re.compile(r"(?<=\()[ ,;:]+|[ ,;:]+(?=\))")
_EMPTY_PARENS = re.compile(r" ?\(\)")
_ONLY_PARENS = re.compile(r"^(\([^()]*\)\s*)+$")  # e.g. "(UK)" left over from a flag template
_SPACE_BEFORE_PUNCT = re.compile(r"[ \t]+([,.;:!?])")
# Sections that hold citations and link lists, not prose.
_SKIPPED_SECTIONS = {
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "further reading",
    "external links", "see also", "works cited",
}


def wiki_to_text(wikitext: str) -> str:
    """Strip MediaWiki markup to plain prose: case, punctuation and paragraphs kept; templates, tables,
    references, files, categories and citation sections dropped; link text kept."""
    text = _COMMENT.sub("", wikitext)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = _TEXT_TEMPLATE.sub(_template_text, text)
    text = _remove_spans(text, r"\{\{", "{{", "}}")  # templates (infoboxes, citations, ...)
    text = _remove_spans(text, r"\{\|", "{|", "|}")  # tables
    text = _remove_spans(text, _FILE_LINK, "[[", "]]")  # images with their captions, which may hold links
    text = _TAG.sub("", text)
    while (simpler := _INNER_LINK.sub(_link_text, text)) != text:  # innermost first: labels may hold links
        text = simpler
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold'''
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other magic words
    text = html.unescape(text).replace("\xa0", " ")
    return _clean_lines(text)


def _remove_spans(text: str, start: str, opener: str, closer: str) -> str:
    """Remove every span from a match of the regex `start` to the `closer` that balances it, counting the
    `opener`s nested inside; an unclosed span runs to the end of the text."""
    tokens = re.compile(f"(?P<start>{start})|{re.escape(opener)}|{re.escape(closer)}", re.IGNORECASE)
    kept, depth, pos = [], 0, 0
    for m in tokens.finditer(text):
        if depth == 0:
            if m.group("start"):
                kept.append(text[pos : m.start()])
                depth = 1
        elif m.group() != closer:
            depth += 1
        elif (depth := depth - 1) == 0:
            pos = m.end()
    if depth == 0:
        kept.append(text[pos:])
    return "".join(kept)


def _template_text(m: re.Match) -> str:
    """{{lang|fr|texte}} -> texte, {{nowrap|text}} -> text, {{convert|330|m|ft}} -> 330 m,
    {{convert|1|to|2|km}} -> 1 to 2 km."""
    args = [arg.strip() for arg in _TEMPLATE_PIPE.split(m.group(2)) if "=" not in arg]
    if m.group(1).lower() != "convert":
        return args[-1] if args else ""
    return " ".join(args[:4] if len(args) >= 4 and args[1] in _CONVERT_RANGES else args[:2])


def _link_text(m: re.Match) -> str:
    """[[target|label]] -> label, [[target]] -> target; category and interlanguage links -> ''."""
    target, _, label = m.group(1).partition("|")
    if _NON_PROSE_LINK.match(target):
        return ""
    return (label.rpartition("|")[2] or target).lstrip(":")


def _clean_lines(text: str) -> str:
    """Headings to plain lines; citation sections and table leftovers dropped; list markers stripped."""
    lines, skip_below = [], None  # heading level of a skipped section: its subsections are skipped too
    for line in text.splitlines():
        line = line.strip()
        if heading := _HEADING.match(line):
            level, title = len(heading.group(1)), heading.group(2)
            if skip_below is not None and level > skip_below:
                continue
            skip_below = level if title.lower() in _SKIPPED_SECTIONS else None
            line = title
        if skip_below is not None or line.startswith(("|", "!", "----")):
            continue
        line = _LIST_MARKER.sub("", line)
        line = _EMPTY_PARENS.sub("", _PAREN_PADDING.sub("", line))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        line = _ONLY_PARENS.sub("", line)
        lines.append(re.sub(r"[ \t]{2,}", " ", line).strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---- the interface -------------------------------------------------------------------------------


def iter_pieces(spec: str = DEFAULT_CORPUS, opts: ReadOptions = ReadOptions()) -> Iterator[Piece]:
    """The documents of a corpus in a fixed order, as pieces `(text, last)` of at most opts.max_chars
    characters (`models.data.readers`), whitespace-only documents left out. Errors in the spec are raised at
    the call, not lazily."""
    if spec in BUILTIN_CORPORA:
        pieces = (p for doc in BUILTIN_CORPORA[spec].read(_builtin_path(spec)) for p in split_text(doc, opts.max_chars))
    else:
        _, files = _user_files(spec)
        pieces = (p for path in files for p in read_file(path, opts))
    return _without_blank_documents(pieces)


def _user_files(spec: str) -> tuple[Path, list[Path]]:
    try:
        return user_files(spec)
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus {spec!r} is neither a built-in corpus {sorted(BUILTIN_CORPORA)} nor an "
                                f"existing path") from None


def _without_blank_documents(pieces: Iterator[Piece]) -> Iterator[Piece]:
    """Drop whitespace-only pieces; a document's end is kept only where some piece of it was."""
    started = False
    for text, last in pieces:
        if text.strip():
            started = True
            yield text, last
        elif last and started:
            yield "", True
        started = started and not last


def iter_documents(spec: str = DEFAULT_CORPUS, opts: ReadOptions = ReadOptions()) -> Iterator[str]:
    """Whole documents (each joined from its pieces in memory: for inspection and small corpora)."""
    pieces = iter_pieces(spec, opts)

    def documents() -> Iterator[str]:
        parts = []
        for text, last in pieces:
            parts.append(text)
            if last:
                yield "".join(parts)
                parts = []

    return documents()


def corpus_fingerprint(spec: str = DEFAULT_CORPUS) -> str:
    """A hash that changes when the corpus content changes: for a built-in corpus its package, version and
    file size; for user files the sorted (relative path, size, mtime_ns) of each file."""
    if spec in BUILTIN_CORPORA:
        corpus = BUILTIN_CORPORA[spec]
        key = [spec, corpus.package, importlib.metadata.version(corpus.package), _builtin_path(spec).stat().st_size]
    else:
        root, files = _user_files(spec)
        key = [(p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    payload = json.dumps([EXTRACTION_VERSION, key]).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
