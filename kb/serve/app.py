"""The `kb serve` application: OpenAI-compatible routes, kb's own routes, the web page. A thin face: every
answer, search and ingest goes through KnowledgeBase exactly as the command line's do."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kb.errors import BadQuestion, KBError, NotIngested
from kb.serve.keys import KeyRing
from kb.serve.state import Busy, GatedGenerator, Jobs, ModelGate, upload_folder

STATIC = Path(__file__).parent / "static"
MAX_MESSAGE_CHARS = 32_000  # a question longer than this is an error, not a prompt


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}


def error_body(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# --- requests -----------------------------------------------------------------------------------------


class FilterFields(BaseModel):
    """Document filters, with the names of kb's --path, --tag, --since, --until and --type options."""

    model_config = ConfigDict(extra="forbid")
    path: str | None = None
    tags: list[str] = []
    date_from: str | None = None
    date_to: str | None = None
    file_types: list[str] = []

    def filters(self):
        from kb.retriever import Filters

        return Filters(path=self.path, tags=self.tags, date_from=self.date_from, date_to=self.date_to,
                       file_types=self.file_types)


class AnswerFields(BaseModel):
    """Options of one answer, named as kb's settings (kb/options.py)."""

    top_k: int | None = Field(default=None, ge=1, le=50)
    k: int | None = Field(default=None, ge=1, le=50, description="alias of top_k")
    search_mode: str | None = Field(default=None, pattern="^(dense|lexical|hybrid)$")
    min_score: float | None = Field(default=None, ge=0, le=1)
    extractive: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=5)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)
    seed: int | None = None
    filters: FilterFields | None = None

    def answer_options(self) -> dict:
        options = dict(k=self.top_k or self.k, mode=self.search_mode, min_score=self.min_score,
                       extractive=self.extractive, temperature=self.temperature, max_tokens=self.max_tokens,
                       seed=self.seed)
        if self.filters is not None:
            options["filters"] = self.filters.filters()
        return {k: v for k, v in options.items() if v is not None}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in self.content if isinstance(p, dict) and p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(AnswerFields):
    model_config = ConfigDict(extra="allow")  # top_p, user, presence_penalty ... are accepted and ignored
    model: str = "kb"
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: dict | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=8192)
    use_context: bool = True
    sources_in_text: bool = True


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | list[str]
    model: str = "kb"
    encoding_format: str = "float"


class SearchRequest(BaseModel):
    query: str
    top_k: int | None = Field(default=None, ge=1, le=100)
    k: int | None = Field(default=None, ge=1, le=100)
    search_mode: str | None = Field(default=None, pattern="^(dense|lexical|hybrid)$")
    filters: FilterFields | None = None


class AskRequest(AnswerFields):
    question: str
    persona: str | None = None
    conversation_id: int | None = None  # with `chat`: continue this stored conversation
    chat: bool = False  # a turn of a stored conversation (kb's chat path), else a single ask
    stream: bool = False


# --- the app ----------------------------------------------------------------------------------------------


class ServerState:
    def __init__(self, kb, *, queue: int, max_upload_mb: int, keys: KeyRing):
        from kb.api import KnowledgeBase

        self.kb = kb
        self.gate = ModelGate(queue)
        self.keys = keys
        self.max_upload = max_upload_mb << 20
        self.lock = threading.RLock()  # one reader of the store connection at a time (searches are ms)
        self.variants: dict[str, Any] = {"": kb}
        kb._generator = GatedGenerator(kb.generator, self.gate)
        self.jobs = Jobs(lambda: KnowledgeBase(kb.home, embedder=kb.embedder, settings=kb.settings,
                                               config_home=kb.config_home))
        self.started = time.time()

    def kb_for(self, adapter: str):
        """The knowledge base answering with `adapter` (loaded on first use, then kept)."""
        from kb.api import KnowledgeBase

        with self.lock:
            if adapter not in self.variants:
                variant = KnowledgeBase(self.kb.home, embedder=self.kb.embedder, config_home=self.kb.config_home,
                                        settings=self.kb.settings.replace(adapter=adapter))
                variant._generator = GatedGenerator(variant.generator, self.gate)
                self.variants[adapter] = variant
            return self.variants[adapter]


