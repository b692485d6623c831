"""Finding passages: dense (FAISS), lexical (SQLite FTS5 BM25), and hybrid fusion of the two, with filters.

Hybrid fusion. Each retriever's top-N scores are turned into z-scores over that list, and each retriever
is weighted by how clearly its best passage stands out from the rest of its list (the z-score of its
top hit). A retriever that cannot tell passages apart for this query, such as an English-only embedder
facing a Chinese question, returns a flat list, gets a small weight, and cannot drag the fused ranking
down; one that is sure of its answer leads. Rank-based fusion (RRF) lacks that signal and lets a weak
retriever's noise halve a strong one's lead.

Language. A flat list is not the only way a retriever can be weak: an English-only embedder facing a
Chinese question can return a confident-looking but meaningless ranking. So the embedder's model card is
read (`language:` in its README front matter), and when it does not list a language written in the query's
script, hybrid search leaves the dense ranking out for that query. Models that declare nothing, or
"multilingual", are trusted.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np

from kb.embedder import Embedder
from kb.errors import BadQuestion
from kb.store import Filters, Store
from kb.text import model_covers, query_terms
from kb.types import Hit

MODES = ("dense", "lexical", "hybrid")
CANDIDATES = 50  # passages each retriever hands to the fusion
SPARE = 5  # candidates beyond k, to fill the places of passages that repeat a better one's text
PRUNE_FROM = 10_000  # chunks; below this every full-text query is fast and keeps all its terms


class Reranker(Protocol):
    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        """The same hits, re-scored and re-ordered best first."""
        ...


class CrossEncoderReranker:
    """A local sentence-transformers CrossEncoder model folder."""

    def __init__(self, path: str):
        from kb.errors import ModelNotFound
        from pathlib import Path

        if not Path(path).is_dir():
            raise ModelNotFound(f"reranker model folder not found: {path}")
        self.path = path
        self._model = None

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return hits
        if self._model is None:
            from sentence_transformers import CrossEncoder

            self._model = CrossEncoder(self.path, device="cpu")
        scores = self._model.predict([(query, h.text) for h in hits])
        for hit, score in zip(hits, scores):
            hit.score = float(score)
        return sorted(hits, key=lambda h: h.score, reverse=True)


@dataclass
class SearchResult:
    hits: list[Hit]
    mode: str
    timings: dict = field(default_factory=dict)
    query_vector: np.ndarray | None = None  # set when the dense retriever ran


class Retriever:
    def __init__(self, store: Store, embedder: Embedder, reranker: Reranker | None = None):
        self.store = store
        self.embedder = embedder
        self.reranker = reranker

    def search(self, query: str, k: int = 5, *, mode: str = "hybrid", filters: Filters | None = None) -> SearchResult:
        if not query or not query.strip():
            raise BadQuestion("the query is empty", hint="give some words to search for")
        if mode not in MODES:
            raise BadQuestion(f"unknown search mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
        timings: dict = {}
        requested = mode
        n = max(k, CANDIDATES) if mode == "hybrid" or self.reranker else k + SPARE
        dense = lexical = vector = None
        if mode == "hybrid" and not self.dense_covers(query):
            # The embedder's model card does not list the query's language: its ranking is noise here.
            mode = "lexical"
            timings["dense_skipped"] = True
        # hybrid: the query is embedded in a thread while the full-text search runs (both release the GIL;
        # the store's connection stays in this thread). The dense job waits on the embedding job submitted
        # before it: the pool takes jobs in order, so that one is always running or done, never queued behind.
        embedding = _threads().submit(self.embedder.embed_query, query) if mode == "hybrid" else None
        # a store that allows it (PostgreSQL) runs the dense query in that thread too, beside the lexical one
        searched = (_threads().submit(lambda: self._dense(embedding.result(), n, filters))
                    if embedding and getattr(self.store, "concurrent_dense", False) else None)
        if mode in ("lexical", "hybrid"):
            t = time.perf_counter()
            lexical = self.store.lexical_search(self._informative_terms(query, mode), n, filters)
            timings["lexical_ms"] = (time.perf_counter() - t) * 1000
        if mode in ("dense", "hybrid"):
            t = time.perf_counter()
            vector = embedding.result() if embedding else self.embedder.embed_query(query)
            dense = searched.result() if searched else self._dense(vector, n, filters)
            timings["dense_ms"] = (time.perf_counter() - t) * 1000  # what embedding left to wait for, and the search
        if timings.get("dense_skipped") and not lexical:
            t = time.perf_counter()
            vector = self.embedder.embed_query(query)
            lexical = self._dense(vector, n, filters)  # no term matched at all: the dense guess beats nothing
            timings["dense_ms"] = (time.perf_counter() - t) * 1000
        if mode == "hybrid":
            scored = fuse([dense, lexical])
        else:
            scored = dense if mode == "dense" else lexical
        hits = self._distinct(scored, n if self.reranker else k)
        if self.reranker:
            t = time.perf_counter()
            hits = self.reranker.rerank(query, hits)
            timings["rerank_ms"] = (time.perf_counter() - t) * 1000
        return SearchResult(hits=hits[:k], mode=requested, timings=timings, query_vector=vector)

    def _distinct(self, scored: list[tuple[int, float]], k: int) -> list[Hit]:
        """The best k hits whose texts differ: a passage found again in a copy of a file ("report (1).pdf") or
        repeated within one (a handbook that holds its chapters twice) takes one place, not several."""
        hits: list[Hit] = []
        seen: set[str] = set()
        start = 0
        while len(hits) < k and start < len(scored):
            batch = scored[start:start + k - len(hits) + (SPARE if start else 0)]
            start += len(batch)
            for hit in self.store.hits(batch):
                key = " ".join(hit.text.split())
                if key not in seen and len(hits) < k:
                    seen.add(key)
                    hits.append(hit)
        return hits

    def _informative_terms(self, query: str, mode: str) -> list[str]:
        """The query's terms without those in at least half of all chunks (in indexes of PRUNE_FROM chunks or more).

        BM25 gives such a term an IDF of zero or less (FTS5 clamps it to 1e-6), so it cannot change the
        ranking, but its posting list can span the whole index and dominate the search time ("the", "how",
        "的"). When every term is that common, lexical search knows nothing about this query: hybrid search
        then leaves it out, and lexical-only search keeps all the terms.
        """
        terms = query_terms(query)
        if not terms or self.store.fts_size() < PRUNE_FROM:
            return terms
        total, df = self.store.doc_freqs(terms)
        kept = [t for t in terms if df[t] * 2 < total]
        if kept:
            return kept
        return [] if mode == "hybrid" else terms

    def dense_covers(self, query: str) -> bool:
        return model_covers(getattr(self.embedder, "languages", None), query)

    def _dense(self, vector: np.ndarray, n: int, filters: Filters | None) -> list[tuple[int, float]]:
        self.store.check_model(self.embedder.model_id)
        return self.store.dense_search(vector, n, filters)


@lru_cache(maxsize=1)
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="kb-embed-query")


def _zscores(scored: list[tuple[int, float]]) -> tuple[dict[int, float], float, float]:
    """(z-score per id, the z of the best hit against the others, z given to ids this list did not return)."""
    values = np.array([s for _, s in scored], dtype=np.float64)
    mean, std = values.mean(), values.std()
    if std < 1e-9:
        return {i: 0.0 for i, _ in scored}, 0.0, 0.0
    z = {i: (s - mean) / std for i, s in scored}
    rest = values[1:]
    if len(rest) >= 2 and rest.std() > 1e-9:
        top_margin = (values[0] - rest.mean()) / rest.std()
    else:
        top_margin = (values[0] - mean) / std
    return z, max(top_margin, 0.0), float((values.min() - mean) / std)


def fuse(lists: list[list[tuple[int, float]] | None]) -> list[tuple[int, float]]:
    """Confidence-weighted z-score fusion of several retrievers' (id, score) lists, best first."""
    lists = [l for l in lists if l]
    if not lists:
        return []
    if len(lists) == 1:
        return lists[0]
    parts = [_zscores(l) for l in lists]
    weights = np.array([p[1] for p in parts])
    if weights.sum() <= 0:
        weights = np.ones(len(parts))
    weights = weights / weights.sum()
    ids = {i for l in lists for i, _ in l}
    fused = {
        i: float(sum(w * z.get(i, floor) for w, (z, _, floor) in zip(weights, parts)))
        for i in ids
    }
    return sorted(fused.items(), key=lambda kv: kv[1], reverse=True)


__all__ = ["Filters", "Retriever", "Reranker", "CrossEncoderReranker", "SearchResult", "fuse", "MODES"]
