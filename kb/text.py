"""Script-aware text helpers: CJK detection and the lexical terms that the full-text index stores."""

from __future__ import annotations

import re

# Han (CJK unified + extension A + compatibility), Hiragana, Katakana: scripts written without spaces.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNSPACED_RUN = re.compile(f"[{_UNSPACED}]+")
_UNSPACED_CHAR = re.compile(f"[{_UNSPACED}]")
_LETTER = re.compile(r"[^\W_]")
# A dotted number (a version such as 1.0.0, a decimal such as 3.14) is one term, as Lucene's standard tokenizer
# keeps it: split into 1 / 0 / 0 it would be three of the commonest terms of a corpus and match nothing. A word
# glued to one ("v1.2.3", "python3.8") gives the word and the number, so that "1.2.3" finds "v1.2.3".
_VERSION = "[0-9]+(?:\\.[0-9]+)+"
# A run of unspaced characters goes on across a line break: a PDF or a hard-wrapped file breaks Chinese lines
# anywhere, inside a word too ("映射关\n系"), and the bigram across the break is a word of the text.
_TOKEN = re.compile(f"[{_UNSPACED}]+(?:[^\\S\\n]*\\n\\s*[{_UNSPACED}]+)*|{_VERSION}|[^\\W_{_UNSPACED}]+?(?={_VERSION})|"
                    f"[^\\W_{_UNSPACED}]+", re.UNICODE)
_WHITESPACE = re.compile(r"\s+")
# CJK letters and punctuation (full-width forms, 。，、「」) on both sides of a line break that wraps a line
_CJK_SIDE = f"[{_UNSPACED}\u3000-\u303f\uff00-\uffef]"
_ANSI = "(?:\x1b\\[[0-9;]*m)*"
_CJK_WRAP = f"({_CJK_SIDE}{_ANSI})[^\\S\\n]*\\n\\s*(?={_ANSI}{_CJK_SIDE})"  # compiled on first use (start-up time)
_TABLE_RULE = r"\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*"  # |------|:---:|
TABLE_ROW_LINE = r"\s*\|.*\|\s*$"  # a row as kb writes tables ("| 5-10年 | 10天 |")
LABEL = r"\s*[^\s:：]{1,30}[:：]\s?\S"  # "金额合计：人民币" (a line of a form)
_LIST_ITEM = r"\s*(?:[（(][一二三四五六七八九十\d]{1,3}[)）]|[一二三四五六七八九十]{1,3}、)"


def is_unspaced(ch: str) -> bool:
    return bool(_UNSPACED_RUN.fullmatch(ch))


def has_unspaced(text: str) -> bool:
    return _UNSPACED_RUN.search(text) is not None


def unspaced_ratio(text: str) -> float:
    """Share of the letters of `text` that belong to scripts written without spaces (Chinese, Japanese)."""
    letters = len(_LETTER.findall(text))
    if not letters:
        return 0.0
    return len(_UNSPACED_CHAR.findall(text)) / letters


def lexical_terms(text: str, *, unigrams: bool = True) -> list[str]:
    """Terms for BM25: lower-cased words for spaced scripts; for unspaced ones (Chinese, Japanese) every
    character and every overlapping character bigram.

    Bigrams are the standard indexing unit for Chinese and Japanese when no word segmenter is at hand: most
    words are one or two characters, and a bigram index matches them without a dictionary. Unigrams as well
    (as Lucene's CJK bigram filter can emit) match one-character words and give partial credit where a
    bigram straddles a word boundary; on cmrc2018 they raised recall@1 from 0.963 to 0.973.
    `unigrams=False` gives bigrams only (a lone character stays a unigram).
    """
    terms: list[str] = []
    for match in _TOKEN.finditer(text.lower()):
        run = match.group()
        if _UNSPACED_RUN.match(run):
            run = _WHITESPACE.sub("", run)
            if len(run) == 1:
                terms.append(run)
            else:
                if unigrams:
                    terms.extend(run)
                terms.extend(run[i : i + 2] for i in range(len(run) - 1))
        else:
            terms.append(run)
    return terms


