from pathlib import Path

import pytest

from ingest.parse import parse_file
from ingest.text_formats import split_front_matter
from kb.errors import EmptyDocument, UnsupportedFile


def test_yaml_front_matter_becomes_metadata_not_text():
    meta, body, warnings = split_front_matter("---\ntitle: T\ndate: 2024-01-02\ntags: [a, b]\nauthor: Ann\n---\nBody\n")
    assert meta["title"] == "T" and meta["date"] == "2024-01-02"
    assert meta["tags"] == ["a", "b"] and meta["authors"] == ["Ann"]
    assert body.strip() == "Body" and not warnings


def test_toml_front_matter_with_nested_tables():
    meta, body, _ = split_front_matter('+++\ntitle = "T"\n[extra]\nauthors = ["X"]\n+++\nBody')
    assert meta["title"] == "T" and meta["authors"] == ["X"]
    assert "title" not in body


def test_broken_front_matter_is_a_warning_and_kept_out_of_text():
    meta, body, warnings = split_front_matter("---\ntitle: [unclosed\n---\nBody")
    assert "title" not in meta and body.strip() == "Body" and warnings


def test_markdown_sections_follow_headings_and_ignore_fenced_code(tmp_path):
    f = tmp_path / "a.md"
    f.write_text("# Title\n\nintro\n\n## One\n\ntext one\n\n```sh\n# not a heading\n```\n\n### Deep\n\ndeep text\n\n"
                 "Two\n---\n\nsetext text\n")
    doc = parse_file(f, "markdown")
    assert doc.title == "Title"
    by_text = {s.text.split("\n")[0]: s.headings for s in doc.sections}
    assert by_text["intro"] == []
    assert by_text["text one"] == ["One"]
    assert any("# not a heading" in s.text for s in doc.sections)
    assert by_text["deep text"] == ["One", "Deep"]
    assert by_text["setext text"] == ["Two"]


def test_rst_headings(tmp_path):
    f = tmp_path / "a.rst"
    f.write_text("=====\nGuide\n=====\n\nIntro.\n\nInstall\n-------\n\nRun it.\n")
    doc = parse_file(f, "rst")
    assert doc.title == "Guide"
    assert [s.headings for s in doc.sections] == [[], ["Install"]]


def test_gbk_chinese_text_is_decoded(tmp_path):
    f = tmp_path / "zh.txt"
    text = "这是一个用GBK编码保存的中文文件，kb 应该能够正确地读取它的内容，而不是乱码。" * 3
    f.write_bytes(text.encode("gbk"))
    doc = parse_file(f, "text")
    assert "GBK编码" in doc.sections[0].text


def test_zero_byte_file_is_empty(tmp_path):
    f = tmp_path / "empty.md"
    f.write_bytes(b"")
    with pytest.raises(EmptyDocument):
        parse_file(f, "markdown")


def test_binary_named_md_is_refused(tmp_path):
    f = tmp_path / "photo.md"
    f.write_bytes(bytes(range(256)) * 50)
    with pytest.raises(UnsupportedFile, match="binary"):
        parse_file(f, "markdown")


def test_front_matter_only_is_empty(tmp_path):
    f = tmp_path / "index.md"
    f.write_text("+++\ntitle = \"x\"\n+++\n")
    with pytest.raises(EmptyDocument):
        parse_file(f, "markdown")


def test_html_title_and_headings(tmp_path):
    f = tmp_path / "p.html"
    f.write_text("<html><head><title>Page T</title></head><body><h1>Top</h1><p>First paragraph here.</p>"
                 "<h2>Sub</h2><p>Second paragraph here.</p></body></html>")
    doc = parse_file(f, "html")
    assert doc.title == "Page T"
    texts = " ".join(s.text for s in doc.sections)
    assert "First paragraph" in texts and "Second paragraph" in texts
    assert any("Sub" in s.headings for s in doc.sections)


def test_pdf_without_text_layer_says_so(tmp_path):
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    doc.new_page(200, 200)
    f = tmp_path / "scan.pdf"
    doc.save(str(f))
    with pytest.raises(EmptyDocument, match="no text layer"):
        parse_file(f, "pdf")  # OCR ran and found nothing either
    with pytest.raises(EmptyDocument, match="no text layer"):
        parse_file(f, "pdf", ocr=False)


def test_corrupt_pdf_is_refused(tmp_path):
    f = tmp_path / "bad.pdf"
    f.write_bytes(b"%PDF-1.4\n" + b"garbage" * 100)
    with pytest.raises(UnsupportedFile):
        parse_file(f, "pdf")


def test_docx(tmp_path):
    docx = pytest.importorskip("docx")
    d = docx.Document()
    d.add_heading("Handbook", 1)
    d.add_paragraph("Employees receive twenty days of paid leave.")
    f = tmp_path / "h.docx"
    d.save(f)
    doc = parse_file(f, "docx")
    assert "twenty days" in " ".join(s.text for s in doc.sections)
