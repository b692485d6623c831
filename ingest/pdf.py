"""PDFs on pdfium's text layer, and OCR for pages that have none.

Chosen by measurement over unstructured's fast strategy (docs/pdf.md): pdfium reads every shared PDF, many
times faster, with as much of the text. For each page: the text in pdfium's reading order; headings found
from the size text is drawn at (a short line set clearly larger than the page body's text); words broken across lines with a
hyphen rejoined; lines repeated at the top or bottom of most pages (running headers, footers, page numbers)
dropped. A page with no text layer (a scan) is rendered, one page at a time, and read by OCR (rapidocr's
Chinese and English PP-OCR models, on onnxruntime); a page OCR cannot read either is reported.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from pathlib import Path

from kb.errors import EmptyDocument, UnsupportedFile
from kb.types import ParsedDocument, Section

HEADING_RATIO = 1.2  # a heading's font is at least this much larger than the page body's
MAX_HEADING_CHARS = 120
MIN_TEXT_CHARS = 20  # a page with less text than this is treated as having no text layer
OCR_SCALE = 2.0  # rendering scale for OCR (144 dpi): small print stays readable, a page stays a few MB
_HYPHENATED = re.compile(r"(\w)-\n(\w)")
_DIGITS = re.compile(r"\d+")


def parse_pdf(path: Path, *, ocr: bool = True, on_page=None) -> ParsedDocument:
    """`on_page(done, total, ocr_pages)` is called after each page (progress for long files)."""
    import pypdfium2 as pdfium

    if path.stat().st_size == 0:
        raise EmptyDocument("empty file")
    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        if "password" in str(e).lower() or "security" in str(e).lower():
            raise UnsupportedFile("encrypted PDF: it needs a password",
                                  hint="decrypt it first (for example `qpdf --password=PW --decrypt in.pdf out.pdf`)") from e
        raise UnsupportedFile(f"corrupt or unreadable PDF ({e})") from e
    warnings: list[str] = []
    try:
        pages = []
        ocr_pages = unreadable = 0
        ocr_s = 0.0
        total = len(doc)
        for index in range(total):
            page = doc[index]
            try:
                lines = _page_lines(page)
                if sum(len(text) for text, _ in lines) < MIN_TEXT_CHARS and ocr:
                    started = time.perf_counter()
                    lines = [(text, 0.0) for text in ocr_page(page)]
                    ocr_s += time.perf_counter() - started
                    ocr_pages += 1
                    if not lines:
                        unreadable += 1
            finally:
                page.close()
            pages.append(lines)
            if on_page:
                on_page(index + 1, total, ocr_pages)
        title = _title(doc) or path.stem
    finally:
        doc.close()
    sections = _sections(pages)
    if ocr_pages:
        warnings.append(f"{ocr_pages} page(s) without a text layer read by OCR"
                        + (f"; {unreadable} of them had no readable text" if unreadable else ""))
    if not sections:
        if not ocr:
            raise EmptyDocument("the PDF has no text layer (scanned pages?)",
                                hint="turn OCR on (it is on unless --no-ocr or ocr = false)")
        raise EmptyDocument("no readable text: the PDF has no text layer and OCR found none",
                            hint="check the scan's quality, or that the pages hold text at all")
    return ParsedDocument(path=str(path), file_type="pdf", title=title, sections=sections, warnings=warnings,
                          stats={"pages": total, "ocr_pages": ocr_pages, "ocr_s": ocr_s})


def _page_lines(page) -> list[tuple[str, float]]:
    """(line, the size its characters are drawn at; 0 where pdfium cannot tell) in pdfium's reading order."""
    import pypdfium2.raw as raw

    textpage = page.get_textpage()
    try:
        # pdfium joins a word hyphenated across lines itself and marks the join with U+FFFE (removed from each
        # line, not from the page text, whose positions are the characters' indices)
        text = textpage.get_text_range()
        count = textpage.count_chars()
        lines = []
        for m in re.finditer(r"[^\r\n]+", text):
            stripped = m.group().replace("\ufffe", "").strip()
            if stripped:
                lines.append((stripped, _line_size(raw, textpage, m.start(), min(m.end(), count), text)))
        return lines
    finally:
        textpage.close()


