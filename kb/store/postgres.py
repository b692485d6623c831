"""The shared store: PostgreSQL with pgvector, for several `kb serve` replicas and ingests at once.

- Chunks hold their vector in a `vector(dim)` column with an HNSW index (cosine). Filtered vector queries use
  pgvector's iterative scans, and fall back to an exact scan when the index still returns fewer than k of the
  rows the filter allows: a selective filter never silently shortens the result.
- Lexical search runs on a GIN-indexed `tsvector` of kb's own terms (words, CJK unigrams and bigrams, as the
  SQLite store indexes them: PostgreSQL cannot segment Chinese), written with positions so that term
  frequencies are exact, and ranked by BM25 computed in SQL (k1 1.2, b 0.75, as SQLite's FTS5).
- Filters are bound parameters in SQL. Schema changes are versioned migrations. The ingest lock is an
  advisory lock, so an ingest on any machine excludes the others. The model-mismatch check is the same.

Needs the optional extra: pip install 'kb-assistant[postgres]' (psycopg, pgvector).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from kb.errors import KBError, Locked, ModelMismatch, NotIngested
from kb.store import (BM25_B, BM25_K1, LEAD_CHARS, Filters, StoredDocument, batches, bm25_idf, chunk_leads,
                      chunk_term_list, iter_leads, rarest_within, section_lead)
from kb.types import Chunk, Hit

# Lexical candidates are bounded: the rows matched by the rarest query terms, adding terms from rarest to most
# common while the rows stay under this; every candidate is then scored with all the query's terms. A chunk
# that holds only the most common terms (the lowest IDF) is not a candidate. Scoring costs about 10 us per
# candidate on 2 cores (only the query's lexemes of its tsvector are unnested), so this bounds a query to tens
# of ms at any corpus size (benchmarks/scale.py).
MAX_LEXICAL_CANDIDATES = 3_000
LEXICAL_CANDIDATE_CAP = MAX_LEXICAL_CANDIDATES  # rows scored at most, whatever the estimates said
BULK_LOAD_FILES = 200  # an ingest of this many files or more, into fewer documents, builds the HNSW index at the end
HNSW_BUILD_MAX_MB = 4096  # the most maintenance memory an index build asks of the server
DF_ESTIMATE_FROM = 50_000  # chunks; from here on doc_freqs estimates common terms from ANALYZE's statistics
DF_COUNT_CAP = 5_000  # ... and counts any other term's rows up to this many
_LOCK_KEY = zlib.crc32(b"kb ingest write lock")  # with the schema's name, the advisory lock's key
MAX_POSITION = 16383  # PostgreSQL's largest tsvector position
MAX_LEXEME_BYTES = 2046

POSTGRES_HINT = "install the PostgreSQL extra: .venv/bin/pip install -e '.[postgres]' (psycopg, pgvector)"


class StoreUnavailable(KBError):
    """The PostgreSQL server cannot be reached or refused the connection."""


def safe_url(url: str) -> str:
    """The URL without its password, to show in messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


MIGRATIONS = [
    ("m001_initial", """
        CREATE EXTENSION IF NOT EXISTS vector;
        CREATE TABLE IF NOT EXISTS kb_meta (key text PRIMARY KEY, value text);
        CREATE TABLE IF NOT EXISTS kb_documents (
            id bigserial PRIMARY KEY, path text NOT NULL UNIQUE, root text, file_type text, title text, hash text,
            size bigint, mtime double precision, metadata jsonb, tags jsonb, date text, n_chunks int,
            ingested_at double precision);
        CREATE INDEX IF NOT EXISTS kb_documents_root ON kb_documents (root);
        CREATE TABLE IF NOT EXISTS kb_ingests (id bigserial PRIMARY KEY, started_at double precision,
            finished_at double precision, paths jsonb, report jsonb);
        CREATE TABLE IF NOT EXISTS kb_conversations (id bigserial PRIMARY KEY, started_at double precision,
            updated_at double precision, persona text, summary text, title text);
        CREATE TABLE IF NOT EXISTS kb_messages (id bigserial PRIMARY KEY,
            conversation_id bigint REFERENCES kb_conversations(id) ON DELETE CASCADE, role text, content text,
            sources jsonb, at double precision, summarized boolean DEFAULT false);
        CREATE INDEX IF NOT EXISTS kb_messages_conversation ON kb_messages (conversation_id);
        CREATE TABLE IF NOT EXISTS kb_asks (id bigserial PRIMARY KEY, at double precision, question text,
            standalone text, answer text, refused boolean, sources jsonb, model text, timings jsonb,
            conversation_id bigint);
    """),
]


