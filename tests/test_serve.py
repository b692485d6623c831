"""kb serve: the OpenAI-compatible API with the official client, kb's API, keys, bad input, concurrency,
and the web page in a real headless Chromium. Servers listen on loopback, on free ports, and are stopped here."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import FakeGenerator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """uvicorn serving `app` in a thread of this process, on a free loopback port; stopped on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class SlowGenerator(FakeGenerator):
    """Answers one word every `delay` seconds and records how many words it produced."""

    def __init__(self, delay=0.05, words=40, **kw):
        super().__init__(**kw)
        self.delay, self.words, self.produced = delay, words, 0

    def stream(self, prompt, *, max_tokens, temperature, seed):
        self.prompts.append(prompt)
        for i in range(min(self.words, max_tokens)):
            time.sleep(self.delay)
            self.produced += 1
            yield f"alpha{i} "


@pytest.fixture
def served(make_kb, corpus):
    """A server over the test corpus with fake models; yields (base url, knowledge base)."""
    from kb.serve.app import create_app

    def start(generator=None, queue=8, **settings):
        kb = make_kb(generator=generator or FakeGenerator(), **settings)
        kb.ingest([corpus])
        return kb, create_app(kb, queue=queue, max_upload_mb=1)

    return start


QUESTION = "What is the first letter of the Greek alphabet?"


def test_openai_shapes_with_fakes(served):
    kb, app = served()
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        models = client.get("/v1/models").json()
        assert {"kb", "kb:teacher", "kb:editor"} <= {m["id"] for m in models["data"]}
        body = {"model": "kb:teacher", "messages": [{"role": "user", "content": QUESTION}]}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "stop"
        assert "Sources:" in reply["choices"][0]["message"]["content"] and "alpha.md" in reply["choices"][0]["message"]["content"]
        assert reply["kb"]["sources"][0]["path"].endswith("alpha.md") and reply["usage"]["total_tokens"] > 0
        assert "patient teacher" in kb.generator.inner.prompts[-1]  # the persona from the model name
        plain = client.post("/v1/chat/completions", json={**body, "sources_in_text": False}).json()
        assert "Sources:" not in plain["choices"][0]["message"]["content"]
        no_context = client.post("/v1/chat/completions", json={**body, "use_context": False}).json()
        assert no_context["kb"]["sources"] == [] and "Documents:" not in kb.generator.inner.prompts[-1]
        lines = []
        with client.stream("POST", "/v1/chat/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert all(c["choices"] == [] or c["choices"][0]["delta"] is not None for c in chunks)  # never a null delta
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and "kb" in chunks[-2]
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        # a stream ends with the answer kb stands behind (after the model's own text, when that was replaced)
        assert text.endswith(reply["choices"][0]["message"]["content"])
        refused = client.post("/v1/chat/completions", json={"model": "kb", "messages": [
            {"role": "user", "content": "How do volcanoes erupt under the ocean?"}]}).json()
        assert refused["kb"]["refused"] and refused["choices"][0]["message"]["content"].startswith("The documents do not contain")


def test_kb_api_search_ask_conversations_documents(served, tmp_path):
    kb, app = served()
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        hits = client.post("/api/search", json={"query": "photons energy", "k": 2}).json()["hits"]
        assert hits[0]["path"].endswith("gamma.md") and len(hits) <= 2
        filtered = client.post("/api/search", json={"query": "letter", "filters": {"tags": ["physics"]}}).json()
        assert all(h["path"].endswith("gamma.md") for h in filtered["hits"])
        answer = client.post("/api/ask", json={"question": QUESTION, "extractive": True}).json()
        assert answer["extractive"] and answer["evidence"] and "Alpha" in answer["answer"]
        first = client.post("/api/ask", json={"question": QUESTION, "chat": True}).json()
        again = client.post("/api/ask", json={"question": "And in statistics?", "chat": True,
                                              "conversation_id": first["conversation_id"]}).json()
        assert again["conversation_id"] == first["conversation_id"]
        conversations = client.get("/api/conversations").json()["conversations"]
        assert conversations[0]["id"] == first["conversation_id"] and conversations[0]["messages"] == 4
        messages = client.get(f"/api/conversations/{first['conversation_id']}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        events = []
        with client.stream("POST", "/api/ask", json={"question": QUESTION, "stream": True}) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:])))
        assert events[0][0] == "start" and events[-1][0] == "done" and any(e == "token" for e, _ in events)
        assert events[0][1]["evidence"] and events[-1][1]["answer"]
        docs = client.get("/api/documents").json()["documents"]
        assert {Path(d["path"]).name for d in docs} == {"alpha.md", "beta.txt", "gamma.md"}
        status = client.get("/api/status").json()
        assert status["documents"] == 3 and status["keys_required"] is False
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.get("/docs").status_code == 200 and "/v1/chat/completions" in client.get("/openapi.json").text