def _line_size(raw, textpage, start: int, end: int, text: str) -> float:
    """The median drawn size of up to 5 characters spread over the line: the first alone may be a drop cap,
    a bullet or a footnote mark."""
    visible = [i for i in range(start, end) if not text[i].isspace()]
    if not visible:
        return 0.0
    step = max(1, len(visible) // 5)
    sizes = [size for i in visible[::step][:5] if (size := _drawn_size(raw, textpage, i)) > 0]
    return statistics.median(sizes) if sizes else 0.0


def _drawn_size(raw, textpage, i: int) -> float:
    """The size a character is drawn at: its font size times the scale of its text matrix (a PDF may set the
    font at size 1 and scale it by the matrix), or 0 (unknown) where pdfium gives the character no box (some
    Type 3 and broken fonts report size 1 then: taken at face value, a paper's body text measured 1 and every
    line of its abstract, at 9, became a heading)."""
    import ctypes

    box = raw.FS_RECTF()
    if not raw.FPDFText_GetLooseCharBox(textpage, i, ctypes.byref(box)) or box.top - box.bottom <= 0:
        return 0.0
    size = float(raw.FPDFText_GetFontSize(textpage, i))
    matrix = raw.FS_MATRIX()
    if raw.FPDFText_GetMatrix(textpage, i, ctypes.byref(matrix)):
        if abs(matrix.b) > abs(matrix.a):  # turned sideways: a margin stamp ("arXiv:2103.15348v2 [cs.CV]")
            return 0.0
        scale = abs(matrix.a * matrix.d - matrix.b * matrix.c) ** 0.5
        if scale > 0:
            size *= scale
    return size


def _title(doc) -> str | None:
    try:
        title = (doc.get_metadata_dict().get("Title") or "").strip()
    except Exception:  # metadata of hostile files can be anything; the file name is the fallback
        return None
    return title if title and title.lower() not in {"untitled", "microsoft word"} else None


def _repeated(pages: list[list[tuple[str, float]]]) -> set[str]:
    """Lines (digits ignored) at the top or bottom of most pages: running headers, footers, page numbers."""
    if len(pages) < 3:
        return set()
    counts: Counter = Counter()
    for lines in pages:
        counts.update({_DIGITS.sub("#", text) for text, _ in _edges(lines)})
    return {key for key, n in counts.items() if n >= max(3, len(pages) // 2)}


def _edge_indices(count: int) -> set[int]:
    """Where running headers and footers sit: two lines at each end of a page, one on a short page."""
    n = 2 if count >= 8 else 1
    return set(range(min(n, count))) | set(range(max(count - n, 0), count))


def _edges(lines: list) -> list:
    return [lines[i] for i in sorted(_edge_indices(len(lines)))]


def _sections(pages: list[list[tuple[str, float]]]) -> list[Section]:
    """Sections per page, split at headings (recognized by font size), headers and footers left out."""
    repeated = _repeated(pages)
    sizes = [size for lines in pages for text, size in lines if size > 0 for _ in range(len(text))]
    body = statistics.median(sizes) if sizes else 0.0
    sections: list[Section] = []
    stack: list[tuple[float, str]] = []
    unused: list[str] = []  # headings no text has followed yet
    for number, lines in enumerate(pages, 1):
        edge = _edge_indices(len(lines))
        kept = [(t, s) for i, (t, s) in enumerate(lines)
                if not (i in edge and _DIGITS.sub("#", t) in repeated) and not t.isdigit()]
        buf: list[str] = []

        def flush():
            text = _HYPHENATED.sub(r"\1\2", "\n".join(buf)).strip()
            if text:
                sections.append(Section(text=text, headings=[h for _, h in stack], page=number))
                unused.clear()
            buf.clear()

        after_heading = 0.0  # the size of the heading line just read, 0 after text
        for i, (text, size) in enumerate(kept):
            large = body and size >= body * HEADING_RATIO
            # the first line of a heading set over two may end mid-phrase ("Annual Report of the")
            follows = i + 1 < len(kept) and abs(kept[i + 1][1] - size) < 0.5 and _could_be_heading(kept[i + 1][0])
            if large and (_could_be_heading(text) or follows and _could_be_heading(text, run_on=True)):
                if after_heading and abs(size - after_heading) < 0.5 and stack and unused \
                        and len(stack[-1][1]) + len(text) < MAX_HEADING_CHARS:
                    # a title set over two lines ("LayoutParser: A Unified Toolkit for Deep" / "Learning Based
                    # Document Image Analysis") is one heading
                    stack[-1] = (stack[-1][0], f"{stack[-1][1]} {text}")
                    unused[-1] = stack[-1][1]
                    continue
                flush()
                while stack and stack[-1][0] <= size:
                    stack.pop()
                stack.append((size, text))
                unused.append(text)
                after_heading = size
                continue
            buf.append(text)
            after_heading = 0.0
        flush()
    if unused:  # large lines at the very end (a source line, a closing title): text, not headings of nothing
        sections.append(Section(text="\n".join(unused), headings=[h for _, h in stack[:-len(unused)]],
                                page=len(pages)))
    return sections


# a line set large that ends like this, or opens in lower case, is a phrase of a pull quote or a wrapped line
# ("even greater societal value and"), not a heading
_RUN_ON = re.compile(r"(?:[.,;]|\b(?:and|or|of|the|a|an|to|in|on|for|with|by|from|as|at|that|is|are)\s*)$", re.I)


def _could_be_heading(text: str, *, run_on: bool = False) -> bool:
    if len(text) > MAX_HEADING_CHARS or not run_on and _RUN_ON.search(text) or text.endswith((".", ",", ";")):
        return False
    letters = [ch for ch in text if ch.isalpha()]
    return len(letters) >= 2 and not letters[0].islower()  # not a figure alone ("2,32,822")


_OCR = None


def _ocr_engine():
    """rapidocr with the models inside its wheel; loaded once per process, quietly."""
    global _OCR
    if _OCR is None:
        import logging

        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise UnsupportedFile("OCR needs the rapidocr package", hint="pip install rapidocr") from e
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
        _OCR = RapidOCR(params={"Global.log_level": "warning"}) if _accepts_params(RapidOCR) else RapidOCR()
        logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    return _OCR


def _accepts_params(cls) -> bool:
    import inspect

    return "params" in inspect.signature(cls.__init__).parameters


def ocr_image(image) -> list[str]:
    """Text lines of an image (a numpy array), in reading order: top to bottom, left to right."""
    result = _ocr_engine()(image)
    texts = getattr(result, "txts", None) or ()
    boxes = getattr(result, "boxes", None)
    if not texts:
        return []
    items = []
    for text, box in zip(texts, boxes if boxes is not None else [None] * len(texts)):
        if box is None:
            items.append((0.0, 0.0, 1.0, text))
            continue
        ys, xs = [p[1] for p in box], [p[0] for p in box]
        items.append((min(ys), min(xs), max(ys) - min(ys), text))
    items.sort()
    lines: list[list[tuple[float, str]]] = []
    last_y = last_h = None
    for y, x, h, text in items:  # boxes whose tops are within half a line's height are one line
        if last_y is not None and y - last_y <= max(last_h, h) * 0.5:
            lines[-1].append((x, text))
        else:
            lines.append([(x, text)])
            last_y, last_h = y, h
    return [" ".join(t for _, t in sorted(line)) for line in lines]


MAX_IMAGE_PIXELS = 80_000_000  # larger images are scaled down before OCR (and a decompression bomb is refused)


def parse_image(path: Path, *, ocr: bool = True) -> ParsedDocument:
    """An image file read by OCR; each frame of a multi-page TIFF is a page."""
    if not ocr:
        raise UnsupportedFile("an image can only be read with OCR, which is off", hint="turn OCR on (ocr = true)")
    import numpy as np
    from PIL import Image, ImageSequence, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS * 4
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UnsupportedFile(f"not a readable image ({type(e).__name__}: {e})") from e
    sections = []
    started = time.perf_counter()
    with image:
        frames = list(ImageSequence.Iterator(image))
        for number, frame in enumerate(frames, 1):
            frame = frame.convert("RGB")
            if frame.width * frame.height > MAX_IMAGE_PIXELS:
                scale = (MAX_IMAGE_PIXELS / (frame.width * frame.height)) ** 0.5
                frame = frame.resize((int(frame.width * scale), int(frame.height * scale)))
            lines = ocr_image(np.asarray(frame)[:, :, ::-1])  # RGB to the BGR order OpenCV models expect
            if lines:
                sections.append(Section(text="\n".join(lines), page=number if len(frames) > 1 else None))
    if not sections:
        raise EmptyDocument("OCR found no text in the image", hint="check that the image shows text and is sharp")
    return ParsedDocument(path=str(path), file_type="image", title=path.stem, sections=sections,
                          warnings=[f"read by OCR ({len(frames)} page(s))"] if len(frames) > 1 else [],
                          stats={"pages": len(frames), "ocr_pages": len(frames), "ocr_s": time.perf_counter() - started})


def ocr_page(page) -> list[str]:
    bitmap = page.render(scale=OCR_SCALE)
    try:
        return ocr_image(bitmap.to_numpy())
    finally:
        bitmap.close()


__all__ = ["parse_pdf", "parse_image", "ocr_image", "ocr_page"]