def m002_dotted_numbers(conn) -> None:
    """Dotted numbers (versions, decimals) are now one term (kb.text.lexical_terms): re-derive the terms of the
    chunks that hold one. The chunks table exists only once a model is bound; a new database has nothing to do."""
    if not conn.execute("SELECT to_regclass('kb_chunks') IS NOT NULL").fetchone()[0]:
        return
    rows = conn.execute(
        "SELECT c.id, d.title, c.heading, c.text FROM kb_chunks c JOIN kb_documents d ON d.id = c.doc_id "
        "WHERE concat_ws(' ', d.title, c.heading, c.text) ~ '[0-9][.][0-9]'").fetchall()
    with conn.cursor() as cur:
        for chunk_id, title, heading, text in rows:
            terms = chunk_term_list(title, heading, text)
            cur.execute("UPDATE kb_chunks SET terms = %s::tsvector, n_terms = %s WHERE id = %s",
                        [tsvector_literal(terms), len(terms), chunk_id])


MIGRATIONS.append(("m002_dotted_numbers", m002_dotted_numbers))

# ANALYZE keeps the most common elements of the `terms` column, which doc_freqs reads: ten times the default
# (10,000 lexemes, down to ~0.08% of rows at 1M chunks; ANALYZE samples 300,000 rows, 7 s at 1M), so that any
# term it leaves out is in few enough rows to count quickly.
TERMS_STATISTICS = "ALTER TABLE kb_chunks ALTER COLUMN terms SET STATISTICS 1000"


def m003_terms_statistics(conn) -> None:
    if conn.execute("SELECT to_regclass('kb_chunks') IS NOT NULL").fetchone()[0]:
        conn.execute(TERMS_STATISTICS)


MIGRATIONS.append(("m003_terms_statistics", m003_terms_statistics))


def m004_section_leads(conn) -> None:
    """A chunk that does not open its section is now indexed with the section's first sentence too
    (kb.store.section_lead): re-derive the terms of those chunks."""
    if not conn.execute("SELECT to_regclass('kb_chunks') IS NOT NULL").fetchone()[0]:
        return
    with conn.cursor(name="kb_m004") as rows, conn.cursor() as cur:  # server-side: not a million rows at once
        rows.execute("SELECT c.doc_id, c.heading, c.text, c.id, d.title FROM kb_chunks c "
                     "JOIN kb_documents d ON d.id = c.doc_id ORDER BY c.doc_id, c.ord")
        changed = ((chunk_term_list(title, heading, text, lead), chunk_id)
                   for (_, heading, text, chunk_id, title), lead in iter_leads(rows) if lead)
        for batch in batches(changed, 5000):
            cur.executemany("UPDATE kb_chunks SET terms = %s::tsvector, n_terms = %s WHERE id = %s",
                            [(tsvector_literal(terms), len(terms), chunk_id) for terms, chunk_id in batch])


MIGRATIONS.append(("m004_section_leads", m004_section_leads))


def _chunks_table(dim: int) -> str:
    """The chunks table, created once the embedding model (and so the dimension) is known."""
    return f"""
        CREATE TABLE IF NOT EXISTS kb_chunks (
            id bigserial PRIMARY KEY, doc_id bigint NOT NULL REFERENCES kb_documents(id) ON DELETE CASCADE,
            ord int, text text, heading text, page int, n_tokens int, embedding vector({int(dim)}),
            embed_hash text, terms tsvector, n_terms int);
        CREATE INDEX IF NOT EXISTS kb_chunks_doc ON kb_chunks (doc_id);
        CREATE INDEX IF NOT EXISTS kb_chunks_embed_hash ON kb_chunks (embed_hash);
        CREATE INDEX IF NOT EXISTS kb_chunks_terms ON kb_chunks USING gin (terms);
        CREATE INDEX IF NOT EXISTS kb_chunks_embedding ON kb_chunks USING hnsw (embedding vector_cosine_ops);
        {TERMS_STATISTICS};
    """


def tsvector_literal(terms: list[str]) -> str:
    """kb's terms as a tsvector with positions, written out so that PostgreSQL's parser never re-splits them."""
    positions: dict[str, list[int]] = {}
    for i, term in enumerate(terms, 1):
        if len(term.encode("utf-8")) > MAX_LEXEME_BYTES:
            continue
        slots = positions.setdefault(term, [])
        if len(slots) < 256:
            slots.append(min(i, MAX_POSITION))
    return " ".join(f"'{_quote(t)}':{','.join(map(str, sorted(set(p))))}" for t, p in positions.items())


def tsquery_literal(terms: list[str]) -> str:
    return " | ".join(f"'{_quote(t)}'" for t in terms if len(t.encode("utf-8")) <= MAX_LEXEME_BYTES)


def _quote(term: str) -> str:
    return term.replace("\\", "\\\\").replace("'", "''")


def _as_array(value) -> np.ndarray:
    """A vector column's value (pgvector's Vector, or an array) as float32."""
    to_numpy = getattr(value, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy else value, dtype=np.float32)


