"""Ingest and search speed: prints a table and one JSON object.

    python benchmarks/ingest.py [--limit N] [--skip-pdf] [--skip-word-html] [--small-files 20000] [--chunks 100000]

1. `kb ingest` of the rust-blog corpus from a cold process: wall time, files/s, chunks/s, peak RSS, cores
   used (CPU time / wall), and the split into parse, chunk, embed and store (parse and chunk overlap with
   embedding; they are summed separately).
2. The embedding model alone, from a cold process, on exactly the texts kb embedded (same batch size).
3. A re-ingest with no change.
4. `kb ingest` of the PDF corpus, OCR included (scanned pages), in parsing workers: the same measures, pages,
   pages read by OCR and OCR pages per second.
5. `kb ingest` of the Word corpus (a 127,000-word handbook and two small files) and of the HTML corpus (25 saved
   web pages), both read by unstructured in parsing workers: the same measures.
6. `kb ingest` of --small-files one-paragraph files: files/s, and the time in discovery and hashing.
7. `kb search` from a cold process, and in-process query latency, per retriever, over a synthetic index of
   --chunks chunks with a realistic term distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the `ingest` package; its own folder must not shadow the package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
DATA = ROOT.parent / "shared" / "data" / "corpora"
sys.path.insert(1, str(Path(__file__).resolve().parent))
from report import run_child  # noqa: E402  (benchmarks/report.py)
from synthetic import SyntheticCorpus  # noqa: E402  (benchmarks/synthetic.py)
KB = [sys.executable, "-m", "kb"]


def ingest(folder: Path, home: Path, *extra: str) -> dict:
    wall, rss, proc = run_child([*KB, "ingest", str(folder), "--kb", str(home), "--json", *extra])
    report = json.loads(proc.stdout)
    files = len(report["added"]) + len(report["updated"])
    timings = report["timings"]
    return {
        "wall_s": round(wall, 2),
        "files": files,
        "failed": len(report["failed"]),
        "chunks": report["chunks"],
        "files_per_s": round(files / wall, 2),
        "chunks_per_s": round(report["chunks"] / wall, 2),
        "peak_rss_mb": round(rss),
        "cores_used": round(proc.cpu_s / wall, 2),
        "pages": timings.get("pages", 0),
        "ocr_pages": timings.get("ocr_pages", 0),
        "ocr_pages_per_s": round(timings["ocr_pages"] / timings["ocr"], 2) if timings.get("ocr") else None,
        "split_s": timings,
    }


def small_files(count: int, work: Path) -> dict:
    """`count` one-paragraph markdown files (sentences of rust-blog posts), ingested from a cold process."""
    import random

    sentences = [s.strip() for f in sorted((DATA / "rust-blog").glob("*.md"))[:200]
                 for s in f.read_text(encoding="utf-8").split(". ") if 40 < len(s) < 300 and "\n" not in s]
    folder = work / "small"
    rng = random.Random(0)
    for i in range(count):
        sub = folder / f"{i // 1000:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"note{i:05d}.md").write_text(f"# Note {i}\n\n" + ". ".join(rng.sample(sentences, 3)) + ".\n")
    return ingest(folder, work / "home-small")


# The model alone, at the precision kb picks on this machine (bf16 autocast where the CPU has native bf16,
# else float32), so that the ratio measures kb's pipeline, not the precision.
MODEL_ALONE = """
import contextlib, json, sys, time
t0 = time.perf_counter()
import torch
from sentence_transformers import SentenceTransformer
from kb.embedder import SentenceTransformerEmbedder, bundled_embedder_path
texts = json.load(open(sys.argv[1]))
bf16 = SentenceTransformerEmbedder().use_bf16
model = SentenceTransformer(str(bundled_embedder_path()), device="cpu")
t1 = time.perf_counter()
with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
    model.encode(texts, batch_size=64, normalize_embeddings=True)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "encode_s": t2 - t1, "precision": "bf16" if bf16 else "fp32"}))
