"""Turn one file into a ParsedDocument, choosing the parser by file type."""

from __future__ import annotations

from pathlib import Path

from ingest.text_formats import parse_markdown, parse_rst, parse_text
from kb.errors import UnsupportedFile
from kb.types import ParsedDocument


def parse_file(path: str | Path, file_type: str, *, ocr: bool = True, on_page=None) -> ParsedDocument:
    """Parse `path`; raises UnsupportedFile (or EmptyDocument) with a reason a person can act on.

    `ocr`: read scanned PDF pages and image files with OCR; `on_page(done, total, ocr_pages)`: progress
    through a long PDF."""
    path = Path(path)
    if file_type == "pdf":
        from ingest.pdf import parse_pdf

        parser = {"pdf": lambda p: parse_pdf(p, ocr=ocr, on_page=on_page)}
    elif file_type == "image":
        from ingest.pdf import parse_image

        parser = {"image": lambda p: parse_image(p, ocr=ocr)}
    elif file_type in ("html", "docx"):
        from ingest import rich_formats

        parser = {"html": rich_formats.parse_html, "docx": rich_formats.parse_docx}
    else:
        parser = {"markdown": parse_markdown, "rst": parse_rst, "text": parse_text}
    if file_type not in parser:
        raise UnsupportedFile(f"unsupported file type {file_type!r}")
    try:
        return parser[file_type](path)
    except PermissionError as e:
        raise UnsupportedFile("permission denied: kb cannot read this file", hint="check the file's permissions") from e
    except IsADirectoryError as e:
        raise UnsupportedFile("is a directory") from e
    except OSError as e:
        raise UnsupportedFile(f"cannot read the file: {e.strerror or e}") from e