def glob_to_regex(glob: str) -> str:
    """A shell glob (SQLite's GLOB: `*` crosses `/`) as an anchored PostgreSQL regular expression."""
    out, i = ["^"], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1:j].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + "$"


class PostgresStore:
    """Documents, chunks, vectors, full-text terms, chats and the ask log, in PostgreSQL + pgvector."""

    def __init__(self, home: Path, url: str, *, create: bool = False):
        try:
            import psycopg
            from pgvector.psycopg import register_vector
        except ImportError as e:
            raise KBError(f"a PostgreSQL store needs {e.name}, which is not installed", hint=POSTGRES_HINT) from e
        self.home = Path(home)
        self.url = url
        self.location = safe_url(url)
        self._psycopg = psycopg
        self._register_vector = register_vector
        self.conn = self._connect()
        self._reader = None  # dense search's own connection (concurrent_dense), opened when first needed
        self._reader_lock = threading.Lock()
        self._model_info: dict | None = None
        self._stats: tuple | None = None
        self._elements: tuple[float, dict[str, float]] | None = None
        self._written = 0  # chunks written or removed since the last ANALYZE check
        self._migrate()
        if not create and self.model_info() is None and not self._table_exists("kb_documents"):
            raise NotIngested(f"no knowledge base in {self.location}")

    def _connect(self):
        try:
            conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                         application_name=f"kb pid {os.getpid()} on {socket.gethostname()}"[:63])
        except self._psycopg.OperationalError as e:
            raise StoreUnavailable(f"cannot connect to the PostgreSQL store {self.location}: {str(e).strip()}",
                                   hint="check that the server is running and the URL, user and password are right") from e
        return conn

    def _register(self) -> None:
        if not getattr(self, "_vector_registered", False):
            self._register_vector(self.conn)
            self._vector_registered = True

    def _table_exists(self, name: str) -> bool:
        return self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", [name]).fetchone()[0]

    @contextmanager
    def _transaction(self):
        with self.conn.transaction():
            yield

    def _migrate(self) -> None:
        """Apply the migrations this database has not seen, each once, under a lock (replicas start at once)."""
        with self._transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY + 1])
            self.conn.execute("CREATE TABLE IF NOT EXISTS kb_migrations (name text PRIMARY KEY, applied_at double precision)")
            done = {r[0] for r in self.conn.execute("SELECT name FROM kb_migrations")}
            for name, step in MIGRATIONS:
                if name not in done:
                    step(self.conn) if callable(step) else self.conn.execute(step)
                    self.conn.execute("INSERT INTO kb_migrations VALUES (%s, %s)", [name, time.time()])
        if self._table_exists("kb_chunks"):
            self._register()

    # --- metadata -------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM kb_meta WHERE key = %s", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, **values) -> None:
        with self._transaction():
            for key, value in values.items():
                self.conn.execute("INSERT INTO kb_meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                  [key, str(value)])

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def _bump_generation(self) -> None:
        self.conn.execute("INSERT INTO kb_meta VALUES ('generation', '1') ON CONFLICT (key) DO UPDATE "
                          "SET value = (kb_meta.value::bigint + 1)::text")

    def model_info(self) -> dict | None:
        if self._model_info is None:
            model = self.get_meta("embedding_model")
            if model is None:
                return None
            self._model_info = {"embedding_model": model, "dim": int(self.get_meta("dim", "0")),
                                "max_tokens": int(self.get_meta("max_tokens", "0")),
                                "chunk_overlap": int(self.get_meta("chunk_overlap", "0"))}
        return self._model_info

    def bind_model(self, model_id: str, dim: int, max_tokens: int, chunk_overlap: int) -> None:
        info = self.model_info()
        if info is None:
            with self._transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY + 1])
                self.conn.execute(_chunks_table(dim))
                for key, value in {"embedding_model": model_id, "dim": dim, "max_tokens": max_tokens,
                                   "chunk_overlap": chunk_overlap}.items():
                    self.conn.execute("INSERT INTO kb_meta VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", [key, str(value)])
            self._model_info = None
            self._register()
            info = self.model_info()
        self.check_model(model_id)
        if info["dim"] != dim:
            raise ModelMismatch(f"index dimension {info['dim']} but the embedding model gives {dim}")

    def check_model(self, model_id: str) -> None:
        info = self.model_info()
        if info and info["embedding_model"] != model_id:
            raise ModelMismatch(
                f"this knowledge base was built with the embedding model {info['embedding_model']!r}, not {model_id!r}",
                hint="use the same --embedding-model, or another store for the other model")

    # --- documents ------------------------------------------------------------------------------

    def _chunks_ready(self) -> bool:
        return self.model_info() is not None

    def document(self, path: str) -> StoredDocument | None:
        row = self.conn.execute("SELECT id, path, hash, size, mtime, root FROM kb_documents WHERE path = %s",
                                [path]).fetchone()
        return StoredDocument(*row) if row else None

    def documents_under(self, root: str) -> list[StoredDocument]:
        prefix = root.rstrip(os.sep) + os.sep
        rows = self.conn.execute(
            "SELECT id, path, hash, size, mtime, root FROM kb_documents WHERE path = %s OR left(path, %s) = %s",
            [root, len(prefix), prefix]).fetchall()
        return [StoredDocument(*r) for r in rows]

    def touch_document(self, doc_id: int, mtime: float, size: int, root: str) -> None:
        self.conn.execute("UPDATE kb_documents SET mtime = %s, size = %s, root = %s WHERE id = %s",
                          [mtime, size, root, doc_id])

    def replace_document(self, *, path: str, root: str, file_type: str, title: str, file_hash: str, size: int,
                         mtime: float, metadata: dict, chunks: list[Chunk], vectors: np.ndarray,
                         embed_hashes: list[str] | None = None) -> tuple[list[int], list[int]]:
        """One document with its chunks, replacing any earlier version, in one transaction."""
        tags = metadata.get("tags") or []
        tags = [tags] if isinstance(tags, str) else tags
        date = metadata.get("date")
        record = [root, file_type, title, file_hash, size, mtime, json.dumps(metadata, default=str, ensure_ascii=False),
                  json.dumps([str(t) for t in tags], ensure_ascii=False), str(date)[:10] if date else None,
                  len(chunks), time.time()]
        with self._transaction():
            old = self.conn.execute("SELECT id FROM kb_documents WHERE path = %s FOR UPDATE", [path]).fetchone()
            removed: list[int] = []
            if old:
                doc_id = old[0]
                removed = [r[0] for r in self.conn.execute("DELETE FROM kb_chunks WHERE doc_id = %s RETURNING id", [doc_id])]
                self.conn.execute(
                    "UPDATE kb_documents SET root=%s, file_type=%s, title=%s, hash=%s, size=%s, mtime=%s, metadata=%s, "
                    "tags=%s, date=%s, n_chunks=%s, ingested_at=%s WHERE id = %s", [*record, doc_id])
            else:
                doc_id = self.conn.execute(
                    "INSERT INTO kb_documents (path, root, file_type, title, hash, size, mtime, metadata, tags, date, "
                    "n_chunks, ingested_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                    [path, *record]).fetchone()[0]
            rows = []
            leads = chunk_leads([(c.heading, c.text) for c in chunks])
            for chunk, vector, digest, lead in zip(chunks, vectors, embed_hashes or [None] * len(chunks), leads):
                terms = chunk_term_list(title, chunk.heading, chunk.text, lead)
                rows.append((doc_id, chunk.ord, chunk.text, chunk.heading, chunk.page, chunk.n_tokens,
                             np.asarray(vector, dtype=np.float32), digest, tsvector_literal(terms), len(terms)))
            new_ids = []
            with self.conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO kb_chunks (doc_id, ord, text, heading, page, n_tokens, embedding, embed_hash, terms, "
                    "n_terms) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s::tsvector,%s) RETURNING id", rows, returning=True)
                while True:
                    new_ids.extend(r[0] for r in cur.fetchall())
                    if not cur.nextset():
                        break
            self._bump_generation()
        self._written += len(removed) + len(new_ids)
        return removed, new_ids

    def delete_document(self, path: str) -> list[int]:
        with self._transaction():
            row = self.conn.execute("SELECT id FROM kb_documents WHERE path = %s FOR UPDATE", [path]).fetchone()
            if not row:
                return []
            removed = [r[0] for r in self.conn.execute("DELETE FROM kb_chunks WHERE doc_id = %s RETURNING id", [row[0]])] \
                if self._chunks_ready() else []
            self.conn.execute("DELETE FROM kb_documents WHERE id = %s", [row[0]])
            self._bump_generation()
        self._written += len(removed)
        return removed

    def list_documents(self) -> list[dict]:
        rows = self.conn.execute("SELECT path, title, file_type, n_chunks, date, ingested_at, size FROM kb_documents "
                                 "ORDER BY ingested_at DESC, path").fetchall()
        return [{"path": r[0], "title": r[1] or "", "file_type": r[2], "chunks": r[3], "date": r[4],
                 "ingested_at": r[5], "size": r[6]} for r in rows]

    def all_documents(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT path FROM kb_documents ORDER BY path")]

    def documents_by_type(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT file_type, count(*) FROM kb_documents GROUP BY file_type").fetchall())

    def counts(self) -> tuple[int, int]:
        docs = self.conn.execute("SELECT count(*) FROM kb_documents").fetchone()[0]
        chunks = self.conn.execute("SELECT count(*) FROM kb_chunks").fetchone()[0] if self._chunks_ready() else 0
        return docs, chunks

    def has_chunks(self) -> bool:
        return self._chunks_ready() and self.conn.execute("SELECT 1 FROM kb_chunks LIMIT 1").fetchone() is not None

    def iter_chunks(self) -> Iterator[tuple[int, str, str, str]]:
        if not self._chunks_ready():
            return
        last = 0
        while True:  # in pages, so that a million chunks are never all in memory
            rows = self.conn.execute(
                "SELECT c.id, d.title, c.heading, c.text FROM kb_chunks c JOIN kb_documents d ON d.id = c.doc_id "
                "WHERE c.id > %s ORDER BY c.id LIMIT 5000", [last]).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    def size_bytes(self) -> int:
        return int(self.conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r' "
            "AND c.relname LIKE 'kb\\_%%'").fetchone()[0])

    # --- search -----------------------------------------------------------------------------------

    def _filter_sql(self, filters: Filters | None) -> tuple[str, list]:
        if filters is None or not filters.active():
            return "true", []
        where, params = [], []
        if filters.glob:
            where.append("d.path ~ %s")
            params.append(glob_to_regex(filters.glob))
        for tag in filters.tags:
            where.append("EXISTS (SELECT 1 FROM jsonb_array_elements_text(d.tags) t WHERE lower(t) = lower(%s))")
            params.append(tag)
        if filters.date_from:
            where.append("d.date >= %s")
            params.append(filters.date_from)
        if filters.date_to:
            where.append("d.date <= %s")
            params.append(filters.date_to)
        if filters.file_types:
            where.append("d.file_type = ANY(%s)")
            params.append(filters.types)
        return " AND ".join(where), params

    def dense_search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """Cosine similarity over the HNSW index (exact when a filter leaves the index short of k rows)."""
        if not self._chunks_ready():
            raise NotIngested(f"the knowledge base in {self.location} is empty")
        q = np.asarray(vector, dtype=np.float32)
        where, params = self._filter_sql(filters)
        select = ("SELECT c.id, 1 - (c.embedding <=> %s) FROM kb_chunks c JOIN kb_documents d ON d.id = c.doc_id "
                  f"WHERE {where} ORDER BY c.embedding <=> %s LIMIT %s")
        with self._reader_lock:
            conn = self._dense_connection()
            with conn.transaction():
                conn.execute(f"SET LOCAL hnsw.ef_search = {max(40, 2 * k)}")
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                rows = conn.execute(select, [q, *params, q, k]).fetchall()
            if filters is not None and filters.active() and len(rows) < k:
                allowed = conn.execute(f"SELECT count(*) FROM kb_chunks c JOIN kb_documents d ON d.id = c.doc_id "
                                       f"WHERE {where}", params).fetchone()[0]
                if allowed > len(rows):
                    with conn.transaction():
                        conn.execute("SET LOCAL enable_indexscan = off")
                        rows = conn.execute(select, [q, *params, q, k]).fetchall()
        return sorted(((int(i), float(s)) for i, s in rows), key=lambda r: -r[1])

    # A hybrid search runs dense_search in a thread while lexical_search runs on self.conn: measured at 1M
    # chunks, the two queries in two server processes (benchmarks/scale.py, docs/retrieval.md).
    concurrent_dense = True

    def _dense_connection(self):
        if self._reader is None:
            self._reader = self._connect()
            self._register_vector(self._reader)
        return self._reader

    def _stats_cache(self) -> tuple:
        generation = self.generation
        if self._stats is None or self._stats[0] != generation:
            n, avg = self.conn.execute("SELECT count(*), coalesce(avg(n_terms), 1) FROM kb_chunks").fetchone() \
                if self._chunks_ready() else (0, 1.0)
            self._stats = (generation, int(n), float(avg), {})
        return self._stats

    def fts_size(self) -> int:
        return self._stats_cache()[1]

    def doc_freqs(self, terms: list[str]) -> tuple[int, dict[str, int]]:
        """(chunks, chunks containing each term), cached until the index changes. Counting is exact below
        DF_ESTIMATE_FROM chunks. From there on, counting a common term's rows costs seconds (1.8 s for a term in
        99% of 1M chunks, each row's page visited), so a term among the most common elements that ANALYZE
        keeps for the `terms` column (10,000 of them, TERMS_STATISTICS) takes its frequency from there,
        and any other term is counted up to DF_COUNT_CAP rows (its IDF barely changes beyond that)."""
        _, total, _, cache = self._stats_cache()
        estimate = total >= DF_ESTIMATE_FROM
        common = self._common_elements() if estimate and any(t not in cache for t in terms) else {}
        for term in terms:
            if term in cache:
                continue
            literal = tsquery_literal([term])
            if not literal or not self._chunks_ready():
                cache[term] = 0
            elif term in common:
                cache[term] = max(1, round(common[term] * total))
            else:
                # counted: in a large database up to DF_COUNT_CAP rows, else up to just over half the rows, as
                # SQLite's (IDF is at its floor from there on)
                cache[term] = self.conn.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM kb_chunks WHERE terms @@ %s::tsquery LIMIT %s) s",
                    [literal, DF_COUNT_CAP if estimate else total // 2 + 1]).fetchone()[0]
        return total, {t: cache[t] for t in terms}

    def _common_elements(self) -> dict[str, float]:
        """ANALYZE's most common lexemes of the `terms` column and the share of rows holding each (read again
        at most once a minute while there are none yet, e.g. before autovacuum's first ANALYZE)."""
        loaded = self._elements
        if loaded is not None and (loaded[1] or time.monotonic() - loaded[0] < 60):
            return loaded[1]
        row = self.conn.execute(
            "SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
            "WHERE schemaname = current_schema() AND tablename = 'kb_chunks' AND attname = 'terms'").fetchone()
        elements = dict(zip(row[0], row[1])) if row and row[0] else {}
        self._elements = (time.monotonic(), elements)
        return elements

    def _analyze_if_stale(self) -> None:
        """After a large ingest: fresh statistics for doc_freqs' estimates (a sample of 300,000 rows; 7 s at 1M)."""
        total = self.fts_size()
        if total >= DF_ESTIMATE_FROM and self._written * 10 > total:  # autovacuum's own rule: 10% changed
            self.conn.execute("ANALYZE kb_chunks")
            self._elements = None
        self._written = 0

    def lexical_search(self, terms: list[str], k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """BM25 (as SQLite's FTS5 computes it) over candidate chunks, each scored with every term; higher is
        better. The candidates: the chunks matching any of the rarest terms within MAX_LEXICAL_CANDIDATES rows,
        or, when even the rarest term is in more rows than that, those holding the rarest terms together."""
        terms = [t for t in dict.fromkeys(terms) if tsquery_literal([t])]
        if not terms or not self._chunks_ready():
            return []
        _, total, avgdl, _ = self._stats_cache()
        _, df = self.doc_freqs(terms)
        terms = [t for t in terms if df[t] > 0]
        if not terms:
            return []
        ordered = sorted(terms, key=lambda t: df[t])
        if df[ordered[0]] <= MAX_LEXICAL_CANDIDATES:
            candidates = tsquery_literal(rarest_within(terms, df, MAX_LEXICAL_CANDIDATES))
        else:
            # even the rarest term is in too many rows to score them all (10 us each): the candidates hold the
            # rarest terms together, as many as it takes for about MAX_LEXICAL_CANDIDATES rows (independence
            # assumed); past the cap, the rows PostgreSQL finds first
            kept, expected = [], float(total)
            for t in ordered:
                kept.append(t)
                expected *= df[t] / max(total, 1)
                if expected <= MAX_LEXICAL_CANDIDATES:
                    break
            candidates = " & ".join(f"'{_quote(t)}'" for t in kept)
        idf = [bm25_idf(total, df[t]) for t in terms]
        where, params = self._filter_sql(filters)
        sql = f"""
            WITH q(term, idf) AS (SELECT * FROM unnest(%s::text[], %s::float8[])),
            cand AS (SELECT c.id, c.terms, c.n_terms FROM kb_chunks c JOIN kb_documents d ON d.id = c.doc_id
                     WHERE c.terms @@ %s::tsquery AND {where} LIMIT %s)
            SELECT cand.id, sum(q.idf * (cardinality(u.positions) * {BM25_K1 + 1}) /
                   (cardinality(u.positions) + {BM25_K1} * (1 - {BM25_B} + {BM25_B} * cand.n_terms / %s)))
            FROM cand CROSS JOIN LATERAL unnest(ts_filter(setweight(cand.terms, 'A', %s::text[]), '{{a}}'))
                AS u(lexeme, positions, weights)
            JOIN q ON q.term = u.lexeme
            GROUP BY cand.id ORDER BY 2 DESC LIMIT %s"""
        # only the query's lexemes of each candidate are unnested (marked with weight A, the others dropped, in C):
        # 29 ms instead of 73 for 3,000 candidates at 1M chunks
        rows = self.conn.execute(
            sql, [terms, idf, candidates, *params, LEXICAL_CANDIDATE_CAP, avgdl, terms, k]).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    def hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        rows = self.conn.execute(
            "SELECT c.id, c.text, c.heading, c.page, d.path, d.title, d.file_type, d.metadata FROM kb_chunks c "
            "JOIN kb_documents d ON d.id = c.doc_id WHERE c.id = ANY(%s)", [[i for i, _ in scored]]).fetchall()
        by_id = {r[0]: r for r in rows}
        return [Hit(chunk_id=i, score=s, text=r[1], heading=r[2] or "", page=r[3], path=r[4], title=r[5] or "",
                    file_type=r[6] or "", metadata=r[7] or {})
                for i, s in scored if (r := by_id.get(i)) is not None]

    def chunk_vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        if not ids or not self._chunks_ready():
            return {}
        rows = self.conn.execute("SELECT id, embedding FROM kb_chunks WHERE id = ANY(%s)", [list(ids)]).fetchall()
        return {r[0]: _as_array(r[1]) for r in rows if r[1] is not None}

    def section_leads(self, ids: list[int]) -> dict[int, str]:
        if not ids or not self._chunks_ready():
            return {}
        rows = self.conn.execute(
            "SELECT c.id, f.id, left(f.text, %s) FROM kb_chunks c JOIN kb_chunks f ON f.id = ("
            "SELECT g.id FROM kb_chunks g WHERE g.doc_id = c.doc_id AND coalesce(g.heading, '') = coalesce(c.heading, '') "
            "ORDER BY g.ord LIMIT 1) WHERE c.id = ANY(%s)", [4 * LEAD_CHARS, list(ids)]).fetchall()
        return {r[0]: section_lead(r[2]) for r in rows if r[0] != r[1] and r[2]}

    def vectors_by_embed_hash(self, hashes: list[str]) -> dict[str, np.ndarray]:
        if not hashes or not self._chunks_ready():
            return {}
        rows = self.conn.execute("SELECT DISTINCT ON (embed_hash) embed_hash, embedding FROM kb_chunks "
                                 "WHERE embed_hash = ANY(%s)", [list(dict.fromkeys(hashes))]).fetchall()
        return {r[0]: _as_array(r[1]) for r in rows}

    # --- ingest bookkeeping ---------------------------------------------------------------------------

    @contextmanager
    def write_lock(self, *, timeout: float = 0.0, on_wait=None) -> Iterator[None]:
        """An advisory lock on the database (one writing process at a time, on any machine)."""
        lock = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                     application_name=f"kb pid {os.getpid()} on {socket.gethostname()}"[:63])
        try:
            key = [_LOCK_KEY]
            deadline = time.monotonic() + timeout
            waited = False
            while not lock.execute("SELECT pg_try_advisory_lock(%s)", key).fetchone()[0]:
                holder = lock.execute(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objid::bigint = (%s::bigint & 4294967295) LIMIT 1",
                    key).fetchone()
                holder = holder[0] if holder and holder[0] else "another kb process"
                if time.monotonic() >= deadline:
                    raise Locked(f"the knowledge base in {self.location} is being written by {holder}",
                                 hint="wait for that ingest to finish, or pass --wait SECONDS to wait for it")
                if not waited and on_wait:
                    on_wait(holder)
                waited = True
                time.sleep(0.2)
            try:
                yield
            finally:
                lock.execute("SELECT pg_advisory_unlock(%s)", key)
        finally:
            lock.close()

    def prepare_writes(self, expected_files: int = 0) -> None:
        """Before an ingest of `expected_files` new or changed files. A bulk load (at least BULK_LOAD_FILES files,
        more than the database holds already) goes in without the HNSW index, which `save_vectors` builds once
        at the end: inserting each row into the graph is about ten times slower than the rest of its write
        (measured: 270-360 against 2,700 chunks/s on 2 cores), and pgvector builds an index faster than it
        grows one. Meanwhile dense search reads every row (exact, slower); an ingest that stops half-way leaves
        the index to the next ingest's end."""
        if expected_files < BULK_LOAD_FILES or not self._chunks_ready():
            return
        documents = self.conn.execute("SELECT count(*) FROM kb_documents").fetchone()[0]
        if expected_files > documents and self._has_vector_index():
            self.conn.execute("DROP INDEX IF EXISTS kb_chunks_embedding")

    def _has_vector_index(self) -> bool:
        return self._table_exists("kb_chunks_embedding")

    def save_vectors(self, *, final: bool = True) -> None:
        """The vectors live in the database; at the end of an ingest (`final`), the HNSW index is built if a bulk
        load (or an ingest that stopped) left it missing, with enough maintenance memory for the graph to be
        built in memory (pgvector slows down many times once it spills)."""
        if not final or not self._chunks_ready():
            return
        self._analyze_if_stale()
        if self._has_vector_index():
            return
        rows, dim = self.conn.execute(
            "SELECT count(*), coalesce(max(vector_dims(embedding)), 0) FROM kb_chunks").fetchone()
        graph_mb = int(rows * (4 * dim + 300) * 1.3 / 2**20)  # vectors plus neighbour lists, with room to spare
        with self._transaction():
            self.conn.execute(f"SET LOCAL maintenance_work_mem = '{min(max(graph_mb, 64), HNSW_BUILD_MAX_MB)}MB'")
            self.conn.execute(
                "CREATE INDEX IF NOT EXISTS kb_chunks_embedding ON kb_chunks USING hnsw (embedding vector_cosine_ops)")

    def log_ingest(self, started_at: float, paths: list[str], report: dict) -> None:
        with self._transaction():
            self.conn.execute("INSERT INTO kb_ingests (started_at, finished_at, paths, report) VALUES (%s,%s,%s,%s)",
                              [started_at, time.time(), json.dumps(paths, ensure_ascii=False),
                               json.dumps(report, ensure_ascii=False, default=str)])
            self.conn.execute("INSERT INTO kb_meta VALUES ('last_ingest', %s) ON CONFLICT (key) DO UPDATE "
                              "SET value = excluded.value", [str(time.time())])

    # --- the ask log and conversations ------------------------------------------------------------

    def log_ask(self, record: dict) -> int:
        return self.conn.execute(
            "INSERT INTO kb_asks (at, question, standalone, answer, refused, sources, model, timings, conversation_id) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
            [record.get("at", time.time()), record.get("question"), record.get("standalone"), record.get("answer"),
             bool(record.get("refused")), json.dumps(record.get("sources") or [], ensure_ascii=False),
             record.get("model"), json.dumps(record.get("timings") or {}), record.get("conversation_id")]).fetchone()[0]

    def recent_asks(self, limit: int = 10) -> list[dict]:
        rows = self.conn.execute("SELECT id, at, question, answer, refused, sources, model, timings, conversation_id "
                                 "FROM kb_asks ORDER BY id DESC LIMIT %s", [limit]).fetchall()
        return [{"id": r[0], "at": r[1], "question": r[2], "answer": r[3], "refused": bool(r[4]), "sources": r[5] or [],
                 "model": r[6], "timings": r[7] or {}, "conversation_id": r[8]} for r in rows]

    def new_conversation(self, persona: str) -> int:
        now = time.time()
        return self.conn.execute("INSERT INTO kb_conversations (started_at, updated_at, persona, summary, title) "
                                 "VALUES (%s, %s, %s, '', '') RETURNING id", [now, now, persona]).fetchone()[0]

    def last_conversation_id(self) -> int | None:
        row = self.conn.execute("SELECT id FROM kb_conversations ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def conversation(self, conversation_id: int, *, summarized: bool = False) -> dict | None:
        row = self.conn.execute("SELECT id, title, persona, summary FROM kb_conversations WHERE id = %s",
                                [conversation_id]).fetchone()
        if row is None:
            return None
        condition = "" if summarized else " AND NOT summarized"
        messages = [{"role": r[0], "content": r[1], "sources": r[2] or [], "at": r[3]} for r in self.conn.execute(
            f"SELECT role, content, sources, at FROM kb_messages WHERE conversation_id = %s{condition} ORDER BY id",
            [conversation_id]).fetchall()]
        return {"id": row[0], "title": row[1] or "", "persona": row[2] or "", "summary": row[3] or "", "messages": messages}

    def add_turn(self, conversation_id: int, question: str, answer: str, sources: list[dict]) -> None:
        now = time.time()
        with self._transaction():
            self.conn.execute("INSERT INTO kb_messages (conversation_id, role, content, sources, at) VALUES "
                              "(%s, 'user', %s, '[]', %s), (%s, 'assistant', %s, %s, %s)",
                              [conversation_id, question, now, conversation_id, answer,
                               json.dumps(sources, ensure_ascii=False), now])
            self.conn.execute("UPDATE kb_conversations SET updated_at = %s, title = CASE WHEN title = '' THEN %s "
                              "ELSE title END WHERE id = %s", [now, question[:80], conversation_id])

    def fold_into_summary(self, conversation_id: int, summary: str, keep_last: int) -> None:
        with self._transaction():
            ids = [r[0] for r in self.conn.execute("SELECT id FROM kb_messages WHERE conversation_id = %s AND NOT "
                                                   "summarized ORDER BY id", [conversation_id])]
            folded = ids[: max(len(ids) - keep_last, 0)]
            if folded:
                self.conn.execute("UPDATE kb_messages SET summarized = true WHERE id = ANY(%s)", [folded])
            self.conn.execute("UPDATE kb_conversations SET summary = %s, updated_at = %s WHERE id = %s",
                              [summary, time.time(), conversation_id])

    def set_persona(self, conversation_id: int, persona: str) -> None:
        self.conn.execute("UPDATE kb_conversations SET persona = %s WHERE id = %s", [persona, conversation_id])

    def list_conversations(self, limit: int = 50) -> list[dict]:
        rows = self.conn.execute(
            "SELECT c.id, c.title, c.persona, c.started_at, c.updated_at, "
            "(SELECT count(*) FROM kb_messages m WHERE m.conversation_id = c.id) FROM kb_conversations c "
            "ORDER BY c.updated_at DESC, c.id DESC LIMIT %s", [limit]).fetchall()
        return [{"id": r[0], "title": r[1] or "", "persona": r[2] or "", "started_at": r[3], "updated_at": r[4],
                 "messages": r[5]} for r in rows]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["PostgresStore", "StoreUnavailable", "tsvector_literal", "tsquery_literal", "glob_to_regex", "safe_url"]