def create_app(kb, *, queue: int = 8, max_upload_mb: int = 100, cors_origins: list[str] | None = None) -> FastAPI:
    """The application over `kb` (a KnowledgeBase). Keys are read from the home's keys.json."""
    state = ServerState(kb, queue=queue, max_upload_mb=max_upload_mb, keys=KeyRing(kb.config_home))

    @asynccontextmanager
    async def lifespan(app):
        yield
        for variant in state.variants.values():
            variant.close()

    app = FastAPI(title="kb", description="Your documents, answerable: an OpenAI-compatible API and kb's own.",
                  version=_version(), lifespan=lifespan)
    app.state.kb = state
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        limit = state.max_upload + (1 << 20) if request.url.path == "/api/documents" else 16 << 20
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            return JSONResponse(error_body(f"the request body is {int(length) >> 20} MB; the limit is {limit >> 20} MB",
                                           "invalid_request_error", "request_too_large"), status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(Busy)
    async def busy(request, e: Busy):
        return JSONResponse(error_body(f"{e} ({e.hint})", "rate_limit_error", "model_busy"), status_code=429,
                            headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(KBError)
    async def kb_error(request, e: KBError):
        message = str(e) + (f" ({e.hint})" if e.hint else "")
        code = "not_ingested" if isinstance(e, NotIngested) else type(e).__name__
        return JSONResponse(error_body(message, "invalid_request_error", code), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'] if x != 'body')}: {err['msg']}" for err in e.errors())
        return JSONResponse(error_body(f"invalid request: {problems or 'malformed JSON'}", "invalid_request_error",
                                       "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind, str(e.status_code)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error", "internal_error"),
                            status_code=500)

    def auth(role: str):
        def check(request: Request):
            if not state.keys.enabled:
                return None
            header = request.headers.get("authorization", "")
            secret = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
            found = state.keys.check(secret)
            if found is None:
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            if role == "write" and found[1] != "write":
                raise ApiError(403, f"the key {found[0]!r} may read, not add or delete documents", "permission_error",
                               "insufficient_role")
            return found
        return Depends(check)

    from kb.serve import openai_routes, routes

    openai_routes.register(app, state, auth)
    routes.register(app, state, auth)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kb-assistant")
    except PackageNotFoundError:
        return "0"


# --- streaming answers from a worker thread ---------------------------------------------------------------


async def stream_in_thread(make_stream, admission):
    """Run `make_stream()` (an AnswerStream) and its iteration in a thread; yield ("start", stream),
    ("piece", text) ... then ("done", answer) or ("error", exception). When the consumer stops early (the
    client went away), the thread stops the model's generation at the next token and frees its place."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            cancel.set()

    def work():
        try:
            stream = make_stream()
            put(("start", stream))
            pieces = iter(stream)
            for piece in pieces:
                if cancel.is_set():
                    pieces.close()  # GeneratorExit runs down to llama.cpp's own generator
                    return
                put(("piece", piece))
            put(("done", stream.answer))
        except BaseException as e:  # handed to the consumer, which answers in OpenAI's error shape
            put(("error", e))
        finally:
            admission.release()

    threading.Thread(target=work, daemon=True, name="kb-answer").start()
    try:
        while True:
            kind, value = await queue.get()
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        cancel.set()


def vector_payload(vector: np.ndarray, encoding: str):
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def safe_upload_name(name: str) -> str:
    """A file name that cannot leave the upload folder: the last path part, no control characters, no dots
    at the start, at most 200 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip().lstrip(".")
    base = base[-200:]
    return base if base and base not in (".", "..") else f"upload-{uuid.uuid4().hex[:8]}"


__all__ = ["create_app", "stream_in_thread", "safe_upload_name", "ApiError", "MAX_MESSAGE_CHARS"]
