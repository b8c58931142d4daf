"""scripts/fetch_corpus.py's text extraction, on small inputs made here (the fetch itself needs the Debian
archive: it is run by hand, README "A large corpus")."""
import gzip

from curvtrain.models.data.corpus import iter_pieces
from scripts.fetch_corpus import SOURCES, dictionary, extract, html_to_text, read_text, tidy


def test_html_text_drops_scripts_styles_and_navigation():
    page = ("<html><head><title>T</title><style>p {}</style></head><body>"
            "<div class=\"navheader\"><a href=x>Prev</a> Next</div>"
            "<h1>Joins</h1><p>Queries can access <b>multiple</b> tables&nbsp;at once.</p><script>x()</script>"
            "<pre>SELECT 1;</pre><div class=\"navfooter\">Home</div></body></html>")
    assert tidy(html_to_text(page)) == "Joins\n\nQueries can access multiple tables\xa0at once.\n\nSELECT 1;\n"


def test_dictionary_is_cut_at_entry_boundaries_without_its_header(tmp_path):
    entries = "".join(f"Word{i} \\Word{i}\\, n.\n   Definition number {i}.\n   [1913 Webster]\n\n" for i in range(200))
    path = tmp_path / "gcide.dict.dz"
    with gzip.open(path, "wt") as f:
        f.write("00-database-info\nheader text\n\nA\n" + entries)
    parts = list(dictionary(path, chunk_chars=1000))
    assert len(parts) > 3 and all(text.lstrip().startswith("Word") for _, text in parts[1:])
    assert "header text" not in "".join(t for _, t in parts)
    assert "".join(t for _, t in parts).count("Definition number") == 200


def test_extract_writes_a_corpus_the_reader_reads(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    rst = root / "usr/share/doc/linux-doc-6.1/Documentation/PCI/pci.rst.gz"
    rst.parent.mkdir(parents=True)
    with gzip.open(rst, "wt") as f:
        f.write("How To Write Linux PCI Drivers\n==============================\n\n\n\nText.   \n")
    (root / "usr/share/doc/linux-doc-6.1/copyright").write_text("GPL-2")
    files, chars = extract("linux-doc", root, out)
    written = out / "linux-doc" / "doc__linux-doc-6.1__Documentation__PCI__pci.txt"
    assert files == 1 and read_text(written) == "How To Write Linux PCI Drivers\n==============================\n\nText.\n"
    assert chars == len(read_text(written)) and (out / "linux-doc" / "copyright.linux-doc-6.1").read_text() == "GPL-2"
    assert list(iter_pieces(str(out))) == [(read_text(written), True)]  # one document; copyright files are not documents
    assert set(SOURCES) >= {"linux-doc", "python3-doc", "dict-gcide"}