def test_uploads_jobs_and_deletes(served):
    kb, app = served()
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        files = [("files", ("../../../etc/evil.md", b"# Evil\n\nThe volcano note says magma rises.\n", "text/markdown")),
                 ("files", ("empty.txt", b"", "text/plain")),
                 ("files", ("archive.zip", b"PK\x03\x04", "application/zip"))]
        reply = client.post("/api/documents", files=files).json()
        saved = [Path(p) for p in reply["saved"]]
        uploads = (kb.home / "uploads").resolve()
        assert [p.name for p in saved] == ["evil.md"] and saved[0].resolve().parent == uploads
        assert any("empty" in p for p in reply["problems"]) and any("file type" in p for p in reply["problems"])
        job = reply["job"]
        for _ in range(200):
            job = client.get(f"/api/jobs/{job['id']}").json()
            if job["status"] in ("done", "failed"):
                break
            time.sleep(0.05)
        assert job["status"] == "done" and job["report"]["added"] == [str(saved[0])]
        assert any(h["path"].endswith("evil.md") for h in client.post("/api/search", json={"query": "magma volcano"}).json()["hits"])
        removed = client.delete("/api/documents", params={"path": str(saved[0])}).json()
        assert removed["removed"] == [str(saved[0])] and not saved[0].exists()
        assert client.delete("/api/documents", params={"path": str(saved[0])}).status_code == 404
        big = client.post("/api/documents", files=[("files", ("big.txt", b"x" * (3 << 20), "text/plain"))])
        assert big.status_code == 413 and big.json()["error"]["message"]
        leftovers = [p.name for p in uploads.iterdir()]
        assert leftovers == [], leftovers  # nothing half-written


def test_bad_requests_are_clear_errors_and_the_server_keeps_serving(served):
    kb, app = served()
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        cases = [
            (client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400),
            (client.post("/v1/chat/completions", json={"model": "kb", "messages": []}), 400),
            (client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404),
            (client.post("/v1/chat/completions", json={"model": "kb", "messages": [{"role": "user", "content": "x" * (10 << 20)}]}), 400),
            (client.post("/v1/chat/completions", json={"model": "kb", "messages": [{"role": "assistant", "content": "hi"}]}), 400),
            (client.post("/v1/embeddings", json={"input": []}), 400),
            (client.post("/api/search", json={"query": "  "}), 400),
            (client.post("/api/documents", content=b"x" * (3 << 20), headers={"content-type": "application/octet-stream"}), 413),
            (client.get("/api/jobs/nope"), 404),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.status_code, response.text[:300])
            error = response.json()["error"]
            assert error["message"] and error["type"] and "Traceback" not in error["message"]
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.post("/v1/chat/completions", json={"model": "kb", "messages": [
            {"role": "user", "content": QUESTION}]}).status_code == 200


