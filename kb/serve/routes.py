"""kb's own routes, for what the OpenAI API cannot say: search, ask with evidence, documents and uploads,
ingest jobs, status, stored conversations, health."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from kb.serve.app import MAX_MESSAGE_CHARS, ApiError, AskRequest, SearchRequest, safe_upload_name, stream_in_thread
from kb.serve.state import upload_folder

UPLOAD_TYPES = {".md", ".markdown", ".txt", ".rst", ".html", ".htm", ".pdf", ".docx", ".png", ".jpg", ".jpeg", ".tif",
                ".tiff", ".webp", ".bmp"}


def register(app: FastAPI, state, auth) -> None:
    kb = state.kb

    @app.get("/healthz")
    def health():
        return {"status": "ok", "home": str(kb.home), "uptime_s": round(time.time() - state.started, 1),
                "model_queue": state.gate.admitted}

    @app.get("/api/status", dependencies=[auth("read")])
    def status():
        with state.lock:
            info = kb.status()
        info["keys_required"] = state.keys.enabled
        return info

    @app.post("/api/search", dependencies=[auth("read")])
    def search(body: SearchRequest):
        if not body.query.strip():
            raise ApiError(400, "the query is empty")
        with state.lock:
            result = kb.search_result(body.query, body.top_k or body.k, mode=body.search_mode,
                                      filters=body.filters.filters() if body.filters else None)
        return {"query": body.query, "mode": result.mode, "hits": [h.to_dict() for h in result.hits],
                "timings": {k: round(v, 2) for k, v in result.timings.items() if isinstance(v, float)}}

    def make_answer_stream(body: AskRequest):
        options = body.answer_options()
        if body.persona:
            options["persona"] = body.persona
        if body.chat:
            from kb.chat import Chat

            chat = Chat(kb, resume=body.conversation_id or False, store_lock=state.lock)
            stream = chat.stream(body.question, **options)
            stream.conversation_id = chat.id
            return stream
        from kb.history import log_ask

        with state.lock:
            stream = kb._answer(body.question, body.question, log=False, **options)

        def logged(answer):
            with state.lock:
                log_ask(kb._open_store(), answer)

        stream._on_done = logged
        return stream

    @app.post("/api/ask", dependencies=[auth("read")])
    async def ask(body: AskRequest):
        if not body.question.strip():
            raise ApiError(400, "the question is empty")
        if len(body.question) > MAX_MESSAGE_CHARS:
            raise ApiError(400, f"the question is longer than {MAX_MESSAGE_CHARS:,} characters", code="message_too_long")
        admission = state.gate.admit()
        if not body.stream:
            def run():
                try:
                    stream = make_answer_stream(body)
                    answer = stream.result()
                finally:
                    admission.release()
                return {**answer.to_dict(), "conversation_id": getattr(stream, "conversation_id", None)}
            return await run_in_threadpool(run)

        async def events():
            async for kind, value in stream_in_thread(lambda: make_answer_stream(body), admission):
                if kind == "start":
                    yield {"event": "start", "data": json.dumps({
                        "sources": [s.to_dict() for s in value.sources],
                        "evidence": [e.to_dict() for e in value.evidence], "refused": value.refused,
                        "extractive": value.extractive, "notice": value.notice,
                        "conversation_id": getattr(value, "conversation_id", None)}, ensure_ascii=False)}
                elif kind == "piece":
                    yield {"event": "token", "data": json.dumps(value, ensure_ascii=False)}
                elif kind == "done":
                    yield {"event": "done", "data": json.dumps(value.to_dict(), ensure_ascii=False)}
                else:
                    from kb.serve.openai_routes import error_of

                    status, message = error_of(value)
                    yield {"event": "error", "data": json.dumps({"status": status, "message": message})}

        return EventSourceResponse(events(), ping=15, sep="\n")

    @app.get("/api/conversations", dependencies=[auth("read")])
    def conversations(limit: int = Query(50, ge=1, le=500)):
        from kb.history import list_conversations

        with state.lock:
            return {"conversations": list_conversations(kb._open_store(), limit)} if _ingested(kb) else {"conversations": []}

    @app.get("/api/conversations/{conversation_id}", dependencies=[auth("read")])
    def conversation(conversation_id: int):
        from kb.history import conversation_messages

        with state.lock:
            found = conversation_messages(kb._open_store(), conversation_id) if _ingested(kb) else None
        if found is None:
            raise ApiError(404, f"no conversation {conversation_id}", "not_found_error", "not_found")
        return found

    @app.get("/api/documents", dependencies=[auth("read")])
    def documents():
        with state.lock:
            docs = kb._open_store().list_documents() if _ingested(kb) else []
        return {"documents": docs, "upload_folder": str(upload_folder(kb.home))}

    @app.delete("/api/documents", dependencies=[auth("write")])
    def delete_document(path: str = Query(..., min_length=1)):
        target = os.path.abspath(path)
        with state.jobs.writer() as writer:  # its own connection: waiting for an ingest blocks no reader
            removed = writer.forget(target, wait=30)
        if not removed:
            raise ApiError(404, f"no ingested document at {path}", "not_found_error", "not_found")
        folder = upload_folder(kb.home).resolve()
        for p in removed:  # an uploaded file is deleted too, or the next upload's ingest would bring it back
            resolved = Path(p).resolve()
            if folder in resolved.parents and resolved.is_file():
                resolved.unlink()
        return {"removed": removed}

    @app.post("/api/documents", dependencies=[auth("write")])
    async def upload(files: list[UploadFile] = File(...)):
        folder = upload_folder(kb.home)
        folder.mkdir(parents=True, exist_ok=True)
        saved, problems = [], []
        for upload_file in files:
            name = safe_upload_name(upload_file.filename or "")
            if Path(name).suffix.lower() not in UPLOAD_TYPES:
                problems.append(f"{upload_file.filename}: kb does not read this file type "
                                f"({', '.join(sorted(UPLOAD_TYPES))})")
                continue
            try:
                path = await run_in_threadpool(_receive, upload_file, folder, name, state.max_upload)
            except ApiError as e:
                problems.append(f"{upload_file.filename}: {e.message}")
                continue
            saved.append(str(path))
        if not saved:
            raise ApiError(400, "no file was taken: " + "; ".join(problems), code="no_usable_file")
        job = state.jobs.submit(saved)
        return {"job": job.to_dict(), "saved": saved, "problems": problems}

    @app.get("/api/jobs/{job_id}", dependencies=[auth("read")])
    def job(job_id: str):
        found = state.jobs.get(job_id)
        if found is None:
            raise ApiError(404, f"no job {job_id}", "not_found_error", "not_found")
        return found.to_dict()


def _ingested(kb) -> bool:
    return kb._has_store()


def _receive(upload_file, folder: Path, name: str, limit: int) -> Path:
    """Write an upload under a temporary name, then rename it: a failed or oversized upload leaves nothing.
    A name already taken gets a number: an upload never replaces another file silently."""
    tmp = folder / f".upload-{os.getpid()}-{time.monotonic_ns()}"
    size = 0
    try:
        with tmp.open("wb") as out:
            while block := upload_file.file.read(1 << 20):
                size += len(block)
                if size > limit:
                    raise ApiError(413, f"larger than the upload limit of {limit >> 20} MB", code="file_too_large")
                out.write(block)
        if size == 0:
            raise ApiError(400, "the file is empty", code="empty_file")
        target = folder / name
        stem, suffix, n = target.stem, target.suffix, 1
        while True:
            try:
                os.link(tmp, target)  # fails if the name is taken, even by an upload arriving at the same time
                return target
            except FileExistsError:
                n += 1
                target = folder / f"{stem}-{n}{suffix}"
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["register"]
