"""Build a large corpus of real English text from Debian's documentation packages: a directory of .txt
files that `data.corpus=DIR` reads (models.data.readers), for runs of thousands of steps without repeating.

    python scripts/fetch_corpus.py --out corpora/debian-docs            # 130M characters, 41.6M tokens
    python scripts/fetch_corpus.py --out DIR --sources linux-doc python3-doc --count

Each source is a Debian package fetched with `apt-get download` (run `apt-get update` once first; no
network besides the package archive), unpacked with `dpkg-deb -x`, and its text files extracted:
reStructuredText sources of the Linux kernel's and Python's documentation, Perl's POD, Git's AsciiDoc
manuals, the PostgreSQL manual (HTML, tags stripped, navigation dropped) and GCIDE, the GNU
Collaborative International Dictionary of English (the 1913 Webster and its additions). Markup stays
as it is in the sources. Each package's copyright file is copied beside its text (`copyright.PACKAGE`,
which the corpus reader does not read); `SOURCES` lists the packages and versions. With `--count` the
characters and the tokens of the default tokenizer are counted and printed.
"""
from __future__ import annotations

import argparse
import gzip
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path


def read_text(path: Path) -> str:
    """A text file, gzip-compressed (`.gz`, dictd's `.dz`) or not, as UTF-8 (bad bytes replaced)."""
    opener = gzip.open if path.suffix in (".gz", ".dz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


class _HtmlText(HTMLParser):
    """The text of an HTML page without scripts, styles and navigation blocks; block ends become newlines."""

    SKIP = {"script", "style", "head"}
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[bool] = []  # per open element: inside a skipped element

    def handle_starttag(self, tag, attrs):
        classes = dict(attrs).get("class") or ""
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag not in self.VOID:
            skipped = bool(self.stack and self.stack[-1]) or tag in self.SKIP or bool(re.search(r"\bnav", classes))
            self.stack.append(skipped)

    def handle_endtag(self, tag):
        if tag not in self.VOID and self.stack:
            self.stack.pop()
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not (self.stack and self.stack[-1]):
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    return "".join(parser.parts)


def tidy(text: str) -> str:
    """Trailing spaces removed, runs of blank lines cut to one."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def plain(path: Path) -> Iterator[tuple[str, str]]:
    yield "", read_text(path)


def html(path: Path) -> Iterator[tuple[str, str]]:
    yield "", html_to_text(read_text(path))


def dictionary(path: Path, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, str]]:
    """A dictd database (entries one after another), cut at entry boundaries into documents of about
    `chunk_chars` characters; the "00-database-*" header entries are dropped."""
    text = read_text(path)
    text = text[text.find("\nA\n") + 1:] if "\nA\n" in text else text
    start, part = 0, 0
    while start < len(text):
        end = text.find("\n\n", start + chunk_chars)
        end = len(text) if end < 0 else end
        yield f"-{part:03d}", text[start:end]
        start, part = end, part + 1


@dataclass(frozen=True)
class Source:
    globs: tuple[str, ...]
    """Files of the unpacked package (paths relative to its root)."""
    read: Callable[[Path], Iterator[tuple[str, str]]]
    """Yields (name suffix, text) documents of one file."""


SOURCES: dict[str, Source] = {
    "linux-doc": Source(("usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz",
                         "usr/share/doc/linux-doc-*/Documentation/**/*.txt.gz"), plain),
    "python3-doc": Source(("usr/share/doc/python3*/html/_sources/**/*.rst.txt",), plain),
    "dict-gcide": Source(("usr/share/dictd/gcide.dict.dz",), dictionary),
    "perl-doc": Source(("usr/share/perl/*/pod/*.pod",), plain),
    "git-doc": Source(("usr/share/doc/git-doc/*.txt",), plain),
    "postgresql-doc": Source(("usr/share/doc/postgresql-doc-*/html/*.html",), html),
}
"""Package name → its text. A name that is a meta-package also fetches the documentation packages it
depends on (linux-doc → linux-doc-6.1, python3-doc → python3.11-doc)."""


def run(*cmd: str, cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.stderr.strip()}\n"
                 "Run `apt-get update` once first; the packages come from the Debian archive.")
    return result.stdout


def packages_of(name: str) -> list[str]:
    """`name` and the documentation packages it depends on (a meta-package's versioned package)."""
    deps = re.findall(r"^\s*Depends: (\S+)$", run("apt-cache", "depends", name), flags=re.M)
    return [name] + [d for d in deps if "doc" in d]


def fetch(name: str, debs: Path, root: Path) -> list[str]:
    """Downloads `name`'s packages into `debs` and unpacks them into `root`; returns "package version" lines."""
    versions = []
    for package in packages_of(name):
        run("apt-get", "download", package, cwd=debs)
        deb = next(debs.glob(f"{package}_*.deb"))
        run("dpkg-deb", "-x", str(deb), str(root))
        versions.append(f"{package} {run('dpkg-deb', '-f', str(deb), 'Version').strip()}")
    return versions


def extract(name: str, root: Path, out: Path) -> tuple[int, int]:
    """Writes the documents of source `name` unpacked in `root` under `out`/`name`; returns (files, characters)."""
    source, target = SOURCES[name], out / name
    files = chars = 0
    for pattern in source.globs:
        for path in sorted(root.glob(pattern)):
            rel = str(path.relative_to(root / "usr/share"))
            while (stem := re.sub(r"\.(gz|dz|txt|rst|pod|html)$", "", rel)) != rel:
                rel = stem
            for suffix, text in source.read(path):
                text = tidy(text)
                if not text.strip():
                    continue
                dest = target / f"{rel.replace('/', '__')}{suffix}.txt"
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text, encoding="utf-8")
                files, chars = files + 1, chars + len(text)
    for copyright in sorted(root.glob("usr/share/doc/*/copyright")) if files else ():
        shutil.copyfile(copyright, target / f"copyright.{copyright.parent.name}")
    return files, chars


def count_tokens(out: Path) -> int:
    """Tokens of the corpus under the default tokenizer (models.data.tokenizer), as `pretrain` would make them
    (document by document, in the pieces the corpus readers stream)."""
    from curvtrain.models.data.corpus import iter_pieces
    from curvtrain.models.data.tokenizer import Tokenizer

    tokenizer, total, batch = Tokenizer.load(), 0, []
    for text, _ in iter_pieces(str(out)):
        batch.append(text)
        if len(batch) == 256:
            total += sum(map(len, tokenizer.encode_batch(batch)))
            batch = []
    return total + sum(map(len, tokenizer.encode_batch(batch)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="corpus directory to write (data.corpus=DIR)")
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--count", action="store_true", help="count the tokens of the default tokenizer")
    args = p.parse_args(argv)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        print("error: needs apt-get and dpkg-deb (a Debian or Ubuntu system)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    versions, total_chars = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sources:
            debs, root = Path(tmp) / name / "debs", Path(tmp) / name / "root"
            debs.mkdir(parents=True)
            versions += fetch(name, debs, root)
            shutil.rmtree(args.out / name, ignore_errors=True)  # a rerun replaces the source, never mixes two
            files, chars = extract(name, root, args.out)
            total_chars += chars
            print(f"{name}: {files} files, {chars:,} characters", flush=True)
            shutil.rmtree(Path(tmp) / name)
    (args.out / "SOURCES").write_text("".join(f"{v}\n" for v in versions))
    print(f"total: {total_chars:,} characters in {args.out}")
    if args.count:
        print(f"tokens (default tokenizer): {count_tokens(args.out):,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
