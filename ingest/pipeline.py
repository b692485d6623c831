"""The ingest run: discover -> hash -> parse + chunk (a producer thread) -> embed -> store, with a report.

Parsing and chunking run in a thread ahead of embedding, so that they overlap with the model's work
(torch releases the GIL while it computes). Each document is committed in its own transaction once all
of its chunks are embedded; the FAISS cache is saved every `checkpoint_seconds` and at the end.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ingest.chunk import PreparedChunk, chunk_document
from ingest.discover import Candidate, discover
from kb.embedder import Embedder
from kb.errors import KBError
from kb.store import Store
from kb.types import FileFailure, IngestReport, ParsedDocument

ProgressFn = Callable[[dict], None]


@dataclass
class _Work:
    candidate: Candidate
    file_hash: str
    size: int
    mtime: float
    existed: bool
    doc: ParsedDocument | None = None
    chunks: list[PreparedChunk] = field(default_factory=list)
    error: str | None = None


def embed_hash(text: str) -> str:
    """Identifies what the embedder was given for a chunk (title and heading prefix included)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


EMBED_CALL = 256  # texts per call to the embedder within a group


def run_ingest(
    store: Store,
    embedder: Embedder,
    paths: list[str],
    *,
    chunk_overlap: int = 32,
    batch_size: int = 2048,  # chunks gathered before they are embedded (sorted by length) and stored
    checkpoint_seconds: float = 30.0,
    progress: ProgressFn | None = None,
    ocr: bool = True,
    workers: int = 1,
    parse_timeout: float = 600.0,
) -> IngestReport:
    """Make the index match `paths`. `workers`: processes that parse PDF, Word, HTML and image files (0: all
    in this process); `parse_timeout`: seconds one such file may take; `ocr`: read scans and images."""
    started = time.time()
    report = IngestReport()
    timings = {"discover": 0.0, "hash": 0.0, "parse": 0.0, "chunk": 0.0, "embed": 0.0, "store": 0.0,
               "pages": 0, "ocr_pages": 0, "ocr": 0.0}
    emit = progress or (lambda event: None)

    t = time.perf_counter()
    found = discover(paths)
    report.skipped = found.skipped
    report.skipped_reasons = found.skipped_reasons
    timings["discover"] = time.perf_counter() - t

    store.bind_model(embedder.model_id, embedder.dim, embedder.max_tokens, chunk_overlap)

    # a path given again that no longer exists: the file, or the whole folder, was deleted since it was
    # ingested; its documents go (a path never ingested stays an error: nothing is removed on a typo)
    for path, reason in found.failed:
        gone = [] if os.path.lexists(path) else store.documents_under(path)
        if gone:
            for doc in gone:
                store.delete_document(doc.path)
                report.removed.append(doc.path)
        else:
            report.failed.append(FileFailure(path, reason))

    # what changed?
    t = time.perf_counter()
    todo: list[_Work] = []
    for cand in found.files:
        try:
            st = os.stat(cand.path)
            known = store.document(cand.path)
            digest = file_hash(cand.path)
        except OSError as e:
            report.failed.append(FileFailure(cand.path, _os_reason(e)))
            continue
        if known and known.hash == digest:
            report.unchanged.append(cand.path)
            if known.mtime != st.st_mtime or known.size != st.st_size or known.root != cand.root:
                store.touch_document(known.id, st.st_mtime, st.st_size, cand.root)
            continue
        todo.append(_Work(cand, digest, st.st_size, st.st_mtime, existed=known is not None))
    timings["hash"] = time.perf_counter() - t

    # files gone from the folders that were walked: removed once the new and changed files are in, so that
    # a renamed or moved file finds its chunks' vectors still there to reuse
    present = {c.path for c in found.files} | {p for p, _ in found.failed} | set(found.skipped_reasons)
    vanished = [doc.path for root in found.roots for doc in store.documents_under(root)
                if doc.path not in present and not os.path.lexists(doc.path)]

    emit({"event": "start", "files": len(todo), "unchanged": len(report.unchanged),
          "removed": len(report.removed) + len(vanished)})
    if todo:
        store.prepare_writes(expected_files=len(todo))
        _embed_and_store(store, embedder, todo, report, timings, chunk_overlap, batch_size,
                         checkpoint_seconds, emit, ocr=ocr, workers=workers, parse_timeout=parse_timeout)
    for path in vanished:
        store.delete_document(path)
        report.removed.append(path)
    # also after an ingest that changed nothing: one that stopped half-way may have left the vectors unsaved
    t = time.perf_counter()
    store.save_vectors()
    timings["store"] += time.perf_counter() - t

    report.seconds = time.time() - started
    report.timings = {k: round(v, 3) for k, v in timings.items()}
    report.timings["parse_workers"] = workers
    store.log_ingest(started, [os.path.abspath(p) for p in paths], report.to_dict())
    emit({"event": "done", "report": report})
    return report


RICH_TYPES = {"pdf", "docx", "html", "image"}  # parsed in worker processes; plain text is cheaper inline


def _apply(work: _Work, result, timings: dict) -> None:
    work.doc, work.chunks, work.error = result.doc, result.chunks, result.error
    timings["parse"] += result.parse_s
    timings["chunk"] += result.chunk_s
    stats = getattr(result.doc, "stats", None) or {}
    timings["pages"] += stats.get("pages", 0)
    timings["ocr_pages"] += stats.get("ocr_pages", 0)
    timings["ocr"] += stats.get("ocr_s", 0.0)


