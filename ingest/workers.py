"""Worker processes that parse and chunk files, so that a PDF-heavy corpus uses every core.

Each worker runs one file at a time (one page image at a time for OCR, so memory stays bounded) and sends
back the parsed document with its chunks. A file that takes longer than `timeout` seconds has its worker
killed and replaced, and is reported: one stuck file never stalls an ingest. Workers are started with
`spawn`, so they never inherit a half-initialized torch or llama.cpp from the main process.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from typing import Iterator


@dataclass
class Task:
    index: int
    path: str
    file_type: str


@dataclass
class Result:
    index: int
    doc: object = None  # ParsedDocument
    chunks: list = field(default_factory=list)  # PreparedChunk
    error: str | None = None
    parse_s: float = 0.0
    chunk_s: float = 0.0


def parse_and_chunk(task: Task, tokenizer, max_tokens: int, overlap: int, ocr: bool, on_page=None) -> Result:
    """Parse one file and cut it into chunks; every failure becomes the result's error, never an exception."""
    from ingest.chunk import chunk_document
    from ingest.parse import parse_file
    from kb.errors import KBError

    result = Result(task.index)
    t = time.perf_counter()
    try:
        result.doc = parse_file(task.path, task.file_type, ocr=ocr, on_page=on_page)
    except KBError as e:
        result.error = str(e) + (f" ({e.hint})" if e.hint else "")
    except MemoryError:
        result.error = "not enough memory to parse this file"
    except Exception as e:  # a parser bug on one hostile file must not stop ten thousand others
        result.error = f"parser error: {type(e).__name__}: {e}"
    result.parse_s = time.perf_counter() - t
    if result.doc is not None:
        t = time.perf_counter()
        try:
            result.chunks = chunk_document(result.doc, tokenizer, max_tokens, overlap)
            if not result.chunks:
                result.error = "no text to index after parsing"
        except Exception as e:
            result.error = f"chunking error: {type(e).__name__}: {e}"
        result.chunk_s = time.perf_counter() - t
    return result


def _worker(conn, tokenizer, max_tokens: int, overlap: int, ocr: bool) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # onnxruntime (OCR): one core per worker
    while True:
        task = conn.recv()
        if task is None:
            return

        def page(done, total, ocr_pages, index=task.index):
            conn.send(("page", index, done, total, ocr_pages))

        conn.send(("result", parse_and_chunk(task, tokenizer, max_tokens, overlap, ocr, on_page=page)))


class ParsePool:
    """`workers` processes; `run(tasks)` yields ("page", index, done, total, ocr_pages) progress and
    ("result", Result) as files finish, in completion order."""

    def __init__(self, workers: int, tokenizer, max_tokens: int, overlap: int, *, ocr: bool = True,
                 timeout: float = 600.0):
        self.size = workers
        self.args = (tokenizer, max_tokens, overlap, ocr)
        self.timeout = timeout
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[list] = []  # [process, connection, task or None, started]

    def _start(self) -> list:
        here, there = self.context.Pipe()
        process = self.context.Process(target=_worker, args=(there, *self.args), daemon=True)
        process.start()
        there.close()
        return [process, here, None, 0.0]

    def run(self, tasks: list[Task]) -> Iterator[tuple]:
        pending = list(reversed(tasks))
        self.workers = [self._start() for _ in range(min(self.size, len(tasks)))]
        try:
            while pending or any(w[2] is not None for w in self.workers):
                for w in self.workers:
                    if w[2] is None and pending:
                        w[2], w[3] = pending.pop(), time.monotonic()
                        w[1].send(w[2])
                busy = [w for w in self.workers if w[2] is not None]
                ready = wait_any([w[1] for w in busy] + [w[0].sentinel for w in busy], timeout=1.0)
                now = time.monotonic()
                for w in busy:
                    if w[1] in ready:
                        try:
                            message = w[1].recv()
                        except (EOFError, OSError):
                            message = None
                        if message is not None:
                            if message[0] == "result":
                                w[2] = None
                            yield message
                            continue
                    dead = not w[0].is_alive()
                    if dead or now - w[3] > self.timeout:
                        task = w[2]
                        reason = (f"parsing stopped after {self.timeout:.0f} s (parse_timeout): the file is too slow "
                                  "to read, or the parser is stuck on it") if not dead else \
                            f"the parser crashed on this file (exit code {w[0].exitcode})"
                        self._stop(w)
                        w[:] = self._start()
                        yield ("result", Result(task.index, error=reason))
        finally:
            for w in self.workers:
                self._stop(w, gently=True)

    @staticmethod
    def _stop(w: list, gently: bool = False) -> None:
        process, conn = w[0], w[1]
        if gently and process.is_alive():
            try:
                conn.send(None)
                process.join(5)
            except (OSError, BrokenPipeError):
                pass
        if process.is_alive():
            process.kill()
            process.join(5)
        conn.close()


__all__ = ["ParsePool", "Task", "Result", "parse_and_chunk"]
