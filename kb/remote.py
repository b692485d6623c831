"""Remote models behind kb's own protocols: any OpenAI-compatible server (llama.cpp's llama-server,
llama-cpp-python's server, vLLM, Ollama) generates (`llm_url`) or embeds (`embed_url`).

Context packing stays exact: prompts are counted with the server's own tokenizer where it has an endpoint
for it (llama-server and vLLM `/tokenize`, llama-cpp-python `/extras/tokenize`), and the context size is the
one the server reports (llama-server `/props`, vLLM's `max_model_len`). Without a tokenizer endpoint, a text
counts as many tokens as it has UTF-8 bytes plus a margin for the chat template: a byte-level tokenizer never
makes more tokens than bytes, so the estimate can waste room but never overflow. Without a reported size the
context is `ctx` (2048 by default). Requests time out, 429 and 503 are retried with backoff (honouring
Retry-After), and an unreachable or garbled server is one clear error.
"""

from __future__ import annotations

import json
import random
import time
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from kb.errors import BadQuestion, KBError

MESSAGE_OVERHEAD = 8  # tokens a chat template adds around one message, at most, in the templates seen
REPLY_OVERHEAD = 8  # ... and to open the assistant's reply
RETRIES = 3


class RemoteModelError(KBError):
    """The model server cannot be reached, failed, or answered something that is not the OpenAI API."""


def _root(base_url: str) -> str:
    """The server's root, for its non-OpenAI endpoints: the base URL without a trailing /v1."""
    url = base_url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) \
        if parts.password or parts.username else url


class _Client:
    """A small HTTP client for one OpenAI-compatible server: timeouts, retries, one-line errors."""

    def __init__(self, base_url: str, api_key: str = "", timeout: float = 120.0, what: str = "model server"):
        import httpx

        self.base = base_url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.root = _root(self.base)
        self.what = what
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))
        self._httpx = httpx

    def request(self, method: str, url: str, **kwargs):
        """The response to a request, retried on 429/503 and connection failures; RemoteModelError otherwise."""
        httpx = self._httpx
        for attempt in range(RETRIES + 1):
            try:
                response = self.http.request(method, url, **kwargs)
            except httpx.TimeoutException as e:
                raise RemoteModelError(f"the {self.what} at {_shown(self.base)} did not answer in time ({type(e).__name__})",
                                       hint="is it overloaded? raise llm_timeout, or try again") from e
            except httpx.HTTPError as e:
                if attempt < 1:  # one quick retry: a refused connection is seldom transient, unlike a 429 or 503
                    time.sleep(0.5 + random.random() / 4)
                    continue
                raise RemoteModelError(f"cannot reach the {self.what} at {_shown(self.base)}: {e}",
                                       hint="check that it is running and the URL is right") from e
            if response.status_code in (429, 503) and attempt < RETRIES:
                wait = response.headers.get("retry-after", "")
                time.sleep(min(float(wait) if wait.replace(".", "", 1).isdigit() else 2 ** attempt, 30))
                continue
            return response
        return response

    def first_model(self, setting: str) -> str:
        """The id of the first model the server lists (/v1/models), used when `setting` names none."""
        models = self.json("GET", f"{self.base}/models").get("data") or []
        if not models or not isinstance(models[0], dict) or not models[0].get("id"):
            raise RemoteModelError(f"the {self.what} at {_shown(self.base)} lists no model",
                                   hint=f"set {setting} to the name of the model to use")
        return models[0]["id"]

    def json(self, method: str, url: str, **kwargs) -> dict:
        response = self.request(method, url, **kwargs)
        self.check(response)
        try:
            data = response.json()
        except ValueError as e:
            raise RemoteModelError(f"the {self.what} at {_shown(self.base)} answered {url.rsplit('/', 1)[-1]} with "
                                   f"something that is not JSON: {response.text[:120]!r}") from e
        if not isinstance(data, dict):
            raise RemoteModelError(f"the {self.what} at {_shown(self.base)} answered with unexpected JSON")
        return data

    def check(self, response) -> None:
        if response.status_code < 400:
            return
        try:
            detail = response.json().get("error", {})
            message = detail.get("message") if isinstance(detail, dict) else str(detail)
        except ValueError:
            message = response.text[:200]
        message = message or response.reason_phrase
        if response.status_code == 400 and any(w in message.lower() for w in ("context", "too long", "exceed")):
            raise BadQuestion(f"the {self.what} says the prompt does not fit its context: {message}",
                              hint="lower ctx (or set it to the server's context size), or ask a shorter question")
        raise RemoteModelError(f"the {self.what} at {_shown(self.base)} answered {response.status_code}: {message}")


