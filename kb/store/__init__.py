"""The store of one knowledge base: documents and chunks, vectors, full-text terms, chats and the ask log.

`Store` is the protocol every backend implements, with all its SQL inside it; `open_store(home, url)` picks
one: the embedded default, SQLite + a FAISS cache in the home (kb/store/sqlite.py), or a shared PostgreSQL
with pgvector (kb/store/postgres.py) when `store = "postgresql://..."`. Callers never see SQL.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

from kb.text import lexical_document, lexical_terms, unspaced_ratio
from kb.types import Chunk, Hit

LEAD_CHARS = 80  # the longest section lead (see section_lead)
SOURCES_NAME = "sources.json"  # the paths given to each ingest, kept in the home: kb doctor rebuilds from it


@dataclass
class StoredDocument:
    id: int
    path: str
    hash: str
    size: int
    mtime: float
    root: str


@dataclass
class Filters:
    """Restrict a search to documents by path glob, tag, front-matter date range, or file type."""

    path: str | None = None  # glob, e.g. "*/posts/*" or "*.pdf"
    tags: Sequence[str] = ()
    date_from: str | None = None  # inclusive, ISO date
    date_to: str | None = None
    file_types: Sequence[str] = ()

    def active(self) -> bool:
        return bool(self.path or self.tags or self.date_from or self.date_to or self.file_types)

    @property
    def glob(self) -> str | None:
        """The path glob, anchored: a relative pattern matches anywhere in the path."""
        if not self.path:
            return None
        return self.path if self.path.startswith(("/", "*")) else "*" + self.path

    @property
    def types(self) -> list[str]:
        return [_FILE_TYPE_ALIASES.get(t.lower().lstrip("."), t.lower()) for t in self.file_types]


_FILE_TYPE_ALIASES = {"md": "markdown", "markdown": "markdown", "txt": "text", "htm": "html", "png": "image",
                      "jpg": "image", "jpeg": "image", "tif": "image", "tiff": "image", "webp": "image", "bmp": "image"}


def chunk_terms(title: str | None, heading: str | None, text: str, lead: str = "") -> str:
    """What the full-text index holds for a chunk: its document title, heading path, section lead and text."""
    return lexical_document(f"{title or ''}\n{heading or ''}\n{lead}\n{text}")


def chunk_term_list(title: str | None, heading: str | None, text: str, lead: str = "") -> list[str]:
    return lexical_terms(f"{title or ''}\n{heading or ''}\n{lead}\n{text}")


def section_lead(text: str) -> str:
    """The first sentence of a section's first chunk, at most LEAD_CHARS, where the section is written in
    Chinese or Japanese; "" otherwise. Those languages drop a subject once it is named, so a section's later
    chunks leave unsaid what it is about ("功能发汗退热" in a section that opened "短叶水蜈蚣（学名：），别名
    无头土香 ..."); the later chunks are indexed with the lead, and evidence reads their sentences as speaking
    of it. Spaced scripts keep naming their subject (or use a pronoun): there a lead only lifted chunks that
    merely mention the subject (measured in docs/retrieval.md)."""
    from kb.evidence import split_sentences

    spans = split_sentences(text[:4 * LEAD_CHARS])
    lead = text[:spans[0][1] if spans else 0][:LEAD_CHARS]
    return lead if unspaced_ratio(lead) >= 0.5 else ""


def chunk_leads(chunks: Sequence[tuple[str | None, str]]) -> list[str]:
    """For (heading, text) of a document's chunks in order: `section_lead` of each chunk's section (the first
    chunk under the same heading), "" for the chunk that opens it."""
    leads: dict[str, str] = {}  # heading -> its section's lead, found once per section
    out = []
    for heading, text in chunks:
        heading = heading or ""
        if heading in leads:
            out.append(leads[heading])
        else:
            out.append("")
            leads[heading] = section_lead(text)
    return out


def batches(items: Iterable, size: int) -> Iterator[list]:
    """`items` in lists of `size` (the last shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_leads(rows: Iterable[tuple]) -> Iterator[tuple[tuple, str]]:
    """(row, `chunk_leads` lead) for rows (doc_id, heading, text, ...) ordered by document and chunk order,
    streamed: one document's rows in memory at a time."""
    doc: list[tuple] = []
    for row in rows:
        if doc and row[0] != doc[0][0]:
            yield from zip(doc, chunk_leads([(r[1], r[2]) for r in doc]))
            doc = []
        doc.append(row)
    yield from zip(doc, chunk_leads([(r[1], r[2]) for r in doc]))


BM25_K1, BM25_B = 1.2, 0.75  # FTS5's bm25() constants; the PostgreSQL store and SQLite's rescoring use them too


def bm25_idf(total: int, df: int) -> float:
    """A term's IDF as FTS5's bm25() computes it, floored as FTS5 floors it."""
    return max(math.log((total - df + 0.5) / (df + 0.5)), 1e-6)


def rarest_within(terms: Sequence[str], df: dict[str, int], rows: int) -> list[str]:
    """The rarest of `terms`, from the rarest up, while the rows they match stay within `rows` (at least one)."""
    kept, matched = [], 0
    for term in sorted(terms, key=lambda t: df[t]):
        if kept and matched + df[term] > rows:
            break
        kept.append(term)
        matched += df[term]
    return kept


class Store(Protocol):
    """What kb needs from a store. Every method is one backend operation; writes are atomic per call."""

    home: Path
    location: str  # the database, as a person would name it (a file path, a URL without password)
    # dense_search may run in another thread while this thread runs lexical_search (PostgreSQL: each on its
    # own connection, so a hybrid search's two queries run at once in two server processes)
    concurrent_dense: bool

    # the embedding model the index was built with
    def model_info(self) -> dict | None: ...
    def bind_model(self, model_id: str, dim: int, max_tokens: int, chunk_overlap: int) -> None: ...
    def check_model(self, model_id: str) -> None: ...
    @property
    def generation(self) -> int: ...

    # documents and chunks
    def document(self, path: str) -> StoredDocument | None: ...
    def documents_under(self, root: str) -> list[StoredDocument]: ...
    def touch_document(self, doc_id: int, mtime: float, size: int, root: str) -> None: ...
    def replace_document(self, *, path: str, root: str, file_type: str, title: str, file_hash: str, size: int,
                         mtime: float, metadata: dict, chunks: list[Chunk], vectors: np.ndarray,
                         embed_hashes: list[str] | None = None) -> tuple[list[int], list[int]]: ...
    def delete_document(self, path: str) -> list[int]: ...
    def list_documents(self) -> list[dict]: ...
    def all_documents(self) -> list[str]: ...
    def documents_by_type(self) -> dict[str, int]: ...
    def counts(self) -> tuple[int, int]: ...
    def has_chunks(self) -> bool: ...
    def iter_chunks(self) -> Iterator[tuple[int, str, str, str]]: ...  # (id, title, heading, text)
    def size_bytes(self) -> int: ...

    # search: filters are evaluated in the database
    def dense_search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[tuple[int, float]]: ...
    def lexical_search(self, terms: list[str], k: int, filters: Filters | None = None) -> list[tuple[int, float]]: ...
    def doc_freqs(self, terms: list[str]) -> tuple[int, dict[str, int]]: ...
    def fts_size(self) -> int: ...
    def hits(self, scored: list[tuple[int, float]]) -> list[Hit]: ...
    def chunk_vectors(self, ids: list[int]) -> dict[int, np.ndarray]: ...
    def section_leads(self, ids: list[int]) -> dict[int, str]: ...  # see SQLiteStore.section_leads
    def vectors_by_embed_hash(self, hashes: list[str]) -> dict[str, np.ndarray]: ...

    # ingest bookkeeping
    def write_lock(self, *, timeout: float = 0.0, on_wait=None) -> AbstractContextManager: ...
    def prepare_writes(self, expected_files: int = 0) -> None: ...
    def save_vectors(self, *, final: bool = True) -> None: ...  # final: the ingest's end, not a checkpoint
    def log_ingest(self, started_at: float, paths: list[str], report: dict) -> None: ...
    def get_meta(self, key: str, default: str | None = None) -> str | None: ...

    # the ask log and conversations
    def log_ask(self, record: dict) -> int: ...
    def recent_asks(self, limit: int) -> list[dict]: ...
    def new_conversation(self, persona: str) -> int: ...
    def last_conversation_id(self) -> int | None: ...
    def conversation(self, conversation_id: int, *, summarized: bool = False) -> dict | None: ...
    def add_turn(self, conversation_id: int, question: str, answer: str, sources: list[dict]) -> None: ...
    def fold_into_summary(self, conversation_id: int, summary: str, keep_last: int) -> None: ...
    def set_persona(self, conversation_id: int, persona: str) -> None: ...
    def list_conversations(self, limit: int) -> list[dict]: ...

    def close(self) -> None: ...


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(home: Path, url: str = "", *, create: bool = False) -> Store:
    """The store of `home`: PostgreSQL when `url` is a postgresql:// URL, else SQLite + FAISS in the home."""
    if url and is_postgres_url(url):
        from kb.store.postgres import PostgresStore

        return PostgresStore(home, url, create=create)
    if url:
        from kb.errors import BadSetting

        raise BadSetting(f"unknown store {url!r}", hint="leave `store` empty for the embedded store, or give a "
                                                        "postgresql://USER:PASSWORD@HOST:PORT/DATABASE URL")
    from kb.store.sqlite import SQLiteStore

    return SQLiteStore(home, create=create)


def store_exists(home: Path, url: str = "") -> bool:
    """Whether there is a knowledge base to open (a PostgreSQL store always answers for itself)."""
    return bool(url) or (Path(home) / "kb.db").exists()


def read_sources(home: Path) -> list[str]:
    """The paths ingested into `home` so far (files and folders, absolute), oldest first."""
    try:
        data = json.loads((Path(home) / SOURCES_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [p for p in data if isinstance(p, str)] if isinstance(data, list) else []


def record_sources(home: Path, paths: list[str]) -> None:
    """Add `paths` to the home's record of ingested paths (atomically)."""
    known = read_sources(home)
    merged = known + [p for p in paths if p not in known]
    if merged != known:
        Path(home).mkdir(parents=True, exist_ok=True)
        target = Path(home) / SOURCES_NAME
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, target)


__all__ = ["Store", "StoredDocument", "Filters", "open_store", "store_exists", "is_postgres_url", "chunk_terms",
           "chunk_term_list", "read_sources", "record_sources"]