def test_keys_roles_and_exposure(served, home):
    from kb.serve import check_exposure, Exposed
    from kb.serve.keys import create_key, revoke_key

    kb, app = served()
    with pytest.raises(Exposed) as refused:
        check_exposure("0.0.0.0", keys_enabled=False)
    assert "without an API key" in str(refused.value) and "kb keys create" in refused.value.hint
    check_exposure("127.0.0.1", keys_enabled=False)
    check_exposure("0.0.0.0", keys_enabled=True)
    reader = create_key(home, "reader", "read")
    writer = create_key(home, "writer", "write")
    stored = (home / "keys.json").read_text()
    assert reader not in stored and writer not in stored  # only hashes are kept
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer kb-wrong"}).status_code == 401
        assert client.get("/healthz").status_code == 200
        auth = {"Authorization": f"Bearer {reader}"}
        assert client.get("/v1/models", headers=auth).status_code == 200
        upload = client.post("/api/documents", headers=auth, files=[("files", ("n.md", b"# N\n\nnote\n", "text/markdown"))])
        assert upload.status_code == 403 and upload.json()["error"]["type"] == "permission_error"
        ok = client.post("/api/documents", headers={"Authorization": f"Bearer {writer}"},
                         files=[("files", ("n.md", b"# N\n\nnote\n", "text/markdown"))])
        assert ok.status_code == 200
        revoke_key(home, "reader")
        assert client.get("/v1/models", headers=auth).status_code == 401


def test_a_full_queue_is_429_and_a_disconnect_frees_the_model(served):
    generator = SlowGenerator(delay=0.05, words=200)
    kb, app = served(generator=generator, queue=1, check_support=False)
    body = {"model": "kb", "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            while generator.produced < 3:
                next(lines)
            busy = client.post("/v1/chat/completions", json=body)
            assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
            assert busy.json()["error"]["type"] == "rate_limit_error"
        # the client went away after a few words: the generation stops and the place is free again
        time.sleep(0.5)
        stopped_at = generator.produced
        assert stopped_at < 60
        time.sleep(0.5)
        assert generator.produced == stopped_at
        assert client.get("/healthz").json()["model_queue"] == 0
        assert client.post("/v1/chat/completions", json={**body, "stream": False}).status_code == 200
        assert kb.log(10)[0]["question"] == QUESTION  # the finished one is logged, the abandoned one is not
        assert len(kb.log(10)) == 1


def test_searches_do_not_wait_for_the_model(served):
    generator = SlowGenerator(delay=0.1, words=30)
    kb, app = served(generator=generator, check_support=False)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        done = threading.Event()

        def long_answer():
            client.post("/v1/chat/completions", json={"model": "kb", "messages": [{"role": "user", "content": QUESTION}]})
            done.set()

        threading.Thread(target=long_answer).start()
        while generator.produced < 2:
            time.sleep(0.01)
        started = time.perf_counter()
        assert client.post("/api/search", json={"query": "alpha"}).status_code == 200
        assert time.perf_counter() - started < 1.0 and not done.is_set()
        done.wait(10)


# --- with the bundled models, in a kb serve process ---------------------------------------------------------


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from kb.serve.keys import create_key

    home = tmp_path_factory.mktemp("serve-home")
    subprocess.run([sys.executable, "-m", "kb", "ingest", str(EXAMPLES), "--kb", str(home), "-q"], check=True, cwd=ROOT)
    keys = {"read": create_key(home, "reader", "read"), "write": create_key(home, "writer", "write")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kb", "serve", "--kb", str(home), "--port", str(port),
                             "--max-tokens", "48"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"kb serve did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.2)
    yield url, keys, home
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.real
def test_the_official_openai_client_against_kb_serve(real_server):
    import openai

    url, keys, home = real_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=keys["read"])
    assert {"kb", "kb:teacher"} <= {m.id for m in client.models.list()}
    reply = client.chat.completions.create(model="kb", messages=[
        {"role": "user", "content": "How often should I feed a sourdough starter on the counter?"}])
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    extra = reply.model_extra["kb"]
    assert extra["sources"][0]["path"].endswith("sourdough.md") and "Sources:" in reply.choices[0].message.content
    stream = client.chat.completions.create(model="kb", stream=True, stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "番茄每天需要多少小时的阳光？"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "六到八" in text and chunks[-1].usage.total_tokens >= 0
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason == "stop")
    assert final.model_extra["kb"]["extractive"] and final.model_extra["kb"]["sources"][0]["path"].endswith("zh-garden.md")
    embedding = client.embeddings.create(model="kb", input="sourdough starter")
    assert len(embedding.data[0].embedding) == 384
    refused = client.chat.completions.create(model="kb", messages=[{"role": "user", "content": "What is the capital of Peru?"}])
    assert refused.model_extra["kb"]["refused"] and "do not contain" in refused.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="kb-not-a-key").models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    denied = httpx.post(f"{url}/api/documents", headers={"Authorization": f"Bearer {keys['read']}"},
                        files=[("files", ("note.md", b"# Note\n\ntext\n", "text/markdown"))])
    assert denied.status_code == 403