def _produce(todo: list[_Work], embedder: Embedder, overlap: int, out: queue.Queue, timings: dict,
             stop: threading.Event, ocr: bool, workers: int, parse_timeout: float, emit) -> None:
    from ingest.workers import ParsePool, Task, parse_and_chunk

    tokenizer = embedder.tokenizer
    rich = [w for w in todo if w.candidate.file_type in RICH_TYPES] if workers else []
    pooled = {id(w) for w in rich}

    def run_pool() -> None:
        pool = ParsePool(workers, tokenizer, embedder.max_tokens, overlap, ocr=ocr, timeout=parse_timeout)
        tasks = [Task(i, w.candidate.path, w.candidate.file_type) for i, w in enumerate(rich)]
        for message in pool.run(tasks):
            if stop.is_set():
                break
            if message[0] == "page":
                _, index, done, total, ocr_pages = message
                emit({"event": "parsing", "path": rich[index].candidate.path, "page": done, "pages": total,
                      "ocr_pages": ocr_pages})
                continue
            work = rich[message[1].index]
            _apply(work, message[1], timings)
            out.put(work)

    pool_thread = threading.Thread(target=run_pool, daemon=True) if rich else None
    if pool_thread:
        pool_thread.start()
    for index, work in enumerate(todo):
        if stop.is_set():
            break
        if id(work) in pooled:
            continue
        task = Task(index, work.candidate.path, work.candidate.file_type)
        _apply(work, parse_and_chunk(task, tokenizer, embedder.max_tokens, overlap, ocr), timings)
        out.put(work)
    if pool_thread:
        pool_thread.join()
    out.put(None)


def _embed_and_store(store, embedder, todo, report, timings, overlap, batch_size, checkpoint_seconds, emit, *,
                     ocr: bool, workers: int, parse_timeout: float):
    q: queue.Queue = queue.Queue(maxsize=64)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, daemon=True,
                                args=(todo, embedder, overlap, q, timings, stop, ocr, workers, parse_timeout, emit))
    producer.start()
    pending: list[tuple[_Work, int]] = []  # documents waiting for their vectors, with their first row in `texts`
    texts: list[str] = []
    done_files = 0
    failed_before = len(report.failed)  # found broken before parsing (a broken symlink): not among `todo`
    last_checkpoint = time.monotonic()
    t_start = time.monotonic()

    def show_progress(chunks: int) -> None:
        elapsed = max(time.monotonic() - t_start, 1e-9)
        emit({"event": "progress", "files_done": done_files + len(report.failed) - failed_before, "files": len(todo),
              "chunks": chunks, "chunks_per_s": chunks / elapsed, "files_per_s": done_files / elapsed})

    def flush():
        nonlocal texts, pending, done_files, last_checkpoint
        if not pending:
            return
        t = time.perf_counter()
        hashes = [embed_hash(text) for text in texts]
        known = store.vectors_by_embed_hash(hashes)  # renamed files, unchanged sections of edited ones
        new = [i for i, h in enumerate(hashes) if h not in known]
        vecs = np.zeros((len(texts), embedder.dim), np.float32)
        # longest first over the whole group, then in calls of EMBED_CALL texts: each call's batches pad little
        # (the rust-blog chunks padded to 1.11 times their tokens in groups of 256, 1.02 in groups of 2,048)
        order = sorted(new, key=lambda i: len(texts[i]), reverse=True)
        for start in range(0, len(order), EMBED_CALL):
            part = order[start:start + EMBED_CALL]
            vecs[part] = embedder.embed_batch([texts[i] for i in part])
            if start + EMBED_CALL < len(order):  # a long group still shows progress
                show_progress(report.chunks + start + len(part))
        for i, h in enumerate(hashes):
            if h in known:
                vecs[i] = known[h]
        report.reused_chunks += len(texts) - len(new)
        timings["embed"] += time.perf_counter() - t
        t = time.perf_counter()
        for work, first in pending:
            rows = vecs[first : first + len(work.chunks)]
            doc = work.doc
            store.replace_document(
                path=work.candidate.path, root=work.candidate.root, file_type=doc.file_type, title=doc.title,
                file_hash=work.file_hash, size=work.size, mtime=work.mtime, metadata=doc.metadata,
                chunks=[p.chunk for p in work.chunks], vectors=rows,
                embed_hashes=hashes[first : first + len(work.chunks)],
            )
            (report.updated if work.existed else report.added).append(work.candidate.path)
            report.chunks += len(work.chunks)
            report.warnings.extend(f"{work.candidate.path}: {w}" for w in doc.warnings)
            _crash_for_tests(len(report.added) + len(report.updated))
        done_files += len(pending)
        pending, texts = [], []
        if time.monotonic() - last_checkpoint > checkpoint_seconds:
            store.save_vectors(final=False)
            last_checkpoint = time.monotonic()
        timings["store"] += time.perf_counter() - t
        show_progress(report.chunks)

    try:
        while True:
            work = q.get()
            if work is None:
                break
            if work.error:
                reason = work.error
                if work.existed:  # the index must not keep answering from a version that no longer exists
                    store.delete_document(work.candidate.path)
                    reason += "; its previous version was removed from the index"
                report.failed.append(FileFailure(work.candidate.path, reason))
                continue
            pending.append((work, len(texts)))
            texts.extend(p.embed_text for p in work.chunks)
            if len(texts) >= batch_size:
                flush()
        flush()
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                producer.join(0.05)


CRASH_AFTER_ENV = "KB_TEST_CRASH_AFTER"


def _crash_for_tests(committed: int) -> None:
    """The crash-safety test's hook: SIGKILL this process once `committed` documents are committed."""
    after = os.environ.get(CRASH_AFTER_ENV)
    if after and committed >= int(after):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied: kb cannot read this file (check its permissions)"
    return e.strerror or str(e)


__all__ = ["run_ingest", "file_hash"]
