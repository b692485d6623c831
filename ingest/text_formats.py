"""Parsers for the plain-text formats (markdown, reStructuredText, text) and their front matter.

These formats carry their structure in plain characters, so kb reads it directly: it is exact (headings
inside fenced code are not headings) and takes milliseconds a file, where a general partitioner takes
a tenth of a second or more per blog post and would dominate an ingest.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from kb.errors import EmptyDocument, UnsupportedFile
from kb.types import ParsedDocument, Section

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")


def read_text(path: Path) -> str:
    """Decode a text file, whatever its encoding; refuse empty and binary files with a reason."""
    data = path.read_bytes()
    if not data.strip():
        raise EmptyDocument("empty file" if not data else "file holds only whitespace")
    text = _decode(data)
    if text is None or _looks_binary(text):
        raise UnsupportedFile(
            "binary content, not text (is the file extension right?)",
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(data: bytes) -> str | None:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data[:200_000]).best()
    if best is None:
        return None
    encoding = best.encoding
    if encoding in {"gb2312", "gbk"}:
        encoding = "gb18030"  # a superset: characters outside GB2312 still decode
    return data.decode(encoding, errors="replace")


def _looks_binary(text: str) -> bool:
    sample = text[:8192]
    controls = sum(1 for c in sample if ord(c) < 32 and c not in "\n\r\t\f\v")
    return controls > len(sample) * 0.01 or sample.count("\ufffd") > len(sample) * 0.05


# Front matter is a few lines of metadata. A larger block, or one whose YAML aliases expand into a huge
# structure (an "alias bomb": nine nested levels of `&a [*a, *a, ...]` expand to billions of items when
# serialized), makes the file fail alone with a reason instead of exhausting memory.
MAX_FRONT_MATTER_CHARS = 64 * 1024
MAX_FRONT_MATTER_ITEMS = 10_000


def split_front_matter(text: str) -> tuple[dict, str, list[str]]:
    """(metadata, body, warnings) for YAML (---) or TOML (+++) front matter at the top of `text`.

    Raises UnsupportedFile for front matter too large to be metadata."""
    warnings: list[str] = []
    for fence, loader in (("---", _load_yaml), ("+++", tomllib.loads)):
        if not text.startswith(fence + "\n"):
            continue
        end = re.search(rf"^(?:{re.escape(fence)}|\.\.\.)[ \t]*$", text[len(fence) + 1 :], re.M)
        if end is None:
            return {}, text, warnings
        raw = text[len(fence) + 1 : len(fence) + 1 + end.start()]
        body = text[len(fence) + 1 + end.end() :]
        if len(raw) > MAX_FRONT_MATTER_CHARS:
            raise UnsupportedFile(f"its front matter is {len(raw) // 1024} KB, too large to be metadata",
                                  hint=f"keep front matter under {MAX_FRONT_MATTER_CHARS // 1024} KB")
        try:
            meta = loader(raw) or {}
        except Exception as e:
            warnings.append(f"front matter could not be read ({type(e).__name__}); kept out of the text")
            meta = {}
        items = _expanded_items(meta)
        if items > MAX_FRONT_MATTER_ITEMS:
            raise UnsupportedFile(
                f"its front matter expands to {items:,} values (YAML aliases nested into a bomb?)",
                hint="front matter should be a few keys of metadata; remove the repeated aliases")
        if not isinstance(meta, dict):
            meta = {}
        return normalize_metadata(meta), body, warnings
    return {}, text, warnings


def _load_yaml(raw: str):
    return yaml.safe_load(raw)


def _expanded_items(value, memo: dict | None = None) -> int:
    """How many values `value` holds once every shared (aliased) part is written out in full; computed
    on the shared structure, so it stays fast however large the answer."""
    memo = {} if memo is None else memo
    key = id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, dict):
        memo[key] = 0  # a cycle counts once
        total = 1 + sum(_expanded_items(k, memo) + _expanded_items(v, memo) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        memo[key] = 0
        total = 1 + sum(_expanded_items(v, memo) for v in value)
    else:
        return 1
    memo[key] = total
    return total


def normalize_metadata(meta: dict) -> dict:
    """Keep front matter as given, plus the well-known keys kb filters on: title, date, tags, authors."""
    out = {str(k): v for k, v in meta.items()}
    extra = out.get("extra") if isinstance(out.get("extra"), dict) else {}
    taxonomies = out.get("taxonomies") if isinstance(out.get("taxonomies"), dict) else {}
    tags = out.get("tags") or out.get("categories") or taxonomies.get("tags") or extra.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in re.split(r"[,;]", tags) if t.strip()]
    out["tags"] = [str(t) for t in tags] if isinstance(tags, (list, tuple)) else []
    authors = out.get("authors") or out.get("author") or extra.get("authors") or extra.get("author") or []
    if isinstance(authors, str):
        authors = [authors]
    out["authors"] = [str(a) for a in authors] if isinstance(authors, (list, tuple)) else []
    if out.get("date") is not None:
        out["date"] = str(out["date"])
    return out


class _Outline:
    """Sections of a document read line by line: text lines gather under the headings open above them."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.stack: list[tuple[int, str]] = []  # (level, title) of the open headings, outermost first
        self.lines: list[str] = []  # the text since the last heading

    def flush(self) -> None:
        content = "\n".join(self.lines).strip()
        if content:
            self.sections.append(Section(text=content, headings=[h for _, h in self.stack]))
        self.lines.clear()

    def open_heading(self, level: int, title: str) -> None:
        self.flush()
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, title))