def test_a_disconnect_mid_stream_with_the_real_model(real_server):
    url, keys, _ = real_server
    headers = {"Authorization": f"Bearer {keys['read']}"}
    body = {"model": "kb", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Explain how to care for a sourdough starter in detail."}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        for i, line in enumerate(r.iter_lines()):
            if i > 4:
                break
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    ok = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60,
                    json={**body, "stream": False, "max_tokens": 8})
    assert ok.status_code == 200


# --- the web page in a real browser -----------------------------------------------------------------------


def chromium() -> tuple[str, str] | None:
    """Debian's chromium and chromedriver, installed here when missing and running as root (as in CI)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if (not browser or not driver) and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver", "fonts-noto-cjk"],
                       env=env, capture_output=True)
        browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    found = chromium()
    if found is None:
        pytest.skip("needs Debian's chromium and chromium-driver (installed automatically when running as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--lang=en-US", "--window-size=1280,900"):
        options.add_argument(flag)
    # the profile and chromium's own scratch folders (org.chromium.Chromium.*) in pytest's temporary folder, not
    # left behind in /tmp after every run
    scratch = tmp_path_factory.mktemp("chromium")
    options.add_argument(f"--user-data-dir={scratch / 'profile'}")
    service = Service(found[1], env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=options)
    yield driver
    driver.quit()


def test_the_page_asks_streams_and_uploads(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    kb, app = served(generator=SlowGenerator(delay=0.02, words=30), check_support=False)
    note = tmp_path / "volcanoes.md"
    note.write_text("# Volcanoes\n\nMagma rises through the crust and erupts as lava.\n")
    with running(app) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "3 documents" in d.find_element(By.ID, "status").text)
        browser.find_element(By.ID, "question").send_keys(QUESTION)
        browser.find_element(By.ID, "ask").click()
        seen = []  # the answer grows while it streams
        wait.until(lambda d: seen.append(d.find_element(By.CSS_SELECTOR, "[data-testid=answer]").text) or "alpha5" in seen[-1])
        assert any(t and "alpha29" not in t for t in seen)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=sources] li"))
        sources = browser.find_element(By.CSS_SELECTOR, "[data-testid=sources]").text
        assert "Alpha notes" in sources
        assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=evidence] mark")
        # a PDF's line break inside Chinese text is no space; the highlight offsets still fit the source text
        span = browser.execute_script("const s = highlight('映射关\\n系。 the\\nend', [[2, 5]]);"
                                      "return [s.textContent, s.querySelector('mark').textContent];")
        assert span == ["映射关系。 the\nend", "关系"]
        form = browser.execute_script("return highlight('购买方：上海明远\\n金额合计：3,260元', []).textContent;")
        assert form == "购买方：上海明远\n金额合计：3,260元"  # two lines of a form: the break stays
        table = browser.execute_script("const s = highlight('Plans:\\n| Plan | Seats |\\n|---|---|\\n| Team | 10 |', []);"
                                       "return [s.querySelectorAll('br').length, s.textContent];")
        assert table == [2, "Plans:| Plan | Seats || Team | 10 |"]  # a row a line (<br>), no rule line
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#conversations li"))
        browser.find_element(By.ID, "files").send_keys(str(note))
        wait.until(lambda d: "Added: 1" in d.find_element(By.ID, "upload-status").text)
        wait.until(lambda d: "Volcanoes" in d.find_element(By.ID, "documents").text)
        browser.save_screenshot(str(tmp_path / "page.png"))
