"""The Python API: `KnowledgeBase(path)` with ingest, search, ask, forget and status; `Chat` for conversations."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from kb.answer import (Answer, AnswerStream, Source, evidence_block, extractive_text, pack_passages,
                       refusal_text)
from kb.config import Settings, kb_home
from kb.embedder import Embedder, SentenceTransformerEmbedder
from kb.errors import BadQuestion, NotIngested
from kb.evidence import Assessment, Evidence, Passage
from kb.generator import Generator
from kb.prompting import persona_text, render_template, template_text
from kb.text import unspaced_ratio
from kb.retriever import CrossEncoderReranker, Filters, Reranker, Retriever, SearchResult
from kb.store import Store, open_store, record_sources, store_exists
from kb.types import Hit, IngestReport


# A passage that holds none of the question's terms still goes to the model when it is this close in meaning.
SIMILAR_PASSAGE = 0.35
# Passages past the top k whose evidence may take a top-k passage's place, as a multiple of k (see evidence_search):
# over the 750 rust-blog posts the chunk that states the Rust 1.0.0-alpha date ranks 10th (hybrid), and a pool of
# 2k left it no margin; 3k changes nothing on the QA sets (docs/answers.md).
EVIDENCE_POOL = 3


def _renumber(usable: list[tuple[Passage, Hit]]) -> dict[int, int]:
    """Retrieval rank numbers of the passages kept -> the numbers [1].. the reader and the model see."""
    return {p.n: i + 1 for i, (p, _) in enumerate(usable)}


def _renumbered(evidence: list[Evidence], numbers: dict[int, int]) -> list[Evidence]:
    for e in evidence:
        e.n = numbers[e.n]
    return evidence


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
        config_home: str | os.PathLike | None = None,
        **overrides,
    ):
        """`path`: the home (default $KB_HOME or ~/.kb). `config_home`: where config.toml, prompts,
        personas and adapters are read from, when not the home itself (kb eval indexes in a scratch home
        but answers with the user's configuration). Keyword overrides are settings (see kb.config)."""
        self.home = kb_home(path)
        self.config_home = Path(config_home).expanduser() if config_home else self.home
        if isinstance(reranker, str):
            overrides["reranker"] = reranker
            reranker = None
        self.settings = settings or Settings.load(self.config_home, embedding_model=embedding_model, **overrides)
        self._embedder = embedder
        self._generator = generator
        self._reranker = reranker
        self._store: Store | None = None

    # --- parts, loaded lazily -------------------------------------------------------------------

    def _open_store(self, *, create: bool = False) -> Store:
        if self._store is None:
            self._store = open_store(self.home, self.settings.store, create=create)
        return self._store

    def _has_store(self) -> bool:
        return self._store is not None or store_exists(self.home, self.settings.store)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None and self.settings.embed_url:
            from kb.remote import RemoteEmbedder

            s = self.settings
            self._embedder = RemoteEmbedder(s.embed_url, api_key=s.embed_api_key, model=s.embed_model,
                                            batch_size=s.embed_batch_size, timeout=s.llm_timeout)
        if self._embedder is None:
            name = self.settings.embedding_model
            if not name and self._has_store():
                info = self._open_store().model_info()
                name = info["embedding_model"] if info else ""
            self._embedder = SentenceTransformerEmbedder(
                name or None, batch_size=self.settings.embed_batch_size, threads=self.settings.threads,
                precision=self.settings.embed_precision, device=self.settings.embed_device,
            )
        return self._embedder

    @property
    def generator(self) -> Generator:
        """The chat model: the bundled SmolLM2 GGUF unless `model` is set. Loaded once per process."""
        if self._generator is None and self.settings.llm_url:
            from kb.remote import RemoteGenerator

            s = self.settings
            self._generator = RemoteGenerator(s.llm_url, api_key=s.llm_api_key, model=s.llm_model, ctx=s.ctx,
                                              timeout=s.llm_timeout)
        if self._generator is None:
            from kb.generator import LlamaGenerator, LlamaOptions

            s = self.settings
            model = self.model_path()
            lora = None
            if s.adapter:
                from kb.adapters import resolve_adapter, warn_if_prompt_changed

                lora = str(resolve_adapter(self.config_home, s.adapter, model))
                warn_if_prompt_changed(self.config_home, s.adapter)
            self._generator = LlamaGenerator(model, options=LlamaOptions(
                n_ctx=s.ctx, n_threads=s.threads, n_gpu_layers=s.gpu_layers, seed=s.seed,
                lora_path=lora, lora_scale=s.adapter_scale, verbose=s.verbose,
            ))
        return self._generator

    def model_path(self) -> Path:
        """The chat model's GGUF file: the `model` setting as a path or a name from `kb models`, or the bundled one."""
        from kb.generator import resolve_model

        return resolve_model(self.settings.model or None, self.config_home, self.settings.model_paths)

    # --- write side -----------------------------------------------------------------------------

    def ingest(self, paths: Sequence[str | os.PathLike], *, progress=None, wait: float = 0.0,
               on_wait=None) -> IngestReport:
        """Add, update and remove documents so the index matches `paths`; returns what happened."""
        from ingest.pipeline import run_ingest

        self.home.mkdir(parents=True, exist_ok=True)
        store = self._open_store(create=True)
        with store.write_lock(timeout=wait, on_wait=on_wait):
            s = self.settings
            report = run_ingest(store, self.embedder, [str(p) for p in paths], chunk_overlap=s.chunk_overlap,
                                progress=progress, ocr=s.ocr, parse_timeout=s.parse_timeout,
                                workers=s.parse_workers or max(1, (os.cpu_count() or 2) - 1))
            record_sources(self.home, [os.path.abspath(os.path.expanduser(str(p))) for p in paths
                                       if os.path.exists(os.path.expanduser(str(p)))])
            return report

    def forget(self, path: str | os.PathLike, *, wait: float = 0.0, on_wait=None) -> list[str]:
        """Remove the document at `path`, or every document under the folder `path`; returns their paths."""
        from ingest.discover import is_under

        target = os.path.abspath(os.path.expanduser(str(path)))
        store = self._open_store()
        with store.write_lock(timeout=wait, on_wait=on_wait):
            paths = [d.path for d in store.documents_under(target) if is_under(d.path, target)]
            for p in paths:
                store.delete_document(p)
            if paths:
                store.save_vectors()
        return paths

    # --- read side ------------------------------------------------------------------------------

    @property
    def reranker(self) -> Reranker | None:
        if self._reranker is None and self.settings.reranker:
            self._reranker = CrossEncoderReranker(self.settings.reranker)
        return self._reranker

    def _retriever(self) -> Retriever:
        store = self._open_store()
        if not store.has_chunks():
            raise NotIngested(f"the knowledge base at {self.home} has no documents yet")
        return Retriever(store, self.embedder, self.reranker)

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

        Options (keyword): k, mode, filters, persona, max_tokens, temperature, seed, min_score, extractive, log.
        """
        return self.ask_stream(question, **options).result()

    def ask_stream(self, question: str, **options) -> AnswerStream:
        """Like `ask`, but iterate over the result to receive the answer token by token."""
        return self._answer(question, question, **options)

    def _extractive_notice(self, question: str, extractive: bool | None) -> str | None:
        """None to generate; otherwise why the answer is the evidence itself ("" when the user asked for it)."""
        if extractive if extractive is not None else self.settings.extractive:
            return ""
        from kb.text import model_covers

        declared = self.settings.model_languages
        if self.settings.llm_url or (self._generator is not None and not hasattr(self._generator, "path")):
            # a remote model, or a generator given by the caller: only a declared model_languages says more
            languages = {x.strip().lower() for x in declared.split(",") if x.strip()} or None
            name = "the chat model"
        else:
            from kb.generator import model_languages

            path = self.model_path()
            languages, name = model_languages(path, declared), f"the chat model {path.name}"
        if model_covers(languages, question):
            return None
        return (f"{name[0].upper()}{name[1:]} does not write this question's language; "
                "the answer is the evidence itself, quoted from your documents.")

    def assess(self, question: str, result: SearchResult) -> tuple[Assessment, list[Passage]]:
        """Evidence and answerability of the retrieved passages for `question` (see kb.evidence)."""
        from kb.evidence import Passage, assess, prepare_question

        store = self._open_store()
        vector = result.query_vector
        retriever = self._retriever()
        trusted = retriever.dense_covers(question)
        if vector is None and trusted and result.hits:
            vector = self.embedder.embed_query(question)
        vectors = store.chunk_vectors([h.chunk_id for h in result.hits]) if vector is not None and trusted else {}
        leads = store.section_leads([h.chunk_id for h in result.hits])
        passages = [
            Passage(n=i + 1, text=h.text, title=h.title, heading=h.heading, rank=i, chunk_id=h.chunk_id,
                    lead=leads.get(h.chunk_id, ""), path=h.path,
                    similarity=float(vector @ vectors[h.chunk_id]) if h.chunk_id in vectors
                    and len(vectors[h.chunk_id]) == len(vector) else None)
            for i, h in enumerate(result.hits)
        ]
        return assess(prepare_question(question, store.doc_freqs), passages), passages

    def _summary(self, question: str, pool: SearchResult, k: int) -> tuple[list[Hit], Assessment, list[Passage]] | None:
        """For a request for a summary of a topic (kb.evidence.summary_topic) that passages of the pool cover: the
        k passages to answer from (those summary_assessment quotes first, then the pool's best) and their
        assessment. A summary's passages are chosen from the whole pool: over a Wikipedia page "Summarize the
        history of New Zealand." retrieved its reference lists first, and the History section below them."""
        from kb.evidence import prepare_question, summary_assessment, summary_topic

        topic = summary_topic(question)
        if topic is None or not pool.hits:
            return None
        terms = prepare_question(topic, self._open_store().doc_freqs)
        wide, wide_passages = self.assess(question, pool)
        found = summary_assessment(wide, wide_passages, terms)
        if found is None:
            return None
        first = list(dict.fromkeys(e.n - 1 for e in found.scored[:found.summary]))
        hits = [pool.hits[i] for i in first] + [h for i, h in enumerate(pool.hits) if i not in first]
        top = SearchResult(hits=hits[:k], mode=pool.mode, query_vector=pool.query_vector)
        assessment, passages = self.assess(question, top)
        found = summary_assessment(assessment, passages, terms)
        return (top.hits, found, passages) if found is not None else None

    def evidence_search(self, question: str, k: int | None = None, *, mode: str | None = None,
                        filters: Filters | None = None,
                        min_score: float | None = None) -> tuple[SearchResult, Assessment, list[Passage]]:
        """The passages `kb ask` answers from, with their evidence and answerability.

        Answerability is judged on the top k passages, as the refusal model was calibrated. When they answer,
        the passages ranked just below them (EVIDENCE_POOL times k in all) are scored as well, and the k whose
        best sentence is strongest are kept, in retrieval order: in a large index the chunk that states the
        fact ("Rust 1.0.0-alpha -- Friday, Jan 9, 2015") can rank below chunks that only talk about it.
        """
        k = k or self.settings.top_k
        threshold = self.settings.min_score if min_score is None else min_score
        t = time.perf_counter()
        pool = self.search_result(question, EVIDENCE_POOL * k, mode=mode, filters=filters)
        timings = {**pool.timings, "retrieve_ms": round((time.perf_counter() - t) * 1000, 1)}
        t = time.perf_counter()
        summary = self._summary(question, pool, k)
        if summary is not None:
            timings["summary"] = True
            timings["evidence_ms"] = round((time.perf_counter() - t) * 1000, 1)
            return SearchResult(hits=summary[0], mode=pool.mode, timings=timings,
                                query_vector=pool.query_vector), summary[1], summary[2]
        top = SearchResult(hits=pool.hits[:k], mode=pool.mode, timings=timings, query_vector=pool.query_vector)
        assessment, passages = self.assess(question, top)
        timings["evidence_ms"] = round((time.perf_counter() - t) * 1000, 1)
        if len(pool.hits) <= k or assessment.answerability < threshold:
            return top, assessment, passages
        wide, _ = self.assess(question, pool)
        best: dict[int, float] = {}
        for e in wide.scored:
            best.setdefault(e.n, e.score)  # scored is best first
        score = [best.get(i + 1, float("-inf")) for i in range(len(pool.hits))]
        # a passage from below comes in only with a sentence stronger than any of the top k's, in place of the
        # top k's weakest passage: a pool of near-equals leaves retrieval's choice alone
        stronger = sorted((i for i in range(k, len(pool.hits)) if score[i] > max(score[:k])),
                          key=lambda i: -score[i])[:k]
        chosen = sorted(sorted(range(k), key=lambda i: -score[i])[:k - len(stronger)] + stronger)
        if chosen != list(range(k)):
            top = SearchResult(hits=[pool.hits[i] for i in chosen], mode=pool.mode, timings=timings,
                               query_vector=pool.query_vector)
            judged = assessment.answerability
            assessment, passages = self.assess(question, top)
            # the top k were judged to answer; stronger evidence in their place must not turn that into a refusal
            assessment.answerability = max(assessment.answerability, judged)
            timings["evidence_swapped"] = sum(1 for i in chosen if i >= k)
        timings["evidence_ms"] = round((time.perf_counter() - t) * 1000, 1)
        return top, assessment, passages

    def _answer(self, question: str, standalone: str, *, k: int | None = None, mode: str | None = None,
                filters: Filters | None = None, persona: str | None = None, max_tokens: int | None = None,
                temperature: float | None = None, seed: int | None = None, min_score: float | None = None,
                extractive: bool | None = None, log: bool = True, history: list[dict] | None = None,
                summary: str = "", extra_system: str = "", conversation_id: int | None = None,
                on_done=None) -> AnswerStream:
        from kb import history as history_log

        if not question or not question.strip():
            raise BadQuestion("the question is empty", hint="ask something, e.g. kb ask \"what is ...?\"")
        s = self.settings
        t0 = time.perf_counter()
        timings: dict = {"_t0": t0}
        notice = self._extractive_notice(standalone, extractive)
        # a bad --model fails here, before any work; loading waits until needed
        generator = self.generator if notice is None else None
        threshold = s.min_score if min_score is None else min_score
        result, assessment, passages = self.evidence_search(standalone, k, mode=mode, filters=filters,
                                                            min_score=threshold)
        hits = result.hits
        store = self._open_store()
        timings["retrieve_ms"] = result.timings["retrieve_ms"]
        timings["evidence_ms"] = result.timings["evidence_ms"]
        if "evidence_swapped" in result.timings:
            timings["evidence_swapped"] = result.timings["evidence_swapped"]

        def done(answer: Answer) -> None:
            if log:
                history_log.log_ask(store, answer, conversation_id=conversation_id)
            if on_done:
                on_done(answer)

        common = dict(question=question, standalone=standalone, timings=timings, on_done=done,
                      answerability=assessment.answerability)
        if assessment.answerability < threshold or not hits:
            closest = [Source.from_hit(p.n, h, assessment.passage_coverage[p.n]) for p, h in zip(passages, hits)]
            return AnswerStream(sources=closest, refused=True, model="", pieces=None,
                                text=refusal_text(question, assessment.unmentioned),
                                evidence=assessment.evidence(3), **common)
        usable = self.usable_passages(assessment, passages, hits)
        if notice is not None:
            numbered = _renumber(usable)
            sources = [Source.from_hit(numbered[p.n], h, assessment.passage_coverage[p.n]) for p, h in usable]
            evidence = _renumbered(assessment.evidence(3, among=set(numbered)), numbered)
            return AnswerStream(sources=sources, refused=False, model="", pieces=None,
                                text=extractive_text(evidence),
                                evidence=evidence, extractive=True,
                                notice=notice, **common)
        t = time.perf_counter()
        n_ctx = generator.n_ctx  # loads the model
        timings["load_ms"] = round((time.perf_counter() - t) * 1000, 1)
        t = time.perf_counter()
        prompt = self.answer_prompt(question, standalone, assessment, usable, persona=persona, history=history,
                                    summary=summary, extra_system=extra_system, max_tokens=max_tokens)
        timings["pack_ms"] = round((time.perf_counter() - t) * 1000, 1)
        packed = prompt.packed
        timings.update(prompt_tokens=packed.prompt_tokens, n_ctx=n_ctx, passages=len(packed.hits),
                       passages_dropped=len(usable) - len(packed.hits))
        pieces = generator.stream(
            packed.prompt, max_tokens=packed.max_tokens,
            temperature=s.temperature if temperature is None else temperature,
            seed=s.seed if seed is None else seed,
        )
        quoted = extractive_text(prompt.evidence)
        strong = s.overrule_refusal < 1 and assessment.answerability >= s.overrule_refusal
        return AnswerStream(sources=prompt.sources, refused=False, model=generator.model_id, pieces=pieces,
                            prefill=prompt.prefill, evidence=prompt.evidence,
                            fallback=quoted if s.check_support else "",
                            refusal_fallback=quoted if strong else "",
                            earlier=[m["content"] for m in history or () if m.get("role") == "assistant"], **common)

    @staticmethod
    def usable_passages(assessment: Assessment, passages: list[Passage], hits: list[Hit],
                        keep: int | None = None) -> list[tuple[Passage, Hit]]:
        """The passages the model sees: those that hold some of the question's terms or are close in meaning
        (and the chunk `keep`, whatever its score)."""
        return [(p, h) for p, h in zip(passages, hits)
                if assessment.passage_coverage[p.n] > 0 or (p.similarity or 0.0) >= SIMILAR_PASSAGE
                or h.chunk_id == keep]

    def answer_prompt(self, question: str, standalone: str, assessment: Assessment,
                      usable: list[tuple[Passage, Hit]], *, persona: str | None = None,
                      history: list[dict] | None = None, summary: str = "", extra_system: str = "",
                      max_tokens: int | None = None, first: int | None = None) -> "AnswerPrompt":
        """kb's answer prompt for `usable` passages: the system prompt with the persona, the evidence sentences,
        the passages packed into the model's context with its own tokenizer, the question, and the start of
        the reply ("According to [n],", citing the passage of the best evidence, or passage `first`)."""
        from kb.answer import AnswerPrompt

        s = self.settings
        generator = self.generator
        system = render_template("chat_system", self.config_home,
                                 persona=persona_text(persona if persona is not None else s.persona, self.config_home))
        if extra_system:
            system += "\n\n" + extra_system
        if summary:
            system += "\n\nSummary of the conversation so far: " + summary
        numbered = _renumber(usable)
        ranked = _renumbered(assessment.evidence(3, among=set(numbered)), numbered)

        def builder(evidence_lines: int):
            def build(passages_text: str, kept: int) -> list[dict]:
                shown = [e for e in ranked if e.n <= kept][:evidence_lines]
                user = render_template("answer", self.config_home, passages=passages_text, question=standalone,
                                       evidence=evidence_block(shown) or "(none)")
                return [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": user}]
            return build

        # The reply is started for the model ("According to [n],") so that even a small model cites a passage.
        cited = first if first is not None else ranked[0].n if ranked else 1
        prefill = render_template("answer_prefix_zh" if unspaced_ratio(question) >= 0.5 else "answer_prefix",
                                  self.config_home, first=cited).rstrip("\n") \
            if getattr(generator, "supports_prefill", True) else ""  # a chat API starts the reply itself
        for evidence_lines in (len(ranked), 1, 0):  # a tiny context window gets fewer evidence lines first
            try:
                packed = pack_passages(generator, [h for _, h in usable], builder(evidence_lines),
                                       max_tokens or s.max_tokens, prefill)
                break
            except BadQuestion:
                if evidence_lines == 0:
                    raise
        kept = len(packed.hits)
        sources = [Source.from_hit(i + 1, h, assessment.passage_coverage[p.n]) for i, (p, h) in enumerate(usable[:kept])]
        return AnswerPrompt(packed=packed, prefill=prefill, sources=sources,
                            evidence=[e for e in ranked[:evidence_lines] if e.n <= kept])

    def build_dataset(self, out: str | os.PathLike, *, kind: str = "both", progress=None, limit: int | None = None) -> dict:
        """Training examples from the ingested corpus (see kb.dataset); the chat model writes the QA pairs."""
        from kb.dataset import build_dataset

        store = self._open_store()
        if not store.has_chunks():
            raise NotIngested(f"the knowledge base at {self.home} has no documents yet")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return build_dataset(store, str(out), kind=kind, teacher=self.generator if kind != "continuation" else None,
                             progress=progress, limit=limit)

    def build_rag_dataset(self, out: str | os.PathLike, **options) -> dict:
        """Retrieval-aware training examples in kb's own answer prompt (see kb.dataset.build_rag_dataset)."""
        from kb.dataset import build_rag_dataset

        if not self._open_store().has_chunks():
            raise NotIngested(f"the knowledge base at {self.home} has no documents yet")
        teacher = None if options.get("questions") is not None else self.generator
        return build_rag_dataset(self, out, teacher=teacher, **options)

    def chat(self, *, persona: str | None = None, resume: bool | int = False) -> "Chat":
        """A multi-turn conversation; `resume=True` continues the most recent one, `resume=ID` that one."""
        from kb.chat import Chat

        return Chat(self, persona=persona, resume=resume)

    def log(self, limit: int = 10) -> list[dict]:
        """The most recent asks, newest first."""
        from kb.history import recent_asks

        if not self._has_store():
            return []
        return recent_asks(self._open_store(), limit)

    def status(self) -> dict:
        """Documents, chunks, embedding model, size on disk, last ingest."""
        if not self._has_store():
            return {"home": str(self.home), "store": str(self.home / "kb.db"), "documents": 0, "chunks": 0,
                    "embedding_model": None, "size_bytes": 0, "last_ingest": None, "ingested": False}
        store = self._open_store()
        docs, chunks = store.counts()
        info = store.model_info() or {}
        last = store.get_meta("last_ingest")
        return {
            "home": str(self.home),
            "store": store.location,
            "documents": docs,
            "chunks": chunks,
            "documents_by_type": store.documents_by_type(),
            "embedding_model": info.get("embedding_model"),
            "dim": info.get("dim"),
            "max_tokens": info.get("max_tokens"),
            "size_bytes": store.size_bytes(),
            "last_ingest": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last))) if last else None,
            "ingested": chunks > 0,
        }

    def documents(self) -> list[dict]:
        """Every indexed document, the latest ingested first: path, title, file_type, chunks, date (its own,
        from front matter or metadata, or None), ingested_at (epoch seconds), size (bytes)."""
        return self._open_store().list_documents() if self._has_store() else []

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["KnowledgeBase", "Filters", "Answer", "Source"]