class RemoteGenerator:
    """A chat model on an OpenAI-compatible server. Prompts are messages; kb never needs the model's template."""

    supports_prefill = False  # the chat API starts the reply itself

    def __init__(self, base_url: str, *, api_key: str = "", model: str = "", ctx: int = 2048, timeout: float = 120.0):
        self.client = _Client(base_url, api_key, timeout)
        self._model = model
        self._ctx_setting = ctx
        self._n_ctx: int | None = None
        self._tokenize = None  # the tokenizer endpoint found, or False for none

    @property
    def model(self) -> str:
        if not self._model:
            self._model = self.client.first_model("llm_model")
        return self._model

    @property
    def model_id(self) -> str:
        return f"{self.model} at {_shown(self.client.root)}"

    @property
    def n_ctx(self) -> int:
        if self._n_ctx is None:
            self._n_ctx = self._reported_context() or self._ctx_setting
        return self._n_ctx

    def _reported_context(self) -> int | None:
        try:
            props = self.client.request("GET", f"{self.client.root}/props")
            if props.status_code == 200:
                data = props.json()
                n = (data.get("default_generation_settings") or {}).get("n_ctx") or data.get("n_ctx")
                if isinstance(n, int) and n > 0:
                    return n
            listed = self.client.request("GET", f"{self.client.base}/models")
            if listed.status_code == 200:
                for m in listed.json().get("data") or []:
                    if isinstance(m, dict) and m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                        return m["max_model_len"]
        except (ValueError, RemoteModelError):
            return None
        return None

    # A "prompt" is the messages as JSON: what format_chat gives, count_tokens counts and stream sends.
    def format_chat(self, messages: list[dict]) -> str:
        return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)

    def _messages(self, prompt: str) -> list[dict]:
        try:
            messages = json.loads(prompt)
        except ValueError:
            messages = None
        return messages if isinstance(messages, list) else [{"role": "user", "content": prompt}]

    def count_tokens(self, text: str) -> int:
        try:
            messages = json.loads(text)
        except ValueError:
            messages = None
        if isinstance(messages, list):  # a formatted chat: its contents and the template around them
            return sum(self._count(m.get("content", "")) + MESSAGE_OVERHEAD for m in messages) + REPLY_OVERHEAD
        return self._count(text)

    def _count(self, text: str) -> int:
        if not text:
            return 0
        tokens = self._server_tokens(text)
        return len(tokens) if tokens is not None else len(text.encode("utf-8")) + 2

    def _server_tokens(self, text: str) -> list | None:
        if self._tokenize is False:
            return None
        candidates = [self._tokenize] if self._tokenize else [
            (f"{self.client.root}/tokenize", lambda t: {"content": t, "prompt": t, "model": self.model, "add_special": False}),
            (f"{self.client.root}/extras/tokenize", lambda t: {"input": t})]
        for url, body in candidates:
            try:
                response = self.client.request("POST", url, json=body(text))
                tokens = response.json().get("tokens") if response.status_code == 200 else None
            except (ValueError, RemoteModelError):
                tokens = None
            if isinstance(tokens, list):
                self._tokenize = (url, body)
                return tokens
        self._tokenize = False
        return None

    def truncate(self, text: str, n_tokens: int) -> str:
        """The longest start of `text` within `n_tokens`, by the server's count (or the byte estimate)."""
        if self._count(text) <= n_tokens:
            return text
        low, high = 0, len(text)
        while low < high:  # binary search on characters: counts grow with the length
            mid = (low + high + 1) // 2
            if self._count(text[:mid]) <= n_tokens:
                low = mid
            else:
                high = mid - 1
        return text[:low]

    def stream(self, prompt: str, *, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        body = {"model": self.model, "messages": self._messages(prompt), "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "stream": True}
        client = self.client
        for attempt in range(RETRIES + 1):
            try:
                with client.http.stream("POST", f"{client.base}/chat/completions", json=body) as response:
                    if response.status_code in (429, 503) and attempt < RETRIES:
                        response.read()
                        wait = response.headers.get("retry-after", "")
                        time.sleep(min(float(wait) if wait.replace(".", "", 1).isdigit() else 2 ** attempt, 30))
                        continue
                    if response.status_code >= 400:
                        response.read()
                        client.check(response)
                    yield from self._pieces(response)
                    return
            except client._httpx.TimeoutException as e:
                raise RemoteModelError(f"the model server at {_shown(client.base)} did not answer in time ({type(e).__name__})",
                                       hint="is it overloaded? raise llm_timeout, or try again") from e
            except client._httpx.HTTPError as e:
                raise RemoteModelError(f"cannot reach the model server at {_shown(client.base)}: {e}",
                                       hint="check that it is running and the URL is right") from e

    def _pieces(self, response) -> Iterator[str]:
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError as e:
                raise RemoteModelError(f"the model server at {_shown(self.client.base)} streamed something that is "
                                       f"not JSON: {data[:120]!r}") from e
            if isinstance(chunk, dict) and chunk.get("error"):
                error = chunk["error"]
                raise RemoteModelError(f"the model server failed mid-answer: "
                                       f"{error.get('message') if isinstance(error, dict) else error}")
            try:
                choice = chunk["choices"][0] if chunk.get("choices") else None
            except (KeyError, TypeError, IndexError) as e:
                raise RemoteModelError(f"the model server at {_shown(self.client.base)} streamed an unexpected chunk: "
                                       f"{data[:120]!r}") from e
            text = ((choice or {}).get("delta") or {}).get("content") if isinstance(choice, dict) else None
            if text:
                yield text
        # the stream ended without its [DONE]: the server failed after it had started answering
        raise RemoteModelError(
            f"the model server at {_shown(self.client.base)} ended the answer without finishing it",
            hint="its log says why; a prompt longer than its context window fails this way on llama-cpp-python's "
                 "server: set ctx to the server's context size")


class RemoteEmbedder:
    """An embedding model on an OpenAI-compatible server (`/v1/embeddings`). The index records the model's
    name and dimension, so a store built with one remote model refuses another. Chunks are sized with the
    bundled tokenizer, within `max_tokens` of it (254, well inside the 512 or more that embedding servers take)."""

    languages = None  # unknown: trusted for every language

    def __init__(self, base_url: str, *, api_key: str = "", model: str = "", max_tokens: int = 254,
                 batch_size: int = 64, timeout: float = 120.0):
        self.client = _Client(base_url, api_key, timeout, what="embedding server")
        self._model = model
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self._dim: int | None = None

    @property
    def model_name(self) -> str:
        if not self._model:
            self._model = self.client.first_model("embed_model")
        return self._model

    @property
    def model_id(self) -> str:
        return f"remote:{self.model_name}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = len(self.embed_query("dimension"))
        return self._dim

    @property
    def tokenizer(self):
        from kb.embedder import Tokenizer, bundled_embedder_path

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = Tokenizer(bundled_embedder_path())
        return self._tokenizer

    def embed_batch(self, texts) -> np.ndarray:
        texts = list(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            part = texts[start:start + self.batch_size]
            data = self.client.json("POST", f"{self.client.base}/embeddings",
                                    json={"model": self.model_name, "input": part, "encoding_format": "float"})
            try:
                rows = sorted(data["data"], key=lambda d: d["index"])
                vectors = np.array([r["embedding"] for r in rows], dtype=np.float32)
            except (KeyError, TypeError, ValueError) as e:
                raise RemoteModelError(f"the embedding server at {_shown(self.client.base)} answered without "
                                       f"embeddings: {str(data)[:120]}") from e
            if vectors.shape[0] != len(part):
                raise RemoteModelError(f"the embedding server returned {vectors.shape[0]} vectors for {len(part)} texts")
            out.append(vectors)
        if not out:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        vectors = np.vstack(out)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)  # kb's vectors are unit length, whatever the server sends
        self._dim = vectors.shape[1]
        return vectors

    def embed_query(self, text: str) -> np.ndarray:
        return self.embed_batch([text])[0]


__all__ = ["RemoteGenerator", "RemoteEmbedder", "RemoteModelError"]