def flatten(text: str, *, rows: bool = False) -> str:
    """`text` on one line for display: a line break between two CJK characters (a wrapped line of a PDF) is
    dropped, as Chinese puts no space between words; other runs of whitespace become one space. Terminal
    colour codes between the characters are allowed for. A break between two lines of a form or list
    ("购买方：上海明远科技有限公司" / "金额合计：人民币 3,260.00 元", "（一）...") is not a wrap: it stays, as a space.
    A markdown table's rule line (|---|---|) is dropped; with `rows`, each table row keeps a line of its own."""
    def join(m: re.Match) -> str:
        return m.group(0) if _line_starts_unit(text, m.start(), m.end()) else m.group(1)

    lines = [line for line in re.sub(_CJK_WRAP, join, text).split("\n") if not re.fullmatch(_TABLE_RULE, line)]
    if not rows:
        return " ".join(" ".join(lines).split())
    out: list[str] = []
    row = False  # the line before was a table row
    for line in lines:
        line = " ".join(line.split())
        if not line:
            continue
        was_row, row = row, bool(re.match(TABLE_ROW_LINE, re.sub(_ANSI, "", line)))
        if out and not row and not was_row:
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


def _line_starts_unit(text: str, before: int, after: int) -> bool:
    """Whether the line break between `text[before]` and `text[after]` starts a new line of a form (both lines
    are labelled, "金额合计：...") or a list item ("（二）", "三、"), rather than wrapping a line."""
    start = text.rfind("\n", 0, before) + 1
    end = text.find("\n", after)
    previous, following = (re.sub(_ANSI, "", s) for s in (text[start:before + 1], text[after:] if end < 0 else text[after:end]))
    if re.match(_LIST_ITEM, following):
        return True
    return bool(re.match(LABEL, previous) and re.match(LABEL, following))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (ROUGE-L, CMRC's F1)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            cur[j + 1] = prev[j] + 1 if x == y else max(prev[j + 1], cur[j])
        prev = cur
    return prev[-1]


def lexical_document(text: str) -> str:
    """The string stored in the FTS5 table for `text` (terms joined by spaces)."""
    return " ".join(lexical_terms(text))


def query_terms(text: str) -> list[str]:
    """The distinct lexical terms of a query, in order."""
    return list(dict.fromkeys(lexical_terms(text)))


def fts_query(terms: list[str]) -> str:
    """An FTS5 MATCH expression that ORs `terms`; empty when there are none."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


# Scripts whose languages an embedding model must list to be trusted with a query in that script.
_SCRIPT_LANGUAGES = [
    (re.compile("[\u3040-\u30ff]"), {"ja"}),
    (re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"), {"zh", "ja", "zh-cn", "zh-tw", "yue"}),
    (re.compile("[\uac00-\ud7af\u1100-\u11ff]"), {"ko"}),
    (re.compile("[\u0400-\u04ff]"), {"ru", "uk", "bg", "sr", "be", "mk", "kk", "ky", "mn", "tg"}),
    (re.compile("[\u0600-\u06ff]"), {"ar", "fa", "ur", "ps", "ku", "sd", "ug"}),
    (re.compile("[\u0590-\u05ff]"), {"he", "yi"}),
    (re.compile("[\u0370-\u03ff]"), {"el"}),
    (re.compile("[\u0e00-\u0e7f]"), {"th"}),
    (re.compile("[\u0900-\u097f]"), {"hi", "mr", "ne", "sa"}),
]


def script_languages(text: str) -> set[str] | None:
    """Languages written in the dominant non-Latin script of `text`; None when it is Latin (or has no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    best, best_count = None, 0
    for pattern, languages in _SCRIPT_LANGUAGES:
        count = sum(1 for c in letters if pattern.match(c))
        if count > best_count:
            best, best_count = languages, count
    return best if best_count * 2 >= len(letters) else None


def model_covers(model_languages: set[str] | None, text: str) -> bool:
    """Whether a model trained on `model_languages` (None: unknown, assume yes) can be trusted with `text`.

    Every non-Latin script that makes up a real share of the text's letters (a quarter, or 3 letters when
    the text is short) must be covered: "Super Bowl 50在哪里举行？" is a Chinese question with an English name.
    """
    if model_languages is None or "multilingual" in model_languages:
        return True
    have = {lang.lower() for lang in model_languages}
    letters = [c for c in text if c.isalpha()]
    for pattern, languages in _SCRIPT_LANGUAGES:
        count = sum(1 for c in letters if pattern.match(c))
        if count and count >= min(max(3, len(letters) // 4), len(letters)) and not (have & languages):
            return False
    return True
