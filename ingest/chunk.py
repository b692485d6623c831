"""Cut parsed documents into passages that fit the embedding model, counted with the model's own tokenizer.

A section (the text under one heading, or one PDF page) is cut at the largest natural boundary that keeps
a passage within the token limit: paragraphs, then sentences (Western and CJK punctuation), then lines,
and only as a last resort at token boundaries. Neighbouring passages of one section share a small
overlap. Each passage is embedded with its document title and heading path in front, and that prefix is
counted too, so no passage is ever truncated by the model.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

from kb.embedder import Tokenizer
from kb.text import is_unspaced
from kb.types import Chunk, ParsedDocument

# Boundaries, from the largest to the smallest. Each pattern matches the gap *after* which a cut may fall.
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[。！？；…])[”’」』）)]*\s*|(?<=[;:])\s+(?=\S)")
_LINE = re.compile(r"\n")
_SPLITTERS = (_PARAGRAPH, _SENTENCE, _LINE)


@dataclass
class PreparedChunk:
    chunk: Chunk
    embed_text: str


def _context_prefix(title: str, heading: str) -> str:
    parts = [p for p in (title.strip(), heading.strip()) if p]
    return " > ".join(parts) + "\n" if parts else ""


def chunk_document(doc: ParsedDocument, tokenizer: Tokenizer, max_tokens: int, overlap: int) -> list[PreparedChunk]:
    out: list[PreparedChunk] = []
    for section in doc.sections:
        text = without_contents(section.text)
        if not text.strip():
            continue
        # a PDF whose contents page is titled "目录" had every later heading under it ("目录 > 一、编程规约")
        heading = " > ".join(h for h in section.headings if h and not _CONTENTS_HEADING.match(h))
        prefix = _fit_prefix(_context_prefix(doc.title, heading), tokenizer, max_tokens // 4)
        prefix_tokens = tokenizer.count(prefix)
        budget = max_tokens - prefix_tokens
        for piece, n in split_text(text, tokenizer, budget, min(overlap, budget // 4)):
            chunk = Chunk(text=piece, ord=len(out), heading=heading, page=section.page, n_tokens=prefix_tokens + n)
            out.append(PreparedChunk(chunk=chunk, embed_text=prefix + piece))
    return _within_limit(out, tokenizer, max_tokens)


# A table of contents lists the headings with their pages: indexed, its lines outrank the sections they name
# (they hold every word of a heading) and answer nothing. An entry ends with its page after dot leaders or a
# tab ("Wager Notes ........298"), or glued on where Word drops the tab ("A. PURPOSE1-1").
# A title holds a letter, and a wide gap of spaces is no leader: "2019    120" / "2020    135" is a table of
# figures that go up, not a table of contents.
_CONTENTS_ENTRY = re.compile(r"^(?P<title>(?=.{0,150}?[^\W\d_])\S.{0,150}?)(?:\s*(?:\.{3,}|…{2,}|·{3,})\s*|\t+\s*)"
                             r"(?P<page>\d{1,4}|[ivxlc]{1,6})\s*$|^(?P<title2>\S.{0,150}?[^\W\d_])(?P<page2>\d{1,3}-\d{1,4})\s*$"
                             r"|^(?:\.{3,}|…{2,}|·{3,})\s*(?P<page3>\d{1,4})\s*$", re.I)  # the leader of a wrapped title
_CONTENTS_HEADING = re.compile(r"^\s*(?:table of contents|contents|目\s*录|inhalt|sommaire|índice|indice)\s*$", re.I)
_ENTRIES_ALONE = 5  # a run of entries this long is a table of contents even without a "Contents" line above it


def without_contents(text: str) -> str:
    """`text` without its table-of-contents lines: runs of entries whose pages never go down (at least
    _ENTRIES_ALONE of them, or 3 under a "Contents" line), with short unnumbered lines between entries (a
    chapter's title) and the "Contents" line itself. Everything else stays as it was."""
    lines = text.split("\n")
    drop: set[int] = set()
    i = 0
    while i < len(lines):
        run, last_page, j, gap, entries = [], (-1, -1), i, [], 0
        while j < len(lines):
            m = _CONTENTS_ENTRY.match(lines[j].strip())
            if m:
                page = _page_key(m.group("page") or m.group("page2") or m.group("page3"))
                if page is not None and page < last_page:
                    break
                last_page = page if page is not None else last_page
                run += gap + [j]
                gap = []
                entries += 1
            elif not lines[j].strip():
                gap.append(j)
            elif run and len(lines[j].strip()) <= 120 and sum(1 for k in gap if lines[k].strip()) < 2:
                gap.append(j)  # a chapter's title between entries, or an entry's title wrapped onto two lines
            else:
                break
            j += 1
        if entries < 3:  # no table of contents starts here (most lines of every document)
            i += 1
            continue
        # above the first entry: the "Contents" line, perhaps with a chapter's title or two between
        above = [k for k in range(i - 1, max(i - 8, -1), -1) if lines[k].strip()][:3]
        head = next((n for n, k in enumerate(above) if _CONTENTS_HEADING.match(lines[k])), None)
        if entries >= _ENTRIES_ALONE or head is not None:
            drop.update(run)
            if head is not None:
                drop.update(above[: head + 1])
            i = max(run) + 1
        else:
            i += 1
    if not drop:
        return text
    return "\n".join(line for k, line in enumerate(lines) if k not in drop)


def _page_key(page: str) -> tuple[int, int] | None:
    """A page reference as a sortable key: 12 -> (0, 12), 2-1 -> (2, 1); roman numerals (front matter) -> None."""
    if page.isdigit():
        return 0, int(page)
    if "-" in page:
        a, b = page.split("-")
        return int(a), int(b)
    return None


# Counts summed over pieces can differ from the count of their concatenation by a few tokens at each cut.
_RECOUNT_MARGIN = 8


def _within_limit(chunks: list[PreparedChunk], tokenizer: Tokenizer, max_tokens: int) -> list[PreparedChunk]:
    """Re-count the inputs whose estimate is near the limit; re-split any that overflow."""
    near = [c for c in chunks if c.chunk.n_tokens > max_tokens - _RECOUNT_MARGIN]
    for c, n in zip(near, tokenizer.count_batch([c.embed_text for c in near])):
        c.chunk.n_tokens = n
    if all(c.chunk.n_tokens <= max_tokens for c in near):
        return chunks
    out: list[PreparedChunk] = []
    for c in chunks:
        n = c.chunk.n_tokens
        if n <= max_tokens:
            c.chunk.n_tokens = n
            out.append(c)
            continue
        prefix = c.embed_text[: len(c.embed_text) - len(c.chunk.text)]
        budget = max_tokens - tokenizer.count(prefix) - (n - max_tokens) - 4
        parts = [
            PreparedChunk(Chunk(text=t, ord=0, heading=c.chunk.heading, page=c.chunk.page, n_tokens=max_tokens), prefix + t)
            for t, _ in split_text(c.chunk.text, tokenizer, max(budget, 8), 0)
        ]
        out.extend(_within_limit(parts, tokenizer, max_tokens))
    for i, c in enumerate(out):
        c.chunk.ord = i
    return out


def _fit_prefix(prefix: str, tokenizer: Tokenizer, limit: int) -> str:
    offsets = tokenizer.offsets(prefix)
    if len(offsets) <= limit:
        return prefix
    return prefix[: offsets[limit - 1][1]].rstrip() + "\n"


class _TokenMap:
    """Token positions of one text, so any span's token count is two binary searches, not a re-tokenization."""

    def __init__(self, text: str, tokenizer: Tokenizer):
        self.offsets = tokenizer.offsets(text)
        self.starts = [a for a, _ in self.offsets]

    def count(self, s: int, e: int) -> int:
        return bisect_left(self.starts, e) - bisect_left(self.starts, s)

    def first_token(self, s: int) -> int:
        return bisect_left(self.starts, s)


def _pieces(text: str, tokens: _TokenMap, budget: int) -> list[tuple[int, int, int]]:
    """Contiguous spans (start, end, tokens) covering `text`, each within `budget` tokens."""
    result: list[tuple[int, int, int]] = []
    stack = [(0, len(text), 0)]  # (start, end, index of the splitter to try next)
    while stack:
        s, e, level = stack.pop()
        n = tokens.count(s, e)
        if n <= budget:
            result.append((s, e, n))
        elif level < len(_SPLITTERS):
            cuts = [m.end() for m in _SPLITTERS[level].finditer(text, s, e) if s < m.end() < e]
            bounds = [s, *cuts, e]
            stack.extend((a, b, level + 1) for a, b in zip(bounds, bounds[1:]) if a < b)
        else:
            result.extend(_token_windows(text, tokens, s, e, budget))
    result.sort()
    return result


def _token_windows(text: str, tokens: _TokenMap, s: int, e: int, budget: int) -> list[tuple[int, int, int]]:
    """Cut a span with no natural boundary into windows of at most `budget` tokens, between words if possible."""
    windows = []
    i, last = tokens.first_token(s), tokens.first_token(e)
    start = s
    while i < last:
        j = i + budget
        if j >= last:
            windows.append((start, e, last - i))
            break
        k = j
        while k > i + budget // 2 and not _boundary_before(text, tokens, k):
            k -= 1
        if k == i + budget // 2:
            k = j  # one enormous "word": cut it anyway
        windows.append((start, tokens.starts[k], k - i))
        start, i = tokens.starts[k], k
    return windows


def _boundary_before(text: str, tokens: _TokenMap, k: int) -> bool:
    """True when token k begins a new word: whitespace before it, or an unspaced-script character."""
    gap = text[tokens.offsets[k - 1][1] : tokens.starts[k]]
    return bool(gap) or is_unspaced(text[tokens.starts[k]]) or is_unspaced(text[tokens.starts[k] - 1])


def split_text(text: str, tokenizer: Tokenizer, budget: int, overlap: int) -> list[tuple[str, int]]:
    """(passage, tokens) covering `text` in order, each within `budget` tokens, neighbours sharing up to `overlap`."""
    text = text.strip()
    if not text:
        return []
    tokens = _TokenMap(text, tokenizer)
    pieces = _pieces(text, tokens, budget)
    chunks: list[tuple[str, int]] = []
    start = pieces[0][0]
    end = start
    used = 0
    carried = 0  # tokens of overlap at the start of the current chunk
    for s, e, n in pieces:
        if used + n > budget and used > carried:
            chunks.append((text[start:end].strip(), used))
            start = _overlap_start(text, tokens, start, end, overlap)
            used = carried = tokens.count(start, end)
        if used + n > budget:  # even the overlap does not leave room: drop it
            start, used, carried = s, 0, 0
        end = e
        used += n
    if text[start:end].strip():
        chunks.append((text[start:end].strip(), used))
    return chunks


def _overlap_start(text: str, tokens: _TokenMap, start: int, end: int, overlap: int) -> int:
    """Where the next chunk starts so that it repeats at most `overlap` tokens of the last one."""
    first = tokens.first_token(start)
    last = tokens.first_token(end)
    if overlap <= 0 or last - first <= overlap:
        return end
    # begin at a word boundary rather than inside a word; a line break inside Chinese text wraps a line of a
    # PDF, it is no boundary (starting after "【强\n" quoted "制】线程资源..."). Starting at the first sentence
    # of the overlap instead was tried: it shortens the overlap, and cost cmrc2018_trial 0.2 points of evidence.
    for i in range(last - overlap, last):
        before, at = tokens.offsets[i - 1][1], tokens.starts[i]
        gap = text[before:at]
        if gap.isspace() and not ("\n" in gap and is_unspaced(text[before - 1]) and is_unspaced(text[at])):
            return at
    return tokens.starts[last - overlap]
