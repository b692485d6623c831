"""The Python API: `KnowledgeBase(path)` with ingest, search, ask, forget and status; `Chat` for conversations."""

from __future__ import annotations

import os
import time
from typing import Sequence

from kb.answer import Answer, AnswerStream, Source, pack_passages, refusal_text, relevance
from kb.config import Settings, kb_home
from kb.embedder import Embedder, SentenceTransformerEmbedder
from kb.errors import BadQuestion, NotIngested
from kb.generator import Generator
from kb.prompting import persona_text, render_template, template_text
from kb.text import unspaced_ratio
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
        generator: Generator | None = None,
        reranker: Reranker | str | None = None,
        settings: Settings | None = None,
        **overrides,
    ):
        self.home = kb_home(path)
        self.settings = settings or Settings.load(self.home, embedding_model=embedding_model, **overrides)
        self._embedder = embedder
        self._generator = generator
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
                name or None, batch_size=self.settings.embed_batch_size, threads=self.settings.threads,
                precision=self.settings.embed_precision,
            )
        return self._embedder

    @property
    def generator(self) -> Generator:
        """The chat model: the bundled SmolLM2 GGUF unless `model` is set. Loaded once per process."""
        if self._generator is None:
            from kb.generator import LlamaGenerator, LlamaOptions, resolve_model

            s = self.settings
            lora = None
            if s.adapter:
                from kb.adapters import resolve_adapter

                lora = str(resolve_adapter(self.home, s.adapter, resolve_model(s.model or None)))
            self._generator = LlamaGenerator(s.model or None, options=LlamaOptions(
                n_ctx=s.ctx, n_threads=s.threads, n_gpu_layers=s.gpu_layers, seed=s.seed,
                lora_path=lora, lora_scale=s.adapter_scale, verbose=bool(s.extra.get("verbose", False)),
            ))
        return self._generator

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
        if not store.has_chunks():
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

    def ask(self, question: str, **options) -> Answer:
        """A cited answer to `question` from the ingested documents, or a refusal when they lack it.

        Options (keyword): k, mode, filters, persona, max_tokens, temperature, seed, min_score, log.
        """
        return self.ask_stream(question, **options).result()

    def ask_stream(self, question: str, **options) -> AnswerStream:
        """Like `ask`, but iterate over the result to receive the answer token by token."""
        return self._answer(question, question, **options)

    def _answer(self, question: str, standalone: str, *, k: int | None = None, mode: str | None = None,
                filters: Filters | None = None, persona: str | None = None, max_tokens: int | None = None,
                temperature: float | None = None, seed: int | None = None, min_score: float | None = None,
                log: bool = True, history: list[dict] | None = None, summary: str = "",
                conversation_id: int | None = None, on_done=None) -> AnswerStream:
        from kb import history as history_log

        if not question or not question.strip():
            raise BadQuestion("the question is empty", hint="ask something, e.g. kb ask \"what is ...?\"")
        s = self.settings
        t0 = time.perf_counter()
        timings: dict = {"_t0": t0}
        generator = self.generator  # a bad --model fails here, before any work; loading waits until needed
        result = self.search_result(standalone, k, mode=mode, filters=filters)
        hits = result.hits
        store = self._open_store()
        signals = relevance(store, standalone, result.query_vector, hits)
        timings["retrieve_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        threshold = s.min_score if min_score is None else min_score
        relevant = [h for h, sig in zip(hits, signals) if sig["score"] >= threshold]

        def done(answer: Answer) -> None:
            if log:
                history_log.log_ask(store, answer, conversation_id=conversation_id)
            if on_done:
                on_done(answer)

        if not relevant:
            closest = [Source.from_hit(i + 1, h, sig["score"]) for i, (h, sig) in enumerate(zip(hits, signals))]
            return AnswerStream(question=question, standalone=standalone, sources=closest, refused=True,
                                model="", timings=timings, pieces=None, on_done=done,
                                refusal=refusal_text(question))
        t = time.perf_counter()
        n_ctx = generator.n_ctx  # loads the model
        timings["load_ms"] = round((time.perf_counter() - t) * 1000, 1)
        system = render_template("chat_system", self.home,
                                 persona=persona_text(persona if persona is not None else s.persona, self.home))
        if summary:
            system += "\n\nSummary of the conversation so far: " + summary

        def build(passages: str) -> list[dict]:
            user = render_template("answer", self.home, passages=passages, question=standalone)
            return [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": user}]

        # The reply is started for the model ("According to [") so that even a small model cites a passage.
        prefill = template_text("answer_prefix_zh" if unspaced_ratio(question) >= 0.5 else "answer_prefix", self.home)
        prefill = prefill.rstrip("\n")
        t = time.perf_counter()
        packed = pack_passages(generator, relevant, build, max_tokens or s.max_tokens, prefill)
        timings["pack_ms"] = round((time.perf_counter() - t) * 1000, 1)
        timings.update(prompt_tokens=packed.prompt_tokens, n_ctx=n_ctx, passages=len(packed.hits),
                       passages_dropped=len(relevant) - len(packed.hits))
        score = {h.chunk_id: sig["score"] for h, sig in zip(hits, signals)}
        sources = [Source.from_hit(i + 1, h, score[h.chunk_id], text)
                   for i, (h, text) in enumerate(zip(packed.hits, packed.texts))]
        pieces = generator.stream(
            packed.prompt, max_tokens=packed.max_tokens,
            temperature=s.temperature if temperature is None else temperature,
            seed=s.seed if seed is None else seed,
        )
        return AnswerStream(question=question, standalone=standalone, sources=sources, refused=False,
                            model=generator.model_id, timings=timings, pieces=pieces, on_done=done,
                            prefill=prefill)

    def chat(self, *, persona: str | None = None, resume: bool = False) -> "Chat":
        """A multi-turn conversation; `resume=True` continues the most recent one."""
        from kb.chat import Chat

        return Chat(self, persona=persona, resume=resume)

    def log(self, limit: int = 10) -> list[dict]:
        """The most recent asks, newest first."""
        from kb.history import recent_asks

        if not (self.home / "kb.db").exists():
            return []
        return recent_asks(self._open_store(), limit)

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


__all__ = ["KnowledgeBase", "Filters", "Answer", "Source"]
