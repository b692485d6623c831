"""How much of a saved web page kb keeps is the page's own content, and how much of that content it keeps.

For each page of the shared HTML corpus (mozilla/readability's test pages), kb's parse is compared with the
main content that Readability's own test expects (`test/test-pages/<name>/expected.html` in a checkout of
github.com/mozilla/readability, which `--expected` points at; it is not shipped with kb). Words are kb's
lexical terms (lower-cased words, CJK characters and bigrams), counted as multisets:

- precision: the share of kb's words that are in the expected content (the rest is menus, ads, links ...);
- recall: the share of the expected content's words that kb kept.

    .venv/bin/python benchmarks/html_extract.py --expected PATH/readability/test/test-pages [--raw]

`--raw` measures the parse without kb's boilerplate removal (unstructured on the whole page).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kb.text import lexical_terms  # noqa: E402

HTML = ROOT.parent / "shared" / "data" / "corpora" / "html"


def words(text: str) -> collections.Counter:
    return collections.Counter(t for t in lexical_terms(text) if len(t) > 1 or not t.isascii())


def expected_text(path: Path) -> str:
    import lxml.html

    return lxml.html.fromstring(path.read_bytes().decode("utf-8", errors="replace")).text_content()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expected", required=True, help="mozilla/readability's test/test-pages folder")
    parser.add_argument("--raw", action="store_true", help="without kb's boilerplate removal")
    parser.add_argument("--html", default=str(HTML))
    args = parser.parse_args()
    import ingest.rich_formats as rich

    if args.raw:
        rich.MAIN_CONTENT = False
    rows = {}
    for page in sorted(Path(args.html).glob("*.html")):
        expected = Path(args.expected) / page.stem / "expected.html"
        if not expected.is_file():
            expected = Path(args.expected) / f"{page.stem}.html"
        if not expected.is_file():
            continue
        started = time.perf_counter()
        doc = rich.parse_html(page)
        seconds = time.perf_counter() - started
        got = words("\n".join([doc.title] + [" ".join(s.headings) + "\n" + s.text for s in doc.sections]))
        want = words(expected_text(expected))
        common = sum((got & want).values())
        rows[page.stem] = {"precision": round(common / max(sum(got.values()), 1), 3),
                           "recall": round(common / max(sum(want.values()), 1), 3),
                           "kb_words": sum(got.values()), "expected_words": sum(want.values()),
                           "seconds": round(seconds, 3)}
    print(f"{'page':40} {'precision':>9} {'recall':>7} {'kb words':>9} {'expected':>9}")
    for name, r in rows.items():
        print(f"{name:40} {r['precision']:9.3f} {r['recall']:7.3f} {r['kb_words']:9} {r['expected_words']:9}")
    summary = {"pages": len(rows),
               "precision_mean": round(statistics.mean(r["precision"] for r in rows.values()), 3),
               "recall_mean": round(statistics.mean(r["recall"] for r in rows.values()), 3),
               "precision_words": round(sum(r["precision"] * r["kb_words"] for r in rows.values())
                                        / max(sum(r["kb_words"] for r in rows.values()), 1), 3),
               "seconds_total": round(sum(r["seconds"] for r in rows.values()), 2)}
    print(f"{'mean':40} {summary['precision_mean']:9.3f} {summary['recall_mean']:7.3f}")
    print(json.dumps({"summary": summary, "pages": rows}))


if __name__ == "__main__":
    main()
