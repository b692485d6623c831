"""Remote models through --llm-url / --embed-url: llama-cpp-python's own OpenAI-compatible server with the
bundled GGUF (started here on a free loopback port), and a scripted server for every way a server fails."""

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FakeEmbedder, FakeGenerator
from kb.errors import BadQuestion, ModelMismatch

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How often should I feed a sourdough starter on the counter?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a scripted OpenAI-compatible server ----------------------------------------------------------------


class Scripted:
    """Answers each request with the next scripted behaviour (the last one repeats)."""

    def __init__(self, *behaviours):
        self.behaviours = list(behaviours)
        self.requests = []

    def next(self):
        return self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]


def chat_chunks(text: str) -> bytes:
    out = [json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    import re

    out += [json.dumps({"choices": [{"index": 0, "delta": {"content": w}}]}) for w in re.findall(r"\S+\s*", text)]
    return ("".join(f"data: {c}\n\n" for c in out) + "data: [DONE]\n\n").encode()


def embedding_reply(texts, model="scripted-embedder"):
    vecs = [FakeEmbedder()._vector(t) * 3.0 for t in texts]  # not unit length: kb normalizes
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vecs)]}


@pytest.fixture
def scripted_server():
    servers = []

    def start(script: Scripted):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body: bytes, content_type="application/json", headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/models"):
                    return self._send(200, json.dumps({"data": [{"id": "scripted-model", "object": "model"}]}).encode())
                self._send(404, b'{"error": {"message": "no such route"}}')

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                script.requests.append((self.path, body))
                if "tokenize" in self.path:
                    return self._send(404, b'{"detail": "Not Found"}')
                behaviour = script.next()
                kind = behaviour[0]
                if kind == "sleep":
                    time.sleep(behaviour[1])
                    return self._send(200, chat_chunks("late"), "text/event-stream")
                if kind == "status":
                    return self._send(behaviour[1], json.dumps({"error": {"message": behaviour[2]}}).encode(),
                                      headers=behaviour[3] if len(behaviour) > 3 else None)
                if kind == "garbage":
                    return self._send(200, b"data: {this is not json\n\n", "text/event-stream")
                if kind == "text":
                    return self._send(200, chat_chunks(behaviour[1]), "text/event-stream")
                if kind == "embed":
                    return self._send(200, json.dumps(embedding_reply(body["input"], model=behaviour[1])).encode())
                raise AssertionError(kind)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that gave up (the timeout test) is expected here

        server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def docs_kb(make_kb, corpus):
    def make(**settings):
        kb = make_kb(**settings)
        kb.ingest([corpus])
        return kb
    return make


ALPHA = "What is the first letter of the Greek alphabet?"


def test_a_remote_model_answers_with_citations(docs_kb, scripted_server):
    script = Scripted(("text", "Alpha is the first letter of the Greek alphabet [1]."))
    url = scripted_server(script)
    kb = docs_kb(llm_url=url)
    answer = kb.ask(ALPHA)
    assert not answer.refused and answer.text.startswith("Alpha is the first letter") and answer.sources[0].cited
    path, body = [r for r in script.requests if r[0].endswith("/chat/completions")][-1]
    assert path == "/v1/chat/completions" and body["model"] == "scripted-model" and body["stream"]
    assert body["messages"][-1]["role"] == "user" and "Documents:" in body["messages"][-1]["content"]
    # the prompt was counted with the byte estimate (no tokenizer endpoint): it can only over-count
    prompt_bytes = sum(len(m["content"].encode()) for m in body["messages"])
    assert answer.timings["prompt_tokens"] >= prompt_bytes
    chats = [r for r in script.requests if r[0].endswith("/chat/completions")]
    assert kb.ask("How do volcanoes erupt under the ocean?").refused and len(chats) == 1  # a refusal calls no model


def test_a_429_with_retry_after_is_retried(docs_kb, scripted_server):
    script = Scripted(("status", 429, "slow down", {"Retry-After": "1"}), ("text", "Alpha is first [1]."))
    kb = docs_kb(llm_url=scripted_server(script), check_support=False)
    started = time.monotonic()
    answer = kb.ask(ALPHA)
    assert "Alpha is first" in answer.text and time.monotonic() - started >= 1
    assert len([r for r in script.requests if r[0].endswith("/chat/completions")]) == 2


@pytest.mark.parametrize("behaviour, message", [
    (("status", 500, "the GPU caught fire"), "answered 500: the GPU caught fire"),
    (("garbage",), "not JSON"),
    (("sleep", 3), "did not answer in time"),
    (("status", 400, "This model's maximum context length is 256 tokens, your prompt exceeds it"), "does not fit its context"),
])
def test_server_failures_are_one_clear_error(docs_kb, scripted_server, behaviour, message):
    kb = docs_kb(llm_url=scripted_server(Scripted(behaviour)), llm_timeout=1)
    with pytest.raises(Exception) as e:
        kb.ask(ALPHA)
    assert message in str(e.value)
    if behaviour[0] == "status" and behaviour[1] == 400:
        assert isinstance(e.value, BadQuestion)