def parse_markdown(path: Path) -> ParsedDocument:
    text = read_text(path)
    meta, body, warnings = split_front_matter(text)
    outline = _Outline()
    lines = outline.lines
    first_h1: str | None = None
    fence: str | None = None

    def open_heading(level: int, title: str):
        nonlocal first_h1
        outline.open_heading(level, title)
        if level == 1 and first_h1 is None:
            first_h1 = title

    for line in body.split("\n"):
        fence_match = _FENCE.match(line)
        if fence is not None:
            lines.append(line)
            if fence_match and fence_match.group(1)[0] == fence[0] and len(fence_match.group(1)) >= len(fence):
                fence = None
            continue
        if fence_match:
            fence = fence_match.group(1)
            lines.append(line)
            continue
        atx = _ATX.match(line)
        if atx:
            open_heading(len(atx.group(1)), (atx.group(2) or "").strip())
            continue
        setext = _SETEXT.match(line)
        if setext and lines and lines[-1].strip() and not _is_block_start(lines[-1]):
            title = lines.pop().strip()
            open_heading(1 if setext.group(1)[0] == "=" else 2, title)
            continue
        lines.append(line)
    outline.flush()
    title = str(meta.get("title") or first_h1 or path.stem)
    _drop_title_heading(outline.sections, title)
    return _document(path, "markdown", title, outline.sections, meta, warnings)


def _is_block_start(line: str) -> bool:
    return bool(re.match(r"^\s*([-*+]\s|\d+[.)]\s|>|\|)", line))


def _drop_title_heading(sections: list[Section], title: str) -> None:
    """A top heading equal to the document title adds nothing to each chunk's heading path."""
    for s in sections:
        if s.headings and s.headings[0] == title:
            s.headings = s.headings[1:]


def parse_rst(path: Path) -> ParsedDocument:
    text = read_text(path)
    lines = text.split("\n")
    styles: list[tuple[str, bool]] = []
    outline = _Outline()
    first_title: str | None = None
    i = 0

    while i < len(lines):
        line = lines[i]
        over = _RST_ADORNMENT.match(line)
        # overline + title + underline
        if over and i + 2 < len(lines) and lines[i + 1].strip() and _RST_ADORNMENT.match(lines[i + 2]) \
                and lines[i + 2].strip()[0] == line.strip()[0]:
            title, style, i = lines[i + 1].strip(), (line.strip()[0], True), i + 3
        elif line.strip() and i + 1 < len(lines) and _RST_ADORNMENT.match(lines[i + 1]) \
                and len(lines[i + 1].rstrip()) >= len(line.rstrip()) and not _RST_ADORNMENT.match(line):
            title, style, i = line.strip(), (lines[i + 1].strip()[0], False), i + 2
        else:
            outline.lines.append(line)
            i += 1
            continue
        if style not in styles:
            styles.append(style)
        outline.open_heading(styles.index(style) + 1, title)
        first_title = first_title or title
    outline.flush()
    title = first_title or path.stem
    _drop_title_heading(outline.sections, title)
    return _document(path, "rst", title, outline.sections, {}, [])


# Plain text has no markup, but laws, regulations, manuals and novels saved as .txt mark their parts in words:
# a line of its own that is "第一章 总则", "第二节 年假", "第三编 ...", "Chapter 4: Refunds", "PART II", "Section 2.1
# Scope". Those lines are headings (a chapter's articles, "第十条 ...", are its text). The level: 编/篇/部分/卷 and
# Part above 章 and Chapter, above 节 and Section.
_CN_NUMERAL = "[一二三四五六七八九十百千零〇两0-9０-９]+"
_TEXT_HEADING = re.compile(
    rf"^\s*(?:第{_CN_NUMERAL}(?P<zh>[编篇卷]|部分|章|节)[ \t\u3000:：.、—–-]*[^。！？；，,.!?;:：]{{0,24}}"
    r"|(?P<en>Part|PART|Chapter|CHAPTER|Section|SECTION)\s+(?:[0-9]+(?:\.[0-9]+)*|[IVXLC]+|[ivxlc]+)\b[.:]?"
    r"(?:[ \t:.—–-]+[A-Z0-9\"“‘'(][^.!?;,]{0,60}[^.!?;,\s])?)\s*$")
_TEXT_HEADING_LEVEL = {"编": 1, "篇": 1, "卷": 1, "部分": 1, "part": 1, "章": 2, "chapter": 2, "节": 3, "section": 3}


def parse_text(path: Path) -> ParsedDocument:
    text = read_text(path)
    outline = _Outline()
    for line in text.split("\n"):
        heading = _TEXT_HEADING.match(line) if len(line) <= 80 else None
        if heading is None:
            outline.lines.append(line)
        else:
            level = _TEXT_HEADING_LEVEL[(heading.group("zh") or heading.group("en")).lower()]
            outline.open_heading(level, " ".join(line.split()))
    outline.flush()
    sections = outline.sections
    if not sections and outline.stack:  # headings alone: keep them as the text
        sections = [Section(text=text.strip())]
    return _document(path, "text", path.stem, sections, {}, [])


def _document(path, ftype, title, sections, meta, warnings) -> ParsedDocument:
    if not any(s.text.strip() for s in sections):
        raise EmptyDocument("no text in the file (only front matter or headings)")
    return ParsedDocument(path=str(path), file_type=ftype, title=title, sections=sections,
                          metadata=meta, warnings=warnings)
