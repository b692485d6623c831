"""The embedded store: SQLite (documents, chunks, vectors, full-text, logs) plus a FAISS cache, in the home.

SQLite is the source of truth, vectors included. The FAISS file is a cache of those vectors, stamped with
the `generation` of the database it reflects; when a crash leaves the two apart, opening the store brings
the cache up to date from SQLite. Every change to one document is one SQLite transaction, so a process
killed at any moment leaves each document either wholly old or wholly new.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sqlite_utils

from kb.errors import DamagedIndex, Locked, ModelMismatch, NotIngested
from kb.store import (BM25_B, BM25_K1, LEAD_CHARS, Filters, StoredDocument, batches, bm25_idf, chunk_leads,
                      chunk_terms, iter_leads, rarest_within, section_lead)
from kb.text import fts_query, has_unspaced
from kb.types import Chunk, Hit

SCHEMA_VERSION = 2
DB_NAME = "kb.db"
INDEX_NAME = "vectors.faiss"
LOCK_NAME = "write.lock"
_INDEX_MAGIC = b"KBFAISS1"
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2 tokenchars '.'"

MIGRATIONS = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["documents"].create(
        {
            "id": int,
            "path": str,
            "root": str,
            "file_type": str,
            "title": str,
            "hash": str,
            "size": int,
            "mtime": float,
            "metadata": str,
            "tags": str,
            "date": str,
            "n_chunks": int,
            "ingested_at": float,
        },
        pk="id",
    )
    db["documents"].create_index(["path"], unique=True)
    db["documents"].create_index(["root"])
    db["chunks"].create(
        {
            "id": int,
            "doc_id": int,
            "ord": int,
            "text": str,
            "heading": str,
            "page": int,
            "n_tokens": int,
            "vector": bytes,
        },
        pk="id",
        foreign_keys=[("doc_id", "documents", "id")],
    )
    db["chunks"].create_index(["doc_id"])
    db.execute(
        "CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize='porter unicode61 remove_diacritics 2')"
    )
    db["ingests"].create(
        {"id": int, "started_at": float, "finished_at": float, "paths": str, "report": str}, pk="id"
    )


@migration
def m002_asks_and_conversations(db: sqlite_utils.Database) -> None:
    db["conversations"].create(
        {"id": int, "started_at": float, "updated_at": float, "persona": str, "summary": str, "title": str},
        pk="id",
    )
    db["messages"].create(
        {"id": int, "conversation_id": int, "role": str, "content": str, "sources": str, "at": float,
         "summarized": int},
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db["messages"].create_index(["conversation_id"])
    db["asks"].create(
        {"id": int, "at": float, "question": str, "standalone": str, "answer": str, "refused": int,
         "sources": str, "model": str, "timings": str, "conversation_id": int},
        pk="id",
    )


@migration
def m003_cjk_unigrams_in_full_text(db: sqlite_utils.Database) -> None:
    """Re-derive the full-text terms: CJK text is now indexed as unigrams and bigrams (kb.text.lexical_terms)."""
    rows = db.execute(
        "SELECT c.id, d.title, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id"
    ).fetchall()
    for chunk_id, title, heading, text in rows:
        if has_unspaced(f"{title}{heading}{text}"):
            db.execute("DELETE FROM chunks_fts WHERE rowid = ?", [chunk_id])
            db.execute("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)", [chunk_id, chunk_terms(title, heading, text)])


@migration
def m004_chunk_embed_hash(db: sqlite_utils.Database) -> None:
    """A hash of what the embedder was given for each chunk, so that an unchanged chunk (a renamed file, an
    untouched section of an edited one) reuses its vector. Chunks stored before have none and are re-embedded."""
    db.execute("ALTER TABLE chunks ADD COLUMN embed_hash TEXT")
    db.execute("CREATE INDEX idx_chunks_embed_hash ON chunks (embed_hash)")


@migration
def m005_dotted_numbers_in_full_text(db: sqlite_utils.Database) -> None:
    """Dotted numbers (versions, decimals) are now one term (kb.text.lexical_terms): the full-text table keeps '.'
    inside a token, and every row is re-derived. kb's stored terms hold no other '.', so nothing else changes."""
    db.execute("DROP TABLE IF EXISTS chunks_fts")
    db.execute(f"CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize=\"{FTS_TOKENIZER}\")")
    rows = db.execute("SELECT c.id, d.title, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id")
    db.conn.executemany("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)",
                        ((i, chunk_terms(t, h, x)) for i, t, h, x in rows))


_LEAD_ROWS = ("SELECT c.doc_id, c.heading, c.text, c.id, d.title FROM chunks c JOIN documents d ON d.id = c.doc_id "
              "ORDER BY c.doc_id, c.ord")


@migration
def m006_section_leads_in_full_text(db: sqlite_utils.Database) -> None:
    """A chunk that does not open its section is now indexed with the section's first sentence too
    (kb.store.section_lead): re-derive the full-text rows of those chunks."""
    changed = ((chunk_id, chunk_terms(title, heading, text, lead))
               for (_, heading, text, chunk_id, title), lead in iter_leads(db.conn.execute(_LEAD_ROWS)) if lead)
    for batch in batches(changed, 5000):
        db.conn.executemany("DELETE FROM chunks_fts WHERE rowid = ?", [(i,) for i, _ in batch])
        db.conn.executemany("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)", batch)


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One atomic write. Needed explicitly: sqlite-utils' execute() commits every write made outside an open
    transaction, and Python's `with conn:` only commits at the end, it never begins one. Not `db.atomic()`:
    that begins a deferred transaction, and one that reads before it writes (a migration, a document
    replacement) fails with SQLITE_BUSY when another process wrote meanwhile; BEGIN IMMEDIATE takes the write
    lock first and waits for it. sqlite-utils' own writes inside nest as savepoints. Nested: joins the outer."""
    conn = db.conn
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