"""


def model_alone(home: Path) -> dict:
    """The model alone on the texts kb embedded: the chunk text with its title/heading prefix."""
    from ingest.chunk import _context_prefix
    from kb.store import open_store

    store = open_store(home, "")
    texts = [_context_prefix(title or "", heading or "") + text for _, title, heading, text in store.iter_chunks()]
    store.close()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    wall, rss, proc = run_child([sys.executable, "-c", MODEL_ALONE, f.name])
    os.unlink(f.name)
    inner = json.loads(proc.stdout)
    return {"wall_s": round(wall, 2), "encode_s": round(inner["encode_s"], 2), "texts": len(texts),
            "chunks_per_s": round(len(texts) / inner["encode_s"], 2), "precision": inner["precision"]}


def synthetic_search(n_chunks: int, queries: int = 100) -> dict:
    """In-process query latency at n_chunks, per retriever. The text has a realistic term distribution
    (benchmarks/synthetic.py: a Zipfian vocabulary, distinct terms per chunk), so that the full-text side
    really searches; queries are words of a random chunk, rare and common ones mixed, as people type them."""
    import numpy as np

    from kb.api import KnowledgeBase
    from kb.embedder import BUNDLED_EMBEDDER_ID
    from kb.store import open_store
    from synthetic import fill_store

    corpus = SyntheticCorpus(seed=0)
    home = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    store = open_store(home, create=True)
    store.bind_model(BUNDLED_EMBEDDER_ID, 384, 254, 32)
    texts = fill_store(store, corpus, n_chunks, per_doc=20)
    store.close()
    kb = KnowledgeBase(home)
    rng = np.random.default_rng(1)
    asked = [corpus.query_from(texts[int(i)], rng) for i in rng.integers(0, len(texts), queries)]
    out = {}
    for mode in ("dense", "lexical", "hybrid"):
        kb.search("warm up the caches", 5, mode=mode)
        times = []
        for query in asked:
            t = time.perf_counter()
            kb.search(query, 5, mode=mode)
            times.append((time.perf_counter() - t) * 1000)
        out[mode] = {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(sorted(times)[int(0.95 * len(times))], 2)}
    kb.close()
    shutil.rmtree(home)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=0, help="only the first N rust-blog posts (0: all)")
    parser.add_argument("--skip-pdf", action="store_true")
    parser.add_argument("--skip-word-html", action="store_true")
    parser.add_argument("--small-files", type=int, default=20_000, help="one-paragraph files (0: skip)")
    parser.add_argument("--chunks", type=int, default=100_000, help="size of the synthetic search index")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    work = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    blog = DATA / "rust-blog"
    if args.limit:
        subset = work / "rust-blog"
        for f in sorted(blog.rglob("*.md"))[: args.limit]:
            target = subset / f.relative_to(blog)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
        blog = subset
    results: dict = {"corpus": str(blog), "cpu_count": os.cpu_count()}
    home = work / "home"
    results["rust_blog"] = ingest(blog, home)
    results["model_alone"] = model_alone(home)
    results["ratio_kb_to_model_alone"] = round(results["rust_blog"]["wall_s"] / results["model_alone"]["wall_s"], 3)
    wall, _, _ = run_child([*KB, "ingest", str(blog), "--kb", str(home), "-q"])
    results["reingest_no_change_s"] = round(wall, 2)
    wall, _, proc = run_child([*KB, "search", "how do I use async functions", "--kb", str(home)])
    results["search_cold_process_s"] = round(wall, 2)
    if not args.skip_pdf:
        results["pdf"] = ingest(DATA / "pdf", work / "home-pdf")
    if not args.skip_word_html:
        results["docx"] = ingest(DATA / "docx", work / "home-docx")
        results["html"] = ingest(DATA / "html", work / "home-html")
    if args.small_files:
        results["small_files"] = small_files(args.small_files, work)
    results["search_in_process"] = synthetic_search(args.chunks)
    results["search_in_process"]["chunks"] = args.chunks
    shutil.rmtree(work)

    rb, ma = results["rust_blog"], results["model_alone"]
    rows = [
        ("rust-blog ingest, cold process", f"{rb['wall_s']} s", f"{rb['files']} files, {rb['chunks']} chunks"),
        ("  files/s, chunks/s", f"{rb['files_per_s']}, {rb['chunks_per_s']}",
         f"peak RSS {rb['peak_rss_mb']} MB, {rb['cores_used']} cores used"),
        ("  parse / chunk / embed / store", " / ".join(str(rb["split_s"][k]) for k in ("parse", "chunk", "embed", "store")), "seconds (parse+chunk overlap embed)"),
        ("embedding model alone, cold process", f"{ma['wall_s']} s", f"encode {ma['encode_s']} s, {ma['chunks_per_s']} chunks/s"),
        ("kb / model alone", str(results["ratio_kb_to_model_alone"]), "target <= 1.10"),
        ("re-ingest, no change", f"{results['reingest_no_change_s']} s", "target < 5 s"),
        ("kb search, cold process", f"{results['search_cold_process_s']} s", ""),
    ]
    if "pdf" in results:
        p = results["pdf"]
        rows.append(("pdf corpus ingest, OCR included", f"{p['wall_s']} s", f"{p['files']} files ({p['failed']} failed), "
                     f"{p['pages']} pages ({p['ocr_pages']} by OCR, {p['ocr_pages_per_s']} pages/s), {p['chunks']} chunks"))
        rows.append(("  parse / ocr / chunk / embed / store", " / ".join(str(p["split_s"][k]) for k in ("parse", "ocr", "chunk", "embed", "store")),
                     f"seconds; {p['cores_used']} cores used, peak RSS {p['peak_rss_mb']} MB"))
    for name, label in (("docx", "Word corpus ingest"), ("html", "HTML corpus ingest")):
        if name in results:
            r = results[name]
            rows.append((label, f"{r['wall_s']} s", f"{r['files']} files ({r['failed']} failed), {r['chunks']} chunks; "
                         f"parse {r['split_s']['parse']} s, embed {r['split_s']['embed']} s, {r['cores_used']} cores used"))
    if "small_files" in results:
        f = results["small_files"]
        rows.append((f"{f['files']} one-paragraph files", f"{f['wall_s']} s", f"{f['files_per_s']} files/s; discover "
                     f"{f['split_s']['discover']} s, hash {f['split_s']['hash']} s, embed {f['split_s']['embed']} s"))
    for mode, lat in results["search_in_process"].items():
        if isinstance(lat, dict):
            rows.append((f"search in process, {mode}", f"p50 {lat['p50_ms']} ms", f"p95 {lat['p95_ms']} ms at {args.chunks} chunks"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<22} {note}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
