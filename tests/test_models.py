"""kb models: discovery of the GGUFs already on the machine, names as --model, safe resumable pulls."""

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_gguf
from kb.errors import ModelNotFound
from kb.models import PullError, discover, expand_url, pull, remove, resolve_name, set_default

META = {"general.architecture": "qwen2", "general.file_type": 15, "general.size_label": "1.5B",
        "qwen2.context_length": 32768, "general.languages": ["en", "zh"],
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake machine with models in Ollama's, LM Studio's, GPT4All's and the Hugging Face cache's places."""
    ollama = tmp_path / "ollama"
    blob = write_gguf(ollama / "blobs" / ("sha256-" + "ab" * 32), META)
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "qwen2.5" / "1.5b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "ab" * 32},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32}]}))
    lmstudio = tmp_path / "lmstudio"
    write_gguf(lmstudio / "lmstudio-community" / "Llama-3.2-1B" / "Llama-3.2-1B-Q4_K_M.gguf",
               {"general.architecture": "llama", "llama.context_length": 131072, "general.file_type": 15})
    gpt4all = tmp_path / "gpt4all"
    write_gguf(gpt4all / "orca-mini-3b.gguf", {"general.architecture": "llama"})
    (gpt4all / "notes.gguf").write_text("not a model")
    hub = tmp_path / "hub"
    write_gguf(hub / "models--Qwen--Qwen2.5-0.5B-GGUF" / "snapshots" / "abc123" / "qwen2.5-0.5b-q8_0.gguf",
               {"general.architecture": "qwen2", "general.file_type": 7})
    for variable, folder in (("OLLAMA_MODELS", ollama), ("LMSTUDIO_MODELS", lmstudio), ("GPT4ALL_MODELS", gpt4all),
                             ("HF_HUB_CACHE", hub)):
        monkeypatch.setenv(variable, str(folder))
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    return home, blob


def test_discovery_names_sizes_and_metadata(machine):
    home, blob = machine
    found = {m.name: m for m in discover(home)}
    assert {"bundled", "qwen2.5:1.5b", "Llama-3.2-1B-Q4_K_M", "orca-mini-3b", "Qwen/Qwen2.5-0.5B-GGUF/qwen2.5-0.5b-q8_0",
            "notes"} <= set(found)
    qwen = found["qwen2.5:1.5b"]
    assert (qwen.source, qwen.path, qwen.architecture, qwen.quantization) == ("ollama", str(blob), "qwen2", "Q4_K_M")
    assert qwen.parameters == 1_500_000_000 and qwen.context_length == 32768 and qwen.chat_template
    assert qwen.languages == ["en", "zh"]
    assert found["bundled"].languages == ["en"] and found["bundled"].architecture == "llama"
    assert found["Llama-3.2-1B-Q4_K_M"].context_length == 131072 and found["Llama-3.2-1B-Q4_K_M"].source == "lmstudio"
    assert "not a GGUF" in found["notes"].error


def test_a_listed_name_works_as_model_and_bad_names_are_clear(machine, tmp_path):
    from kb.api import KnowledgeBase

    home, blob = machine
    assert resolve_name(home, "qwen2.5:1.5b") == blob
    assert KnowledgeBase(home, model="qwen2.5:1.5b").model_path() == blob
    with pytest.raises(ModelNotFound) as e:
        resolve_name(home, "qwen2.5:7b")
    assert "qwen2.5:1.5b" in e.value.hint  # close matches are offered
    write_gguf(home / "models" / "orca-mini-3b.gguf", {"general.architecture": "llama"})
    with pytest.raises(ModelNotFound, match="2 models are called"):
        resolve_name(home, "orca-mini-3b")
    result = CliRunner().invoke(__import__("kb.cli").cli.cli, ["ask", "x", "--kb", str(home), "--model", "nonesuch"])
    assert result.exit_code == 1 and "no model file or model named 'nonesuch'" in result.stderr


def test_listing_reads_headers_only(tmp_path, monkeypatch):
    for variable in ("OLLAMA_MODELS", "LMSTUDIO_MODELS", "GPT4ALL_MODELS", "HF_HUB_CACHE"):
        monkeypatch.setenv(variable, str(tmp_path / "none"))
    home = tmp_path / "home"
    big = write_gguf(home / "models" / "huge-70b.gguf", {"general.architecture": "llama", "llama.context_length": 8192})
    with big.open("r+b") as f:  # a 40 GB file on paper, its header only on disk
        f.truncate(40 << 30)
    started = time.perf_counter()
    found = {m.name: m for m in discover(home)}
    assert time.perf_counter() - started < 1.0
    assert found["huge-70b"].size == 40 << 30 and found["huge-70b"].context_length == 8192


def test_cli_models_list_and_default(machine):
    from kb.cli import cli

    home, blob = machine
    runner = CliRunner()
    listed = runner.invoke(cli, ["models", "--kb", str(home)])
    assert listed.exit_code == 0 and "qwen2.5:1.5b" in listed.output and "Q4_K_M" in listed.output
    as_json = json.loads(runner.invoke(cli, ["models", "--kb", str(home), "--json"]).output)
    assert any(m["name"] == "qwen2.5:1.5b" and m["path"] == str(blob) for m in as_json)
    (home / "config.toml").write_text('top_k = 7\nmodel = "old.gguf"\n')
    result = runner.invoke(cli, ["models", "default", "qwen2.5:1.5b", "--kb", str(home)])
    assert result.exit_code == 0, result.output
    config = (home / "config.toml").read_text()
    assert 'model = "qwen2.5:1.5b"' in config and "top_k = 7" in config and "old.gguf" not in config


# --- pulls from a local server ---------------------------------------------------------------------------


class Served:
    def __init__(self, body: bytes, *, drop_after: int | None = None, hang: bool = False, etag: str | None = None):
        self.body, self.drop_after, self.hang, self.etag = body, drop_after, hang, etag
        self.ranges = []


@pytest.fixture
def file_server():
    servers = []

    def start(served: Served):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith("missing.gguf"):
                    self.send_error(404)
                    return
                if served.hang:
                    time.sleep(5)
                    return
                start = 0
                requested = self.headers.get("Range")
                served.ranges.append(requested)
                if requested:
                    start = int(requested.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(served.body) - 1}/{len(served.body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(served.body) - start))
                if served.etag:
                    self.send_header("ETag", f'"{served.etag}"')
                self.end_headers()
                body = served.body[start:]
                if served.drop_after is not None:
                    self.wfile.write(body[:served.drop_after])
                    self.wfile.flush()
                    served.drop_after = None  # the next request goes through
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # dropped and hanging connections are the point

        server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def gguf_bytes(tmp_path):
    return write_gguf(tmp_path / "src.gguf", {"general.architecture": "llama", "llama.context_length": 4096},
                      pad_to=300_000).read_bytes()


def test_pull_interrupted_then_resumed(tmp_path, file_server, gguf_bytes):
    served = Served(gguf_bytes, drop_after=120_000)
    url = file_server(served) + "/tiny-model.gguf"
    home = tmp_path / "home"
    with pytest.raises(PullError, match="120000 bytes are kept to resume"):
        pull(home, url)
    part = home / "models" / ".tiny-model.gguf.part"
    assert part.exists() and 0 < part.stat().st_size < len(gguf_bytes)
    assert not (home / "models" / "tiny-model.gguf").exists()  # never a half-written file under the final name
    info = pull(home, url, sha256=hashlib.sha256(gguf_bytes).hexdigest())
    assert served.ranges[-1] == "bytes=120000-"  # it asked for the rest only
    assert (home / "models" / "tiny-model.gguf").read_bytes() == gguf_bytes and not part.exists()
    assert info.name == "tiny-model" and info.context_length == 4096
    listed = {m.name: m.source for m in discover(home)}
    assert listed["tiny-model"] == "home"
    assert remove(home, "tiny-model").name == "tiny-model.gguf" and not (home / "models" / "tiny-model.gguf").exists()


def test_pull_refusals_leave_nothing_behind(tmp_path, file_server, gguf_bytes):
    home = tmp_path / "home"
    url = file_server(Served(gguf_bytes)) + "/m.gguf"
    with pytest.raises(PullError, match="sha256"):
        pull(home, url, sha256="0" * 64)
    assert list((home / "models").iterdir()) == []
    bad = file_server(Served(b"<html>not a model</html>" * 100)) + "/fake.gguf"
    with pytest.raises(PullError, match="not a GGUF"):
        pull(home, bad)
    assert list((home / "models").iterdir()) == []
    published = file_server(Served(gguf_bytes, etag="f" * 64)) + "/etag.gguf"
    with pytest.raises(PullError, match="not " + "f" * 64):  # the server's published sha256 is checked too
        pull(home, published)
    with pytest.raises(PullError, match="404"):
        pull(home, file_server(Served(gguf_bytes)) + "/missing.gguf")
    started = time.monotonic()
    with pytest.raises(PullError, match="did not answer within 1 s"):
        pull(home, file_server(Served(gguf_bytes, hang=True)) + "/slow.gguf", timeout=1)
    assert time.monotonic() - started < 10
    with pytest.raises(ModelNotFound, match="did not pull"):
        remove(home, "bundled")


def test_hf_urls_expand():
    assert expand_url("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf") == \
        "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    with pytest.raises(PullError):
        expand_url("ftp://example/x.gguf")


NO_NETWORK = """
import socket, sys
def refuse(self, address, *args):
    if self.family != socket.AF_UNIX:
        raise RuntimeError(f"network used: {address}")
    return real(self, address, *args)
real = socket.socket.connect
socket.socket.connect = refuse
from kb.api import KnowledgeBase
answer = KnowledgeBase(sys.argv[1], max_tokens=16).ask("How often should I feed a sourdough starter?", log=False)
print("answered" if answer.text else "empty")
"""


@pytest.mark.real
def test_kb_ask_with_the_bundled_model_never_touches_the_network(tmp_path):
    root = Path(__file__).resolve().parents[1]
    home = tmp_path / "home"
    subprocess.run([sys.executable, "-m", "kb", "ingest", str(root / "examples"), "--kb", str(home), "-q"],
                   check=True, cwd=root)
    result = subprocess.run([sys.executable, "-c", NO_NETWORK, str(home)], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "KB_HOME": str(home)})
    assert result.returncode == 0 and "answered" in result.stdout, result.stderr[-2000:]


def test_embedding_device_choice_and_its_cpu_fallback(monkeypatch):
    """CI has no GPU: `auto` must pick the CPU path (and bf16 only where the CPU has it); `cuda` without a GPU
    is a clear error; with a GPU torch can see, `auto` picks it and drops bf16 autocast for fp16."""
    import numpy as np
    import torch

    from kb.embedder import SentenceTransformerEmbedder

    auto = SentenceTransformerEmbedder()
    if not torch.cuda.is_available():
        assert auto.device == "cpu"
        cpu = torch.cpu
        native = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                      or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        assert auto.use_bf16 == native
        vectors = auto.embed_batch(["sourdough starter feeding", "a second sentence"])
        assert vectors.shape == (2, auto.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
        assert next(auto.model.parameters()).device.type == "cpu"
        with pytest.raises(ModelNotFound, match="no CUDA GPU"):
            SentenceTransformerEmbedder(device="cuda").device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = SentenceTransformerEmbedder()
    assert seen.device == "cuda" and seen.use_bf16 is False
    assert SentenceTransformerEmbedder(device="cpu").device == "cpu"