def migrate(db: sqlite_utils.Database, where: str = "") -> None:
    """Apply the migrations this database has not seen yet, each once, in order."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
    if done and any(fn.__name__ not in done for fn in MIGRATIONS):
        # a home written by an earlier kb: some migrations re-derive every chunk's terms (minutes at 1M chunks)
        print(f"kb: upgrading the index {where} to this version of kb (once)", file=sys.stderr, flush=True)
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with transaction(db):  # BEGIN IMMEDIATE: a second process opening the same home waits, then skips
            if db.execute("SELECT 1 FROM _migrations WHERE name = ?", [fn.__name__]).fetchone():
                continue
            fn(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", [fn.__name__, time.time()])


def _busy(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _enable_wal(db: sqlite_utils.Database, wait: float = 60.0) -> None:
    """Switch to write-ahead logging (once per database; a no-op after). Two processes creating the same home at
    once race for it, and SQLite answers the loser "database is locked" at once, without its busy wait: retried
    here."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class WriteLock:
    """An exclusive advisory lock on the home folder, held while a process writes to the store."""

    def __init__(self, home: Path):
        self.path = home / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, *, timeout: float = 0.0, on_wait=None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Locked(
                        f"the knowledge base {self.path.parent} is being written by pid {holder}",
                        hint="wait for that `kb ingest` to finish, or pass --wait SECONDS to wait for it",
                    ) from None
                if not waited and on_wait:
                    on_wait(holder)
                waited = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


PARALLEL_FROM = 250_000
MAX_LEXICAL_ROWS = 100_000  # rows one full-text query scores before the common terms are added per candidate
RESCORE_FACTOR, RESCORE_MIN = 10, 500  # candidates (per result asked, and at least) that get the common terms
TERM_SAMPLE_FROM = 50_000  # chunks; from here on common terms' document frequencies come from a stored sample
TERM_SAMPLE_ROWS = 20_000  # chunks in that sample
TERM_SAMPLE_MIN_SHARE = 0.01  # terms in at least this share of the sample are kept (a 1% share: 200 hits)
IVF_FROM = 200_000  # vectors; from here on the vector cache is an inverted-file index (VectorIndex.optimize)
IVF_LISTS_PER_ROOT = 4  # centroids: 4 * sqrt(n), 4,000 at 1M vectors
IVF_PROBE_SHARE = 1 / 16  # of the centroids' groups one query scans (6%; at least 32 groups)
IVF_TRAIN_PER_LIST = 40  # training sample: vectors per centroid


def ivf_lists(n: int) -> int:
    return max(1, int(IVF_LISTS_PER_ROOT * math.sqrt(n)))


def ivf_probes(lists: int) -> int:
    return min(lists, max(32, int(lists * IVF_PROBE_SHARE)))


