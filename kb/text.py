"""Script-aware text helpers: CJK detection and the lexical terms that the full-text index stores."""

from __future__ import annotations

import re

# Han (CJK unified + extension A + compatibility), Hiragana, Katakana: scripts written without spaces.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNSPACED_RUN = re.compile(f"[{_UNSPACED}]+")
_TOKEN = re.compile(f"[{_UNSPACED}]+|[^\\W_{_UNSPACED}]+", re.UNICODE)


def is_unspaced(ch: str) -> bool:
    return bool(_UNSPACED_RUN.fullmatch(ch))


def unspaced_ratio(text: str) -> float:
    """Share of the letters of `text` that belong to scripts written without spaces (Chinese, Japanese)."""
    letters = [c for c in text if c.isalnum()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if _UNSPACED_RUN.match(c)) / len(letters)


def lexical_terms(text: str) -> list[str]:
    """Terms for BM25: lower-cased words for spaced scripts, overlapping character bigrams for unspaced ones.

    Bigrams are the standard indexing unit for Chinese and Japanese when no word segmenter is at hand:
    most words are one or two characters, and a bigram index matches them without a dictionary.
    A single character standing alone is kept as a unigram so that one-character queries still match.
    """
    terms: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        run = match.group()
        if _UNSPACED_RUN.fullmatch(run):
            if len(run) == 1:
                terms.append(run)
            else:
                terms.extend(run[i : i + 2] for i in range(len(run) - 1))
        else:
            terms.append(run)
    return terms


def lexical_document(text: str) -> str:
    """The string stored in the FTS5 table for `text` (terms joined by spaces)."""
    return " ".join(lexical_terms(text))


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression that ORs the distinct terms of `text`; empty when it has none."""
    seen: dict[str, None] = {}
    for term in lexical_terms(text):
        seen.setdefault(term, None)
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in seen)
