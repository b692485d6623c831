"""The Python API: `KnowledgeBase(path)` with ingest, search, forget and status."""

from __future__ import annotations

import os
import time
from typing import Sequence

from kb.config import Settings, kb_home
from kb.embedder import Embedder, SentenceTransformerEmbedder
from kb.errors import NotIngested
from kb.retriever import CrossEncoderReranker, Filters, Reranker, Retriever, SearchResult
from kb.store import Store, write_lock
from kb.types import Hit, IngestReport


class KnowledgeBase:
    """One knowledge base home: documents in, passages (and answers) out.

    Heavy models load on first use, so constructing one is cheap.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        embedding_model: str | None = None,
        embedder: Embedder | None = None,
        reranker: Reranker | str | None = None,
        settings: Settings | None = None,
        **overrides,
    ):
        self.home = kb_home(path)
        self.settings = settings or Settings.load(self.home, embedding_model=embedding_model, **overrides)
        self._embedder = embedder
        self._reranker = CrossEncoderReranker(reranker) if isinstance(reranker, str) else reranker
        self._store: Store | None = None

    # --- parts, loaded lazily -------------------------------------------------------------------

    def _open_store(self, *, create: bool = False) -> Store:
        if self._store is None:
            self._store = Store(self.home, create=create)
        return self._store

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            name = self.settings.embedding_model
            if not name and (self.home / "kb.db").exists():
                info = self._open_store().model_info()
                name = info["embedding_model"] if info else ""
            self._embedder = SentenceTransformerEmbedder(
                name or None, batch_size=self.settings.embed_batch_size, threads=self.settings.threads
            )
        return self._embedder

    # --- write side -----------------------------------------------------------------------------

    def ingest(self, paths: Sequence[str | os.PathLike], *, progress=None, wait: float = 0.0,
               on_wait=None) -> IngestReport:
        """Add, update and remove documents so the index matches `paths`; returns what happened."""
        from ingest.pipeline import run_ingest

        self.home.mkdir(parents=True, exist_ok=True)
        with write_lock(self.home, timeout=wait, on_wait=on_wait):
            store = self._open_store(create=True)
            return run_ingest(
                store,
                self.embedder,
                [str(p) for p in paths],
                chunk_overlap=self.settings.chunk_overlap,
                progress=progress,
            )

    def forget(self, path: str | os.PathLike, *, wait: float = 0.0) -> list[str]:
        """Remove the document at `path`, or every document under the folder `path`; returns their paths."""
        from ingest.discover import is_under

        target = os.path.abspath(os.path.expanduser(str(path)))
        with write_lock(self.home, timeout=wait):
            store = self._open_store()
            paths = [d.path for d in store.documents_under(target) if is_under(d.path, target)]
            for p in paths:
                store.delete_document(p)
            if paths:
                store.save_vectors()
        return paths

    # --- read side ------------------------------------------------------------------------------

    def _retriever(self) -> Retriever:
        store = self._open_store()
        if store.counts()[1] == 0:
            raise NotIngested(f"the knowledge base at {self.home} has no documents yet")
        return Retriever(store, self.embedder, self._reranker)

    def search(self, query: str, k: int | None = None, *, mode: str | None = None,
               filters: Filters | None = None) -> list[Hit]:
        """The `k` passages that best match `query`, best first."""
        return self.search_result(query, k, mode=mode, filters=filters).hits

    def search_result(self, query: str, k: int | None = None, *, mode: str | None = None,
                      filters: Filters | None = None) -> SearchResult:
        return self._retriever().search(
            query, k or self.settings.top_k, mode=mode or self.settings.search_mode, filters=filters
        )

    def status(self) -> dict:
        """Documents, chunks, embedding model, size on disk, last ingest."""
        if not (self.home / "kb.db").exists():
            return {"home": str(self.home), "documents": 0, "chunks": 0, "embedding_model": None,
                    "size_bytes": 0, "last_ingest": None, "ingested": False}
        store = self._open_store()
        docs, chunks = store.counts()
        info = store.model_info() or {}
        last = store.get_meta("last_ingest")
        size = sum(f.stat().st_size for f in self.home.iterdir() if f.is_file())
        by_type = dict(store.db.execute("SELECT file_type, count(*) FROM documents GROUP BY file_type").fetchall())
        return {
            "home": str(self.home),
            "documents": docs,
            "chunks": chunks,
            "documents_by_type": by_type,
            "embedding_model": info.get("embedding_model"),
            "dim": info.get("dim"),
            "max_tokens": info.get("max_tokens"),
            "size_bytes": size,
            "last_ingest": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last))) if last else None,
            "ingested": chunks > 0,
        }

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["KnowledgeBase", "Filters"]
