"""kb's PDF parser (pdfium) against unstructured's fast strategy, file by file: seconds and text coverage.

Coverage is the share of a reference extraction's words (pypdf's, an independent third extractor; words of two
letters or more and every CJK or Hangul character) found in the candidate's text, headings included. Prints a
table and one JSON object (docs/pdf.md has the measured table and the decision it led to).

unstructured's PDF path is not installed with kb any more; to run its side:
    .venv/bin/pip install pdf2image pdfminer.six pikepdf pi_heif pypdf
    .venv/bin/pip install --no-deps unstructured-inference
    .venv/bin/python benchmarks/pdf_compare.py [../shared/data/corpora/pdf]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"\w+", text) if len(w) > 1} | \
        {c for c in text if "\u4e00" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af"}


def main() -> None:
    from pypdf import PdfReader

    from ingest.pdf import parse_pdf

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "corpora" / "pdf"
    try:
        from ingest.rich_formats import unstructured_ready

        unstructured_ready()
        from unstructured.partition.pdf import partition_pdf
    except ImportError as e:
        partition_pdf = None
        print(f"unstructured's PDF path is not installed ({e}); measuring pdfium alone", file=sys.stderr)
    rows = []
    for pdf in sorted(folder.glob("*.pdf")):
        row: dict = {"file": pdf.name}
        try:
            reference = words("\n".join((p.extract_text() or "") for p in PdfReader(str(pdf)).pages))
        except Exception:
            reference = set()
        started = time.perf_counter()
        try:
            doc = parse_pdf(pdf, ocr=False)
            text = "\n".join([s.text for s in doc.sections] + [h for s in doc.sections for h in s.headings])
            row.update(pages=doc.stats["pages"], pdfium_s=round(time.perf_counter() - started, 2),
                       pdfium_coverage=round(len(words(text) & reference) / max(1, len(reference)), 3))
        except Exception as e:
            row["pdfium"] = f"{type(e).__name__}: {e}"[:80]
        if partition_pdf is not None:
            started = time.perf_counter()
            try:
                text = "\n".join(e.text for e in partition_pdf(filename=str(pdf), strategy="fast", languages=["eng"]) if e.text)
                row.update(unstructured_s=round(time.perf_counter() - started, 2),
                           unstructured_coverage=round(len(words(text) & reference) / max(1, len(reference)), 3))
            except Exception as e:
                row["unstructured"] = f"{type(e).__name__}: {e}"[:80]
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
