"""The OpenAI-compatible routes: GET /v1/models, POST /v1/chat/completions, POST /v1/embeddings.

What real clients rely on (the official `openai` client, Open WebUI, ChatGPT-Next-Web, Chatbox): a model
list to verify a connection; streamed chunks with text in `choices[0].delta.content`, never a null delta,
a last chunk with `finish_reason`, `usage` when `stream_options.include_usage` asks, then `data: [DONE]`;
errors as {"error": {"message", "type", "code"}}. kb's sources and evidence ride along in a `kb` field
that clients ignore, and, for plain chat clients, as a short "Sources:" list appended to the text.
"""

from __future__ import annotations

import json
import re
import time

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from kb.serve.app import (MAX_MESSAGE_CHARS, ApiError, ChatCompletionRequest, EmbeddingRequest, new_id,
                          stream_in_thread, vector_payload)

_MODEL = re.compile(r"^kb(?::(?P<persona>[^@]+))?(?:@(?P<adapter>.+))?$")


def register(app: FastAPI, state, auth) -> None:
    kb = state.kb

    def model_ids() -> list[str]:
        from kb.adapters import list_adapters
        from kb.prompting import personas

        ids = ["kb"] + [f"kb:{name}" for name in personas(kb.config_home)]
        ids += [f"kb@{a['name']}" for a in list_adapters(kb.config_home) if a.get("finished")]
        return ids

    def resolve(model: str):
        """(knowledge base to answer with, persona) for a model id; 404 for one kb does not serve."""
        from kb.adapters import list_adapters
        from kb.prompting import personas

        m = _MODEL.match(model or "kb")
        persona, adapter = (m.group("persona"), m.group("adapter")) if m else (None, None)
        known_adapters = {a["name"] for a in list_adapters(kb.config_home) if a.get("finished")}
        if not m or (persona and persona not in personas(kb.config_home)) or (adapter and adapter not in known_adapters):
            raise ApiError(404, f"the model {model!r} does not exist; GET /v1/models lists them ({', '.join(model_ids())})",
                           "invalid_request_error", "model_not_found")
        return (state.kb_for(adapter) if adapter else kb), persona

    @app.get("/v1/models", dependencies=[auth("read")])
    def list_models():
        now = int(state.started)
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "kb"}
                                           for i in model_ids()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[auth("read")])
    def get_model(model_id: str):
        resolve(model_id)
        return {"id": model_id, "object": "model", "created": int(state.started), "owned_by": "kb"}

    @app.post("/v1/embeddings", dependencies=[auth("read")])
    def embeddings(body: EmbeddingRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ApiError(400, "input must be a non-empty string or a list of non-empty strings")
        if len(texts) > 2048 or sum(len(t) for t in texts) > 4_000_000:
            raise ApiError(400, "too much input for one request: at most 2048 texts, 4 million characters")
        if body.encoding_format not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be float or base64")
        embedder = kb.embedder
        vectors = [embedder.embed_query(texts[0])] if len(texts) == 1 else embedder.embed_batch(texts)
        tokens = sum(embedder.tokenizer.count(t) for t in texts)
        return {"object": "list", "model": embedder.model_id,
                "data": [{"object": "embedding", "index": i, "embedding": vector_payload(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/chat/completions", dependencies=[auth("read")])
    async def chat_completions(body: ChatCompletionRequest):
        target, persona = resolve(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not messages:
            raise ApiError(400, "messages must not be empty")
        if any(len(m["content"]) > MAX_MESSAGE_CHARS for m in messages):
            raise ApiError(400, f"a message is longer than {MAX_MESSAGE_CHARS:,} characters; ask a shorter question",
                           code="message_too_long")
        options = body.answer_options()
        if body.max_completion_tokens and "max_tokens" not in options:
            options["max_tokens"] = body.max_completion_tokens
        if persona:
            options["persona"] = persona
        admission = state.gate.admit()

        def make_stream():
            if not body.use_context:
                return plain_chat(target, messages, options)
            from kb.chat import prepare_conversation

            # follow-ups use the model: not under the store lock
            prepared = prepare_conversation(target, messages, extractive=options.get("extractive"), lock=state.lock)
            with state.lock:
                return target._answer(**prepared, log=False, **options)

        completion_id, created = new_id("chatcmpl"), int(time.time())
        if not body.stream:
            return await run_in_threadpool(complete, make_stream, admission, body, completion_id, created)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return EventSourceResponse(stream_chunks(make_stream, admission, body, completion_id, created, include_usage),
                                   ping=15, sep="\n")

    def complete(make_stream, admission, body, completion_id, created):
        try:
            stream = make_stream()
            answer = stream.result()
        finally:
            admission.release()
        log_answer(answer)
        text = answer.text + (sources_text(answer) if body.sources_in_text else "")
        usage = usage_of(answer)
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": usage, "kb": kb_fields(answer)}

    async def stream_chunks(make_stream, admission, body, completion_id, created, include_usage):
        def chunk(delta: dict, finish=None, **extra) -> str:
            return json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": body.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                               **extra}, ensure_ascii=False)

        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in stream_in_thread(make_stream, admission):
            if kind == "piece" and value:
                yield chunk({"content": value})
            elif kind == "error":
                status, message = error_of(value)
                yield json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                            else "server_error", "code": status}}, ensure_ascii=False)
                yield "[DONE]"
                return
            elif kind == "done":
                answer = value
                log_answer(answer)
                if body.sources_in_text:
                    extra = sources_text(answer)
                    if extra:
                        yield chunk({"content": extra})
                yield chunk({}, "stop", kb=kb_fields(answer))
                if include_usage:
                    yield json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                      "model": body.model, "choices": [], "usage": usage_of(answer)})
        yield "[DONE]"

    def log_answer(answer) -> None:
        from kb.history import log_ask

        with state.lock:
            log_ask(kb._open_store(), answer)

    def plain_chat(target, messages, options):
        """`use_context: false`: the model alone, on the conversation as given (no retrieval, no sources)."""
        from kb.answer import AnswerStream

        generator = target.generator
        prompt = generator.format_chat([{"role": m["role"], "content": m["content"]} for m in messages])
        room = generator.n_ctx - generator.count_tokens(prompt)
        if room < 8:
            raise ApiError(400, "the conversation does not fit the model's context window; send fewer messages",
                           code="context_length_exceeded")
        settings = target.settings
        pieces = generator.stream(prompt, max_tokens=min(options.get("max_tokens", settings.max_tokens), room),
                                  temperature=options.get("temperature", settings.temperature),
                                  seed=options.get("seed", settings.seed))
        return AnswerStream(question=messages[-1]["content"], standalone=messages[-1]["content"], sources=[],
                            refused=False, model=generator.model_id, timings={}, pieces=pieces, on_done=None)


def error_of(e: BaseException) -> tuple[int, str]:
    from kb.errors import KBError

    if isinstance(e, ApiError):
        return e.status, e.message
    if isinstance(e, KBError):
        return 400, str(e) + (f" ({e.hint})" if e.hint else "")
    return 500, f"internal error: {type(e).__name__}: {e}"


def sources_text(answer) -> str:
    """A short "Sources:" list for chat clients that show only the text: the cited passages, else those given."""
    if answer.refused or not answer.sources:
        return ""
    shown = [s for s in answer.sources if s.cited] or answer.sources
    lines = [f"[{s.n}] {s.title or s.path}" + (f" — p. {s.page}" if s.page else "") + f" ({s.path})" for s in shown]
    return "\n\nSources:\n" + "\n".join(lines)


def usage_of(answer) -> dict:
    prompt = int(answer.timings.get("prompt_tokens", 0))
    completion = int(answer.timings.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def kb_fields(answer) -> dict:
    data = answer.to_dict()
    return {key: data[key] for key in ("sources", "evidence", "refused", "extractive", "answerability", "notice",
                                       "generated", "support", "timings")}


__all__ = ["register", "sources_text", "kb_fields", "error_of"]
