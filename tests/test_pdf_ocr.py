"""PDFs on pdfium, OCR of scans and images (real models from the rapidocr wheel), and the parsing workers."""

import ctypes
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from ingest.pdf import ocr_image, parse_image, parse_pdf
from kb.errors import EmptyDocument, UnsupportedFile

DATA = Path(__file__).parent / "data"
PDFS = SHARED_DATA / "corpora" / "pdf"


def english_image(path: Path, lines: list[str]) -> Path:
    """An image of English text, drawn here with Pillow's own font, so the expected text is known."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=36)
    image = Image.new("RGB", (1100, 80 + 70 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((40, 40 + 70 * i), line, font=font, fill="black")
    image.save(path)
    return path


def test_ocr_reads_english_and_chinese_images(tmp_path):
    english = english_image(tmp_path / "note.png", ["The invoice is due on March 3, 2025.",
                                                    "Contact the finance office for details."])
    doc = parse_image(english)
    text = doc.sections[0].text
    assert "invoice is due on March 3, 2025" in text and "finance office" in text
    assert text.index("invoice") < text.index("finance")  # reading order, top to bottom
    zh = parse_image(DATA / "ocr-zh.png").sections[0].text.replace(" ", "")
    assert "番茄每天需要六到八个小时的阳光" in zh and "付款期限为三十天" in zh
    assert doc.stats["ocr_pages"] == 1


def test_images_without_ocr_or_text_are_reported(tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (400, 300), "white").save(blank)
    with pytest.raises(EmptyDocument, match="no text"):
        parse_image(blank)
    with pytest.raises(UnsupportedFile, match="OCR"):
        parse_image(blank, ocr=False)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(UnsupportedFile, match="not a readable image"):
        parse_image(broken)


def test_a_scanned_image_is_ingested_and_answers(make_kb, tmp_path):
    docs = tmp_path / "scans"
    docs.mkdir()
    english_image(docs / "receipt.png", ["Receipt 4471: the bicycle repair cost 85 euros."])
    (docs / "contract.png").write_bytes((DATA / "ocr-zh.png").read_bytes())
    kb = make_kb()
    report = kb.ingest([docs])
    assert sorted(Path(p).name for p in report.added) == ["contract.png", "receipt.png"], report.failed
    assert report.timings["ocr_pages"] == 2
    assert kb.search("bicycle repair cost", k=1)[0].path.endswith("receipt.png")
    assert kb.search("付款期限", k=1, mode="lexical")[0].path.endswith("contract.png")


def test_a_file_that_takes_too_long_is_reported_and_the_ingest_goes_on(make_kb, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    english_image(docs / "slow.png", ["Loading the OCR models alone takes longer than the limit."])
    (docs / "fine.md").write_text("# Fine\n\nA note that parses at once.\n")
    started = time.monotonic()
    report = make_kb(parse_timeout=1, parse_workers=1).ingest([docs])
    assert time.monotonic() - started < 60
    assert [Path(p).name for p in report.added] == ["fine.md"]
    assert "parsing stopped after 1 s" in report.failed[0].reason


@pytest.mark.data
def test_every_shared_pdf_is_read_by_the_main_path(tmp_path):
    """pdfium reads each shared PDF (no fallback exists to hide a broken path); the scan is read by OCR."""
    if not PDFS.is_dir():
        pytest.skip("needs ../shared/data")
    expected_failures = {"password.pdf": "encrypted"}
    pages_seen = []
    for pdf in sorted(PDFS.glob("*.pdf")):
        if pdf.name in expected_failures:
            with pytest.raises(UnsupportedFile, match=expected_failures[pdf.name]):
                parse_pdf(pdf)
            continue
        doc = parse_pdf(pdf, on_page=lambda done, total, ocr: pages_seen.append((pdf.name, done, total)))
        text = "\n".join(s.text for s in doc.sections)
        assert len(text) > 100, pdf.name
        assert all(s.page for s in doc.sections), pdf.name
        if pdf.name == "single_table.pdf":
            assert doc.stats["ocr_pages"] == 1 and "Base 128" in text and "64,058" in text
        elif pdf.name == "korean-text-with-tables.pdf":
            assert sum(1 for c in text if "\uac00" <= c <= "\ud7af") > 100
        elif pdf.name == "layout-parser-paper-fast.pdf":  # characters with no size (body "1", abstract 9)
            headings = {h for s in doc.sections for h in s.headings}
            assert "LayoutParser: A Unified Toolkit for Deep Learning Based Document Image Analysis" in headings
            assert not any("extensibility" in h or "arXiv" in h for h in headings), headings
        elif pdf.name == "java-dev-manual-zh.pdf":
            assert "编程规约" in text and doc.stats["ocr_pages"] <= max(1, doc.stats["pages"] // 20)
            assert any(s.headings for s in doc.sections)  # headings found from font size
        else:  # a page with next to no text (a full-page figure) may go to OCR; a text PDF is not OCR'd
            assert doc.stats["ocr_pages"] <= max(1, doc.stats["pages"] // 50), pdf.name
    assert ("DA-619p.pdf", 619, 619) in pages_seen
    with pytest.raises(EmptyDocument, match="no text layer"):
        parse_pdf(PDFS / "single_table.pdf", ocr=False)


def test_running_headers_and_page_numbers_are_dropped_and_hyphens_rejoined(tmp_path):
    """A PDF made here: three pages with a running header, a footer with the page number, and a heading."""
    pdf = tmp_path / "report.pdf"
    _three_page_pdf(pdf)
    doc = parse_pdf(pdf)
    text = "\n".join(s.text for s in doc.sections)
    assert "ACME quarterly report" not in text and "Page 2 of 3" not in text
    assert "international" in text and "inter-" not in text
    assert any("Results" in h for s in doc.sections for h in s.headings)
    assert [s.page for s in doc.sections][0] == 1


def test_headings_come_from_the_size_text_is_drawn_at(tmp_path):
    """Fonts set at size 1 and scaled by the text matrix (common in generated PDFs): the drawn size decides. A
    title over two lines is one heading; a sideways margin stamp, a large pull quote in lower case and a
    figure alone are not headings."""
    pdf = tmp_path / "scaled.pdf"
    _scaled_pdf(pdf)
    doc = parse_pdf(pdf)
    headings = [s.headings for s in doc.sections]
    assert ["Annual Report of the Harbour Board", "Dredging"] in headings, headings
    flat = {h for hs in headings for h in hs}
    assert not flat & {"arXiv:2101.00001v1 [cs.CL]", "and a greener harbour for all", "2,32,822"}, flat
    text = "\n".join(s.text for s in doc.sections)
    assert "The channel was dredged to 14 metres" in text and "and a greener harbour for all" in text


def _scaled_pdf(path: Path) -> None:
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    doc = pdfium.PdfDocument.new()
    page = doc.new_page(612, 792)
    lines = [("Annual Report of the", (24, 0, 0, 24, 72, 720)), ("Harbour Board", (24, 0, 0, 24, 72, 692)),
             ("arXiv:2101.00001v1 [cs.CL]", (0, 20, -20, 0, 30, 300)),
             ("Dredging", (16, 0, 0, 16, 72, 640)),
             ("The channel was dredged to 14 metres this year,", (11, 0, 0, 11, 72, 610)),
             ("which lets larger ships berth at the quay.", (11, 0, 0, 11, 72, 596)),
             ("and a greener harbour for all", (20, 0, 0, 20, 72, 560)),
             ("2,32,822", (20, 0, 0, 20, 72, 530)),
             ("Tonnage handled rose for the third year running.", (11, 0, 0, 11, 72, 500))]
    buffers = []
    for text, matrix in lines:
        obj = raw.FPDFPageObj_NewTextObj(doc.raw, b"Helvetica", 1)
        buffers.append(_wide(text))
        raw.FPDFText_SetText(obj, ctypes.cast(buffers[-1], ctypes.POINTER(ctypes.c_ushort)))
        raw.FPDFPageObj_Transform(obj, *matrix)
        raw.FPDFPage_InsertObject(page.raw, obj)
    raw.FPDFPage_GenerateContent(page.raw)
    doc.save(str(path))


def _three_page_pdf(path: Path) -> None:
    """Text-layer PDF pages written with pdfium: a header and footer on each, a big heading, a hyphenated word."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    doc = pdfium.PdfDocument.new()
    for number in range(1, 4):
        page = doc.new_page(612, 792)
        lines = [("ACME quarterly report", 10, 750), ("Results" if number == 2 else f"Section {number}", 22, 700),
                 (f"Sales grew {number * 3} percent in the inter-", 11, 660),
                 ("national markets this quarter.", 11, 645),
                 (f"Page {number} of 3", 10, 40)]
        for text, size, y in lines:
            obj = raw.FPDFPageObj_NewTextObj(doc.raw, b"Helvetica", size)
            buffer = _wide(text)
            raw.FPDFText_SetText(obj, ctypes.cast(buffer, ctypes.POINTER(ctypes.c_ushort)))
            raw.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, y)
            raw.FPDFPage_InsertObject(page.raw, obj)
        raw.FPDFPage_GenerateContent(page.raw)
    doc.save(str(path))


def _wide(text: str):
    """The text as a NUL-terminated UTF-16LE buffer (kept alive by the caller while pdfium reads it)."""
    data = (text + "\0").encode("utf-16-le")
    return ctypes.create_string_buffer(data, len(data))