class VectorIndex:
    """A FAISS inner-product index over unit vectors, keyed by chunk id, saved with the generation it reflects.

    Up to IVF_FROM vectors, a flat (exact) scan. From IVF_FROM on, `optimize` (at the end of an ingest) turns it
    into an inverted-file index: the vectors grouped around IVF_LISTS_PER_ROOT * sqrt(n) k-means centroids, a
    query scanning the groups of its IVF_PROBE_SHARE nearest centroids (recall against the exact scan and the
    speed at 1M vectors: benchmarks/scale.py). Filtered searches scan every group: exact, as fast as flat.
    """

    def __init__(self, dim: int):
        import faiss

        # One query at a time: FAISS's OpenMP threads only add start-up cost (measured: 1 thread is as fast
        # or faster from 1k to 100k vectors, and 4 ms faster per search while numpy's BLAS threads are busy).
        faiss.omp_set_num_threads(1)
        self.dim = dim
        # Vectors held as float16 (exact float32 copies stay in SQLite): a flat scan reads half the memory,
        # 2.8 ms instead of 6.2 ms per query at 100k x 384 here; scores move by about 1e-3 at most.
        flat16 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        self.index = faiss.IndexIDMap2(flat16)
        self.generation = -1

    @property
    def size(self) -> int:
        return self.index.ntotal

    def _ivf(self):
        import faiss

        return faiss.try_extract_index_ivf(self.index)

    def ids(self) -> np.ndarray:
        import faiss

        ivf = self._ivf()
        if ivf is None:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        lists = ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(ivf.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: Iterable[int]) -> None:
        import faiss

        ids = np.fromiter(ids, dtype=np.int64)
        if len(ids):
            self.index.remove_ids(faiss.IDSelectorBatch(ids))

    def optimize(self, vectors_of) -> bool:
        """From IVF_FROM vectors on, (re)build the inverted-file index when there is none yet or the index has
        grown four times since its centroids were trained. `vectors_of(ids)` gives (the ids found, their float32
        vectors), from SQLite: exact copies. True when it rebuilt."""
        import faiss

        n = self.size
        ivf = self._ivf()
        wanted = ivf_lists(n)
        if n < IVF_FROM or (ivf is not None and ivf.nlist * 2 >= wanted):
            return False
        ids = np.sort(self.ids())
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(ids, size=min(len(ids), wanted * IVF_TRAIN_PER_LIST), replace=False))
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, wanted, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        quantizer.this.disown()
        index.own_fields = True
        index.cp.niter = 10
        index.train(vectors_of(sample)[1])
        for start in range(0, len(ids), 50_000):
            found, vectors = vectors_of(ids[start:start + 50_000])
            index.add_with_ids(vectors, found)
        self.index = index
        return True

    def _threads(self) -> None:
        import faiss

        # A flat scan of a large index is memory-bound work that splits well: from PARALLEL_FROM vectors on,
        # every core scans a share (below it, OpenMP's start-up costs more than it saves; see __init__).
        faiss.omp_set_num_threads((os.cpu_count() or 1) if self.size >= PARALLEL_FROM else 1)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        import faiss

        if self.size == 0:
            return []
        ivf = self._ivf()
        q = np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
        if ivf is None:
            self._threads()
            scores, ids = self.index.search(q, k)
        else:
            faiss.omp_set_num_threads(1)  # a few thousand vectors: one thread is faster
            params = faiss.SearchParametersIVF(nprobe=ivf_probes(ivf.nlist))
            scores, ids = self.index.search(q, k, params=params)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1]

    def search_among(self, query: np.ndarray, k: int, allowed: set[int]) -> list[tuple[int, float]]:
        """Search restricted to the chunk ids in `allowed` (metadata filters): exact, every vector compared."""
        import faiss

        if self.size == 0:
            return []
        self._threads()
        selector = faiss.IDSelectorBatch(np.fromiter(allowed, dtype=np.int64))
        ivf = self._ivf()
        params = faiss.SearchParameters(sel=selector) if ivf is None else \
            faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nlist)
        scores, ids = self.index.search(
            np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), min(k, len(allowed)), params=params
        )
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i != -1]

    def save(self, path: Path, generation: int) -> None:
        import faiss

        payload = faiss.serialize_index(self.index)
        header = _INDEX_MAGIC + struct.pack("<qi", generation, self.dim)
        _atomic_write(path, header + payload.tobytes())
        self.generation = generation

    @classmethod
    def load(cls, path: Path, dim: int) -> "VectorIndex":
        import faiss

        vi = cls(dim)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return vi
        head = len(_INDEX_MAGIC) + 12
        if len(data) < head or not data.startswith(_INDEX_MAGIC):
            return vi  # unreadable cache: rebuilt from SQLite by the caller
        generation, stored_dim = struct.unpack("<qi", data[len(_INDEX_MAGIC) : head])
        if stored_dim != dim:
            return vi
        vi.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8, offset=head))
        vi.generation = generation
        return vi