def test_a_server_that_is_down_is_one_line_in_the_cli(corpus, home, monkeypatch, fake_embedder):
    import kb.api
    from kb.cli import cli

    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", str(corpus), "--kb", str(home), "-q"]).exit_code == 0
    result = runner.invoke(cli, ["ask", ALPHA, "--kb", str(home), "--llm-url", f"http://127.0.0.1:{free_port()}/v1"])
    assert result.exit_code == 1 and "cannot reach the model server" in result.stderr
    assert "Traceback" not in result.output


def test_remote_embeddings_for_ingest_and_queries(make_kb, corpus, scripted_server, tmp_path):
    from kb.api import KnowledgeBase

    url = scripted_server(Scripted(("embed", "scripted-embedder")))
    kb = KnowledgeBase(tmp_path / "h", embed_url=url)  # the model: the first the server lists
    report = kb.ingest([corpus])
    assert len(report.added) == 3
    assert kb.status()["embedding_model"] == "remote:scripted-model" and kb.status()["dim"] == 64
    hits = kb.search("Greek alphabet first letter", k=1, mode="dense")
    assert hits[0].path.endswith("alpha.md")
    assert abs(float(np.linalg.norm(kb.embedder.embed_query("x"))) - 1) < 1e-5  # unit length, whatever was sent
    kb.close()
    with pytest.raises(ModelMismatch, match="scripted-model"):
        KnowledgeBase(tmp_path / "h", embed_url=url, embed_model="another-model").search("alpha", mode="dense")


# --- llama-cpp-python's own server, with the bundled GGUF --------------------------------------------------


def start_llama_server(n_ctx: int):
    import tempfile

    from kb.generator import bundled_model_path, runtime_model_file

    port = free_port()
    log = tempfile.TemporaryFile()
    # the file kb itself loads for the bundled model (its Q8_0 copy), so that both run the same weights
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model",
                             str(runtime_model_file(bundled_model_path())),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT)  # a pipe nobody reads would fill and block it
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"llama_cpp.server did not start: {log.read().decode(errors='replace')[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def llama_server():
    proc, url = start_llama_server(2048)
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def examples_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("remote-home")
    subprocess.run([sys.executable, "-m", "kb", "ingest", str(ROOT / "examples"), "--kb", str(home), "-q"],
                   check=True, cwd=ROOT)
    (home / "prompts").mkdir()
    # no prefill: a chat API starts the reply itself, so the in-process prompt is made the same for comparing
    (home / "prompts" / "answer_prefix.txt").write_text("")
    return home


@pytest.mark.real
def test_the_same_answer_in_process_and_through_llama_cpp_python_server(llama_server, examples_home):
    from kb.api import KnowledgeBase

    options = dict(temperature=0.0, seed=0, max_tokens=48, check_support=False)
    with KnowledgeBase(examples_home, **options) as local, KnowledgeBase(examples_home, llm_url=llama_server, **options) as remote:
        for question in (QUESTION, "When should I replace a bike chain?"):
            a, b = local.ask(question, log=False), remote.ask(question, log=False)
            assert not a.refused and a.text == b.text, (a.text, b.text)
            assert [s.path for s in a.sources] == [s.path for s in b.sources]
        # exact packing: the server's own tokenizer counted the prompt
        assert remote.generator._tokenize and remote.generator._tokenize[0].endswith("/extras/tokenize")
        stream = remote.ask_stream(QUESTION, log=False)
        pieces = list(stream)
        assert len(pieces) > 3 and "".join(pieces).strip() and stream.answer.sources
        chat = remote.chat()
        chat.ask(QUESTION)
        follow_up = chat.ask("And in the fridge?")
        assert not follow_up.refused and follow_up.standalone_question
        refused = remote.ask("What is the capital of Peru?", log=False)
        assert refused.refused and refused.model == ""
    with KnowledgeBase(examples_home, llm_url=llama_server, ctx=256, max_tokens=512, check_support=False) as small:
        answer = small.ask(QUESTION, log=False)
        assert not answer.refused and answer.timings["prompt_tokens"] + answer.timings["completion_tokens"] <= 256


@pytest.mark.real
def test_a_server_context_smaller_than_the_prompt_is_a_clear_error(examples_home):
    from kb.api import KnowledgeBase

    from kb.remote import RemoteModelError

    proc, url = start_llama_server(256)
    try:
        with KnowledgeBase(examples_home, llm_url=url, check_support=False) as kb:  # kb assumes 2048
            with pytest.raises(RemoteModelError) as e:
                kb.ask(QUESTION, log=False)
            assert "without finishing" in str(e.value) and "ctx" in e.value.hint
        # told the server's size, kb packs to fit it
        with KnowledgeBase(examples_home, llm_url=url, ctx=256, check_support=False) as kb:
            answer = kb.ask(QUESTION, log=False)
            assert answer.timings["prompt_tokens"] + answer.timings["completion_tokens"] <= 256
    finally:
        proc.terminate()
        proc.wait(20)
