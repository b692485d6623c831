"""What a running `kb serve` holds: the knowledge base, the model gate, ingest jobs, keys.

llama.cpp contexts are not thread-safe, so the model runs one request at a time. A request that may need
the model is first *admitted* (a place in a bounded queue; none left: 429 with Retry-After, decided before
any response starts), then takes the model around each use through `GatedGenerator`. Retrieval, evidence
and refusals never wait for the model. A stream that is stopped (the client went away) closes the model's
token generator, which releases the model at once.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kb.errors import KBError


class Busy(KBError):
    """Every place in the model's queue is taken."""

    def __init__(self, retry_after: int):
        super().__init__("the model is busy with other requests", hint=f"retry in {retry_after} s")
        self.retry_after = retry_after


class ModelGate:
    """One model user at a time, at most `queue` requests admitted (running or waiting)."""

    def __init__(self, queue: int = 8):
        self.queue = queue
        self._admitted = 0
        self._count_lock = threading.Lock()
        self._model = threading.RLock()
        self._durations: deque[float] = deque(maxlen=20)

    @property
    def admitted(self) -> int:
        return self._admitted

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue times the recent time a request held the model."""
        typical = sum(self._durations) / len(self._durations) if self._durations else 2.0
        return max(1, round(typical * self.queue))

    def admit(self) -> "Admission":
        """A place in the queue, released by `release()` (once); Busy when none is left."""
        with self._count_lock:
            if self._admitted >= self.queue:
                raise Busy(self.retry_after())
            self._admitted += 1
        return Admission(self)

    def _leave(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    @contextmanager
    def hold(self) -> Iterator[None]:
        started = time.perf_counter()
        with self._model:
            yield
        self._durations.append(time.perf_counter() - started)


class Admission:
    def __init__(self, gate: ModelGate):
        self._gate = gate
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if not self._released:
                self._released = True
                self._gate._leave()


class GatedGenerator:
    """A Generator whose model work (generation; loading on first use) happens only while holding the gate."""

    def __init__(self, inner, gate: ModelGate):
        self.inner = inner
        self.gate = gate

    def __getattr__(self, name):  # model_id, path, n_ctx, format_chat, count_tokens, truncate ...
        return getattr(self.inner, name)

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        with self.gate.hold():
            pieces = self.inner.stream(prompt, **kwargs)
            try:
                yield from pieces
            finally:
                close = getattr(pieces, "close", None)
                if close:
                    close()


@dataclass
class Job:
    """A background ingest of uploaded files."""

    id: str
    paths: list[str]
    status: str = "queued"  # queued, waiting (for the write lock), running, done, failed
    progress: dict = field(default_factory=dict)
    report: dict | None = None
    error: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "status": self.status, "paths": self.paths, "progress": self.progress,
                "report": self.report, "error": self.error, "created_at": self.created_at,
                "finished_at": self.finished_at}


class Jobs:
    """Ingest jobs run one after another in a background thread, each with its own connection to the
    store, under the home's write lock (so a `kb ingest` in a shell and an upload never interleave)."""

    def __init__(self, make_kb):
        self._make_kb = make_kb
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, daemon=True, name="kb-ingest-jobs")
        self._thread.start()

    def submit(self, paths: list[str]) -> Job:
        with self._lock:
            job = Job(id=f"job-{next(self._ids)}-{int(time.time())}", paths=paths)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._wake.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def writer(self):
        """A knowledge base with its own connection, for a write outside the job queue (a delete)."""
        return self._make_kb()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                job = self._queue.popleft()
            self._ingest(job)

    def _ingest(self, job: Job) -> None:
        def progress(event: dict) -> None:
            if event["event"] in ("start", "progress"):
                job.progress = {k: v for k, v in event.items() if k != "event"}

        def waiting(pid) -> None:
            job.status = "waiting"
            job.progress = {"waiting_for_pid": pid}

        try:
            with self._make_kb() as kb:
                job.status = "running"
                report = kb.ingest(job.paths, progress=progress, wait=24 * 3600, on_wait=waiting)
            job.report = report.to_dict()
            job.status = "done"
        except Exception as e:  # reported to whoever polls the job; the server keeps serving
            job.error = f"{type(e).__name__}: {e}"
            if os.environ.get("KB_DEBUG"):
                traceback.print_exc()
            job.status = "failed"
        job.finished_at = time.time()


def upload_folder(home: Path) -> Path:
    return Path(home) / "uploads"


__all__ = ["Busy", "ModelGate", "Admission", "GatedGenerator", "Job", "Jobs", "upload_folder"]