class SQLiteStore:
    """Documents, chunks, vectors, full-text terms, chats and the ask log of one home, in SQLite + FAISS."""

    concurrent_dense = False  # one SQLite connection, used from the thread that opened it

    def __init__(self, home: Path, *, create: bool = False):
        self.home = Path(home)
        self.db_path = self.home / DB_NAME
        self.location = str(self.db_path)
        self.index_path = self.home / INDEX_NAME
        if not self.db_path.exists() and not create:
            raise NotIngested(f"no knowledge base at {self.home}")
        self.home.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=60, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        try:
            _enable_wal(self.db)
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            migrate(self.db, str(self.db_path))
        except sqlite3.DatabaseError as e:
            conn.close()
            if isinstance(e, sqlite3.OperationalError) and _busy(e):
                raise Locked(f"the knowledge base database {self.db_path} stayed busy: {e}",
                             hint="another kb process is writing to it; try again when it is done") from e
            raise DamagedIndex(f"the knowledge base database {self.db_path} is damaged ({e})",
                               hint="run `kb doctor --repair`: it moves the damaged file aside and rebuilds the "
                                    "index from your files") from e
        self._vectors: VectorIndex | None = None
        self._model_info: dict | None = None
        self._stats: dict | None = None  # what the index's statistics are until it changes (_index_stats)

    # --- metadata -------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, **values) -> None:
        with transaction(self.db):
            for key, value in values.items():
                self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, str(value)])

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0"))

    def model_info(self) -> dict | None:
        # Cached: the embedding model of a home never changes once bound, and searches ask on every call.
        if self._model_info is None:
            self._model_info = self._read_model_info()
        return self._model_info

    def _read_model_info(self) -> dict | None:
        model = self.get_meta("embedding_model")
        if model is None:
            return None
        return {
            "embedding_model": model,
            "dim": int(self.get_meta("dim", "0")),
            "max_tokens": int(self.get_meta("max_tokens", "0")),
            "chunk_overlap": int(self.get_meta("chunk_overlap", "0")),
        }

    def bind_model(self, model_id: str, dim: int, max_tokens: int, chunk_overlap: int) -> None:
        """Record the embedding model of this index, or refuse one that differs from the recorded one."""
        info = self.model_info()
        if info is None:
            self.set_meta(
                embedding_model=model_id,
                dim=dim,
                max_tokens=max_tokens,
                chunk_overlap=chunk_overlap,
                schema_version=SCHEMA_VERSION,
            )
            self._model_info = None
            return
        self.check_model(model_id)
        if info["dim"] != dim:
            raise ModelMismatch(f"index dimension {info['dim']} but the embedding model gives {dim}")

    def check_model(self, model_id: str) -> None:
        info = self.model_info()
        if info and info["embedding_model"] != model_id:
            raise ModelMismatch(
                f"this knowledge base was built with the embedding model {info['embedding_model']!r}, "
                f"not {model_id!r}",
                hint="use the same --embedding-model, or a new --kb home for the other model",
            )

    # --- documents ------------------------------------------------------------------------------

    def document(self, path: str) -> StoredDocument | None:
        row = self.db.execute(
            "SELECT id, path, hash, size, mtime, root FROM documents WHERE path = ?", [path]
        ).fetchone()
        return StoredDocument(*row) if row else None

    def documents_under(self, root: str) -> list[StoredDocument]:
        prefix = root.rstrip(os.sep) + os.sep
        rows = self.db.execute(
            "SELECT id, path, hash, size, mtime, root FROM documents WHERE path = ? OR substr(path, 1, ?) = ?",
            [root, len(prefix), prefix],
        ).fetchall()
        return [StoredDocument(*r) for r in rows]

    def touch_document(self, doc_id: int, mtime: float, size: int, root: str) -> None:
        """Record an unchanged file's new timestamp, size or ingest root (the folder it was found under)."""
        with transaction(self.db):
            self.db.execute("UPDATE documents SET mtime = ?, size = ?, root = ? WHERE id = ?", [mtime, size, root, doc_id])

    def replace_document(
        self,
        *,
        path: str,
        root: str,
        file_type: str,
        title: str,
        file_hash: str,
        size: int,
        mtime: float,
        metadata: dict,
        chunks: list[Chunk],
        vectors: np.ndarray,
        embed_hashes: list[str] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Put one document with its chunks in, replacing any earlier version, in one transaction.

        Returns (removed chunk ids, new chunk ids) so the caller can update the vector cache.
        """
        tags = metadata.get("tags") or []
        if isinstance(tags, str):
            tags = [tags]
        date = metadata.get("date")
        cache_in_sync = self._cache_in_sync()
        with transaction(self.db):
            old = self.db.execute("SELECT id FROM documents WHERE path = ?", [path]).fetchone()
            removed = self._delete_chunks(old[0]) if old else []
            record = {
                "path": path,
                "root": root,
                "file_type": file_type,
                "title": title,
                "hash": file_hash,
                "size": size,
                "mtime": mtime,
                "metadata": json.dumps(metadata, default=str, ensure_ascii=False),
                "tags": json.dumps([str(t) for t in tags], ensure_ascii=False),
                "date": str(date)[:10] if date else None,
                "n_chunks": len(chunks),
                "ingested_at": time.time(),
            }
            if old:
                doc_id = old[0]
                self.db["documents"].update(doc_id, record)
            else:
                doc_id = self.db["documents"].insert(record).last_pk
            new_ids = []
            leads = chunk_leads([(c.heading, c.text) for c in chunks])
            for chunk, vector, digest, lead in zip(chunks, vectors, embed_hashes or [None] * len(chunks), leads):
                cur = self.db.execute(
                    "INSERT INTO chunks (doc_id, ord, text, heading, page, n_tokens, vector, embed_hash) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    [doc_id, chunk.ord, chunk.text, chunk.heading, chunk.page, chunk.n_tokens,
                     np.asarray(vector, dtype=np.float32).tobytes(), digest],
                )
                chunk_id = cur.lastrowid
                new_ids.append(chunk_id)
                self.db.execute(
                    "INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)",
                    [chunk_id, chunk_terms(title, chunk.heading, chunk.text, lead)],
                )
            self._bump_generation()
        if cache_in_sync:
            self._vectors.remove(removed)
            self._vectors.add(np.array(new_ids, dtype=np.int64), np.asarray(vectors, dtype=np.float32))
            self._vectors.generation = self.generation
        return removed, new_ids

    def delete_document(self, path: str) -> list[int]:
        """Remove a document and its chunks; returns the removed chunk ids."""
        cache_in_sync = self._cache_in_sync()
        with transaction(self.db):
            row = self.db.execute("SELECT id FROM documents WHERE path = ?", [path]).fetchone()
            if not row:
                return []
            removed = self._delete_chunks(row[0])
            self.db.execute("DELETE FROM documents WHERE id = ?", [row[0]])
            self._bump_generation()
        if cache_in_sync:
            self._vectors.remove(removed)
            self._vectors.generation = self.generation
        return removed

    def _cache_in_sync(self) -> bool:
        return self._vectors is not None and self._vectors.generation == self.generation

    def _delete_chunks(self, doc_id: int) -> list[int]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", [doc_id]).fetchall()]
        if ids:
            self.db.execute(
                "DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE doc_id = ?)", [doc_id]
            )
            self.db.execute("DELETE FROM chunks WHERE doc_id = ?", [doc_id])
        return ids

    def _bump_generation(self) -> None:
        self.db.execute(
            "INSERT INTO meta VALUES ('generation', '1') "
            "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )

    # --- vectors --------------------------------------------------------------------------------

    def vectors(self) -> VectorIndex:
        """The FAISS cache, brought up to date with SQLite if a crash or another process left it behind."""
        info = self.model_info()
        if info is None:
            raise NotIngested(f"the knowledge base at {self.home} is empty")
        generation = self.generation
        if self._vectors is None:
            self._vectors = VectorIndex.load(self.index_path, info["dim"])
        if self._vectors.generation != generation:
            self._sync_vectors(self._vectors)
            self._vectors.generation = generation
        return self._vectors

    def _sync_vectors(self, vi: VectorIndex) -> None:
        in_db = np.array([r[0] for r in self.db.execute("SELECT id FROM chunks")], dtype=np.int64)
        in_index = vi.ids()
        extra = np.setdiff1d(in_index, in_db)
        missing = np.setdiff1d(in_db, in_index)
        vi.remove(extra.tolist())
        for start in range(0, len(missing), 10_000):
            vi.add(*self._vectors_of(missing[start : start + 10_000]))

    def save_vectors(self, *, final: bool = True) -> None:
        """Write the FAISS cache atomically, stamped with the current generation (at checkpoints too); nothing
        to do when the file on disk already reflects it. At the end of an ingest (`final`), also the term sample."""
        if self.model_info() is None:
            return
        if self.cached_vectors_generation() != self.generation:
            vi = self.vectors()
            if final:
                vi.optimize(self._vectors_of)
            vi.save(self.index_path, self.generation)
        if final:
            self._refresh_term_sample()

    def _refresh_term_sample(self) -> None:
        """From TERM_SAMPLE_FROM chunks: the share of chunks holding each common term, counted on a random
        sample of TERM_SAMPLE_ROWS chunks (as PostgreSQL's ANALYZE does) and kept in the database, again once the
        index has grown or shrunk by a tenth. doc_freqs estimates those terms from it: counting a common
        term's rows costs tens of ms at 1M chunks, paid by every fresh process for every term it meets."""
        total = self.fts_size()
        sample = self._term_sample()
        if total < TERM_SAMPLE_FROM or (sample and abs(total - sample["total"]) * 10 < total):
            return
        ids = np.array([r[0] for r in self.db.execute("SELECT id FROM chunks")], dtype=np.int64)
        picked = np.random.default_rng(0).choice(ids, size=min(len(ids), TERM_SAMPLE_ROWS), replace=False).tolist()
        counts: dict[str, int] = {}
        for start in range(0, len(picked), 5_000):
            part = picked[start:start + 5_000]
            for (terms,) in self.db.execute(
                    f"SELECT terms FROM chunks_fts WHERE rowid IN ({','.join('?' * len(part))})", part):
                for term in set((terms or "").split()):
                    counts[term] = counts.get(term, 0) + 1
        floor = TERM_SAMPLE_MIN_SHARE * len(picked)
        shares = {t: round(c / len(picked), 5) for t, c in counts.items() if c >= floor}
        self.set_meta(term_sample=json.dumps({"total": total, "rows": len(picked), "shares": shares},
                                             ensure_ascii=False))
        self._index_stats().pop("sample", None)

    def _term_sample(self) -> dict | None:
        """The stored term sample (read once per generation of the index)."""
        stats = self._index_stats()
        if "sample" not in stats:
            raw = self.get_meta("term_sample")
            try:
                sample = json.loads(raw) if raw else None
            except ValueError:
                sample = None
            stats["sample"] = sample if isinstance(sample, dict) and "shares" in sample else None
        return stats["sample"]

    def _vectors_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the chunk ids of `ids` that the database holds, their stored float32 vectors), in batches of 10,000."""
        found, vectors = [], []
        for start in range(0, len(ids), 10_000):
            part = [int(i) for i in ids[start:start + 10_000]]
            for i, blob in self.db.execute(
                    f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(part))})", part):
                found.append(i)
                vectors.append(np.frombuffer(blob, dtype=np.float32))
        dim = self.model_info()["dim"]
        return np.array(found, dtype=np.int64), (np.vstack(vectors) if vectors else np.zeros((0, dim), np.float32))

    # --- reading --------------------------------------------------------------------------------

    def hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        """Hits for (chunk id, score) pairs, in the given order."""
        if not scored:
            return []
        ids = [i for i, _ in scored]
        rows = self.db.execute(
            "SELECT c.id, c.text, c.heading, c.page, d.path, d.title, d.file_type, d.metadata "
            f"FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({','.join('?' * len(ids))})",
            ids,
        ).fetchall()
        by_id = {r[0]: r for r in rows}
        out = []
        for chunk_id, score in scored:
            r = by_id.get(chunk_id)
            if r is None:
                continue
            out.append(
                Hit(
                    chunk_id=chunk_id,
                    score=score,
                    text=r[1],
                    heading=r[2] or "",
                    page=r[3],
                    path=r[4],
                    title=r[5] or "",
                    file_type=r[6] or "",
                    metadata=json.loads(r[7] or "{}"),
                )
            )
        return out

    def _index_stats(self) -> dict:
        """Statistics that change only with the index, kept until its generation moves on: "total" chunks and
        counted document frequencies ("df"); the average terms per row ("avgdl") and the stored term sample
        ("sample") are added when first asked for."""
        generation = self.generation
        if self._stats is None or self._stats["generation"] != generation:
            total = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            self._stats = {"generation": generation, "total": total, "df": {}}
        return self._stats

    def fts_size(self) -> int:
        """Chunks in the index (cached until it changes)."""
        return self._index_stats()["total"]

    def doc_freqs(self, terms: list[str]) -> tuple[int, dict[str, int]]:
        """(chunks in the full-text index, chunks containing each term), cached until the index changes. From
        TERM_SAMPLE_FROM chunks, a term the stored sample holds is estimated from it (its exact form: FTS5's count
        would also take its other endings); any other term is counted."""
        stats = self._index_stats()
        total, cache = stats["total"], stats["df"]
        sample = self._term_sample() if any(t not in cache for t in terms) else None
        shares = sample["shares"] if sample and total >= TERM_SAMPLE_FROM else {}
        for term in terms:
            if term not in cache and term in shares:
                cache[term] = max(1, round(shares[term] * total))  # a common term: the sample's estimate
            elif term not in cache:
                # counted up to just over half the rows: from there on FTS5's IDF is clamped to its floor, so
                # the exact count changes nothing, and a term in most rows is counted in half the time
                cache[term] = self.db.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT ?)",
                    [fts_query([term]), total // 2 + 1]).fetchone()[0]
        return total, {t: cache[t] for t in terms}

    def _filter_sql(self, filters: Filters | None) -> tuple[str, list]:
        """A WHERE clause over `documents d` for `filters`, and its parameters ("1" when none)."""
        if filters is None or not filters.active():
            return "1", []
        where, params = [], []
        if filters.glob:
            where.append("d.path GLOB ?")
            params.append(filters.glob)
        for tag in filters.tags:
            where.append("EXISTS (SELECT 1 FROM json_each(d.tags) WHERE lower(json_each.value) = lower(?))")
            params.append(tag)
        if filters.date_from:
            where.append("d.date >= ?")
            params.append(filters.date_from)
        if filters.date_to:
            where.append("d.date <= ?")
            params.append(filters.date_to)
        if filters.file_types:
            types = filters.types
            where.append(f"d.file_type IN ({','.join('?' * len(types))})")
            params.extend(types)
        return " AND ".join(where), params

    def lexical_search(self, terms: list[str], k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """BM25 over the full-text table (FTS5); scores are positive, higher is better.

        FTS5 scores every row that matches any term, about 1 us a row: in a large index a query with a common
        term would read most of it. When the terms match more than MAX_LEXICAL_ROWS rows, the candidates are
        the best rows for the rarest terms (FTS5's BM25, within that many rows), and each of them then gets the
        other terms' BM25 share too, so that the common terms still order them (see _add_common_terms).
        """
        match = fts_query(terms)
        if not match:
            return []
        unique = list(dict.fromkeys(terms))
        if len(unique) > 1 and self.fts_size() > MAX_LEXICAL_ROWS:
            total, df = self.doc_freqs(unique)
            if sum(df.values()) > MAX_LEXICAL_ROWS:
                rare = rarest_within(unique, df, MAX_LEXICAL_ROWS)
                common = [t for t in unique if t not in rare and df[t]]
                scored = self._bm25(fts_query(rare), max(k * RESCORE_FACTOR, RESCORE_MIN), filters)
                return self._add_common_terms(scored, common, total, df)[:k]
        return self._bm25(match, k, filters)

    def _add_common_terms(self, scored: list[tuple[int, float]], common: list[str], total: int,
                          df: dict[str, int]) -> list[tuple[int, float]]:
        """Each row's score plus the BM25 share (FTS5's constants and IDF) of the `common` terms, counted in
        the row's stored terms. FTS5 also matches a term's other endings through its Porter stemmer; this
        count takes the term as written, so a common term's share can be a little smaller than FTS5's."""
        if not scored or not common:
            return scored
        ids = [i for i, _ in scored]
        texts = dict(self.db.execute(
            f"SELECT rowid, terms FROM chunks_fts WHERE rowid IN ({','.join('?' * len(ids))})", ids).fetchall())
        avgdl = self._average_terms()
        idf = {t: bm25_idf(total, df[t]) for t in common}
        out = []
        for i, score in scored:
            tokens = (texts.get(i) or "").split()
            norm = BM25_K1 * (1 - BM25_B + BM25_B * len(tokens) / avgdl)
            for term in common:
                tf = tokens.count(term)
                if tf:
                    score += idf[term] * tf * (BM25_K1 + 1) / (tf + norm)
            out.append((i, score))
        return sorted(out, key=lambda r: -r[1])

    def _average_terms(self) -> float:
        """Terms per full-text row, on a sample of rows (cached until the index changes)."""
        stats = self._index_stats()
        if "avgdl" not in stats:
            rows = self.db.execute("SELECT terms FROM chunks_fts LIMIT 2000").fetchall()
            stats["avgdl"] = max(sum(len((r[0] or "").split()) for r in rows) / max(len(rows), 1), 1.0)
        return stats["avgdl"]

    @staticmethod
    def _allowed_chunks_sql(where: str) -> str:
        """The ids of the chunks whose documents pass `where` (from _filter_sql): the documents first, once,
        then their chunks through the doc_id index (a join would test the filter on every chunk: 0.38 s instead
        of 0.03 s for a tag kept by 100,000 of 1M chunks)."""
        return f"SELECT c.id FROM chunks c WHERE c.doc_id IN (SELECT d.id FROM documents d WHERE {where})"

    def _bm25(self, match: str, k: int, filters: Filters | None) -> list[tuple[int, float]]:
        if filters is None or not filters.active():
            rows = self.db.execute(
                "SELECT rowid, -bm25(chunks_fts) FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?",
                [match, k]).fetchall()
        else:
            where, params = self._filter_sql(filters)
            rows = self.db.execute(
                # the allowed chunk ids as one set, from the documents through the doc_id index ('+': a test on
                # each matching row, not a lookup per id); a join would read each matching chunk's table row
                "SELECT f.rowid, -bm25(chunks_fts) FROM chunks_fts f WHERE chunks_fts MATCH ? AND +f.rowid IN "
                f"({self._allowed_chunks_sql(where)}) ORDER BY bm25(chunks_fts) LIMIT ?",
                [match, *params, k]).fetchall()
        return [(int(r[0]), float(r[1])) for r in rows]

    def dense_search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[int, float]]:
        """Inner product (cosine: unit vectors) over the FAISS cache, restricted to the filtered chunks."""
        index = self.vectors()
        if filters is None or not filters.active():
            return index.search(vector, k)
        where, params = self._filter_sql(filters)
        allowed = {r[0] for r in self.db.execute(self._allowed_chunks_sql(where), params)}
        return index.search_among(vector, k, allowed) if allowed else []

    def chunk_vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        """The stored embedding of each chunk id."""
        if not ids:
            return {}
        rows = self.db.execute(
            f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(ids))})", ids
        ).fetchall()
        return {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in rows if r[1]}

    def section_leads(self, ids: list[int]) -> dict[int, str]:
        """For each chunk id that does not open its section (same document, same heading): its section's lead."""
        if not ids:
            return {}
        rows = self.db.execute(
            "SELECT c.id, f.id, substr(f.text, 1, ?) FROM chunks c JOIN chunks f ON f.id = ("
            "SELECT g.id FROM chunks g WHERE g.doc_id = c.doc_id AND coalesce(g.heading, '') = coalesce(c.heading, '') "
            f"ORDER BY g.ord LIMIT 1) WHERE c.id IN ({','.join('?' * len(ids))})", [4 * LEAD_CHARS, *ids]).fetchall()
        return {r[0]: section_lead(r[2]) for r in rows if r[0] != r[1] and r[2]}

    def vectors_by_embed_hash(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """Stored vectors for the given embedding-input hashes (those the index holds)."""
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            part = unique[start:start + 500]
            rows = self.db.execute(
                f"SELECT embed_hash, vector FROM chunks WHERE embed_hash IN ({','.join('?' * len(part))})", part
            ).fetchall()
            out.update((r[0], np.frombuffer(r[1], dtype=np.float32)) for r in rows)
        return out

    def fts_rows(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks_fts").fetchone()[0]

    def rebuild_full_text(self) -> None:
        """Re-derive every chunk's full-text row from its text, title and heading."""
        with transaction(self.db):
            self.db.execute("DELETE FROM chunks_fts")
            self.db.conn.executemany("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)",
                                     [(i, chunk_terms(t, h, x, lead))
                                      for (_, h, x, i, t), lead in iter_leads(self.db.execute(_LEAD_ROWS))])
            self._bump_generation()

    def cached_vectors_generation(self) -> int | None:
        """The generation the vector cache file on disk reflects (None: no readable cache)."""
        try:
            with open(self.index_path, "rb") as f:
                head = f.read(len(_INDEX_MAGIC) + 12)
        except OSError:
            return None
        if not head.startswith(_INDEX_MAGIC) or len(head) < len(_INDEX_MAGIC) + 12:
            return None
        return struct.unpack("<q", head[len(_INDEX_MAGIC):len(_INDEX_MAGIC) + 8])[0]

    def list_documents(self) -> list[dict]:
        """Every document: path, title, type, chunk count, date, when it was ingested."""
        rows = self.db.execute("SELECT path, title, file_type, n_chunks, date, ingested_at, size FROM documents "
                               "ORDER BY ingested_at DESC, path").fetchall()
        return [{"path": r[0], "title": r[1] or "", "file_type": r[2], "chunks": r[3], "date": r[4],
                 "ingested_at": r[5], "size": r[6]} for r in rows]

    def all_documents(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM documents ORDER BY path").fetchall()]

    def missing_vectors(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks WHERE vector IS NULL").fetchone()[0]

    def has_chunks(self) -> bool:
        # not count(*): that walks the whole table, a few ms at 100k chunks, on every search
        return self.db.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is not None

    def counts(self) -> tuple[int, int]:
        docs = self.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks = self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return docs, chunks

    def log_ingest(self, started_at: float, paths: list[str], report: dict) -> None:
        with transaction(self.db):
            self.db["ingests"].insert(
                {
                    "started_at": started_at,
                    "finished_at": time.time(),
                    "paths": json.dumps(paths, ensure_ascii=False),
                    "report": json.dumps(report, ensure_ascii=False, default=str),
                }
            )
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('last_ingest', ?)", [str(time.time())])

    def documents_by_type(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT file_type, count(*) FROM documents GROUP BY file_type").fetchall())

    def iter_chunks(self):
        """(chunk id, document title, heading, text) of every chunk, in id order."""
        yield from self.db.execute(
            "SELECT c.id, d.title, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id ORDER BY c.id")

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.home.iterdir() if f.is_file())

    def write_lock(self, *, timeout: float = 0.0, on_wait=None):
        """The home's write lock (one writing process at a time), held for the `with` block."""
        return write_lock(self.home, timeout=timeout, on_wait=on_wait)

    def prepare_writes(self, expected_files: int = 0) -> None:
        """Load (and if need be repair) the vector cache, so that each commit updates it in place."""
        self.vectors()

    # --- the ask log and conversations ------------------------------------------------------------

    def log_ask(self, record: dict) -> int:
        """Record one finished ask: question, standalone, answer, refused, sources, model, timings, conversation_id."""
        row = dict(record, at=record.get("at", time.time()))
        for key in ("sources", "timings"):
            row[key] = json.dumps(row.get(key) or ([] if key == "sources" else {}), ensure_ascii=False)
        row["refused"] = int(bool(row.get("refused")))
        with transaction(self.db):
            return self.db["asks"].insert(row).last_pk

    def recent_asks(self, limit: int = 10) -> list[dict]:
        rows = self.db.execute(
            "SELECT id, at, question, answer, refused, sources, model, timings, conversation_id "
            "FROM asks ORDER BY id DESC LIMIT ?", [limit]).fetchall()
        return [{"id": r[0], "at": r[1], "question": r[2], "answer": r[3], "refused": bool(r[4]),
                 "sources": json.loads(r[5] or "[]"), "model": r[6], "timings": json.loads(r[7] or "{}"),
                 "conversation_id": r[8]} for r in rows]

    def new_conversation(self, persona: str) -> int:
        now = time.time()
        with transaction(self.db):
            return self.db["conversations"].insert(
                {"started_at": now, "updated_at": now, "persona": persona, "summary": "", "title": ""}).last_pk

    def last_conversation_id(self) -> int | None:
        row = self.db.execute("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def conversation(self, conversation_id: int, *, summarized: bool = False) -> dict | None:
        """{id, title, persona, summary, messages: [{role, content, sources, at}]}: the messages not folded into
        the summary, or every message with `summarized`; None if there is no such conversation."""
        row = self.db.execute("SELECT id, title, persona, summary FROM conversations WHERE id = ?",
                              [conversation_id]).fetchone()
        if row is None:
            return None
        condition = "" if summarized else " AND summarized = 0"
        messages = [{"role": r[0], "content": r[1], "sources": json.loads(r[2] or "[]"), "at": r[3]}
                    for r in self.db.execute("SELECT role, content, sources, at FROM messages WHERE conversation_id = ?"
                                             f"{condition} ORDER BY id", [conversation_id]).fetchall()]
        return {"id": row[0], "title": row[1] or "", "persona": row[2] or "", "summary": row[3] or "",
                "messages": messages}

    def add_turn(self, conversation_id: int, question: str, answer: str, sources: list[dict]) -> None:
        now = time.time()
        with transaction(self.db):
            self.db["messages"].insert_all([
                {"conversation_id": conversation_id, "role": "user", "content": question, "sources": "[]",
                 "at": now, "summarized": 0},
                {"conversation_id": conversation_id, "role": "assistant", "content": answer,
                 "sources": json.dumps(sources, ensure_ascii=False), "at": now, "summarized": 0},
            ])
            self.db.execute(
                "UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' THEN ? ELSE title END "
                "WHERE id = ?", [now, question[:80], conversation_id])

    def fold_into_summary(self, conversation_id: int, summary: str, keep_last: int) -> None:
        """Mark all but the last `keep_last` unsummarized messages as summarized, and store the summary."""
        ids = [r[0] for r in self.db.execute(
            "SELECT id FROM messages WHERE conversation_id = ? AND summarized = 0 ORDER BY id", [conversation_id])]
        folded = ids[: max(len(ids) - keep_last, 0)]
        with transaction(self.db):
            if folded:
                self.db.execute(f"UPDATE messages SET summarized = 1 WHERE id IN ({','.join('?' * len(folded))})", folded)
            self.db.execute("UPDATE conversations SET summary = ?, updated_at = ? WHERE id = ?",
                            [summary, time.time(), conversation_id])

    def set_persona(self, conversation_id: int, persona: str) -> None:
        with transaction(self.db):
            self.db.execute("UPDATE conversations SET persona = ? WHERE id = ?", [persona, conversation_id])

    def list_conversations(self, limit: int = 50) -> list[dict]:
        """The most recent conversations, newest first: id, title, persona, when, how many messages."""
        rows = self.db.execute(
            "SELECT c.id, c.title, c.persona, c.started_at, c.updated_at, "
            "(SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) "
            "FROM conversations c ORDER BY c.updated_at DESC, c.id DESC LIMIT ?", [limit]).fetchall()
        return [{"id": r[0], "title": r[1] or "", "persona": r[2] or "", "started_at": r[3], "updated_at": r[4],
                 "messages": r[5]} for r in rows]

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def write_lock(home: Path, *, timeout: float = 0.0, on_wait=None) -> Iterator[None]:
    lock = WriteLock(home)
    lock.acquire(timeout=timeout, on_wait=on_wait)
    try:
        yield
    finally:
        lock.release()
