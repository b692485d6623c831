import builtins
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, FakeEmbedder, as_before_migration, write_dotted_notes
from kb.errors import Locked, ModelMismatch, NotIngested
from kb.store.sqlite import SQLiteStore as Store, write_lock


def _consistent(home: Path) -> tuple[int, int]:
    """FAISS ids == SQLite chunk ids, and FTS rows == chunks; returns (documents, chunks)."""
    store = Store(home)
    try:
        ids_db = sorted(r[0] for r in store.db.execute("SELECT id FROM chunks"))
        ids_index = sorted(store.vectors().ids().tolist())
        assert ids_db == ids_index
        fts = store.db.execute("SELECT count(*) FROM chunks_fts").fetchone()[0]
        assert fts == len(ids_db)
        torn = store.db.execute(
            "SELECT count(*) FROM documents d WHERE n_chunks != (SELECT count(*) FROM chunks c WHERE c.doc_id = d.id)"
        ).fetchone()[0]
        assert torn == 0  # each document went in with all its chunks, or not at all
        return store.counts()
    finally:
        store.close()


def test_ingest_then_search(make_kb, corpus):
    kb = make_kb()
    report = kb.ingest([corpus])
    assert sorted(Path(p).name for p in report.added) == ["alpha.md", "beta.txt", "gamma.md"]
    assert report.skipped and all(p.endswith("archive.zip") for p in report.skipped)
    assert not any(".git" in p for p in report.added + report.skipped)
    assert report.chunks >= 3 and not report.failed
    hits = kb.search("significance level in statistics", k=3)
    assert hits[0].path.endswith("alpha.md")
    assert hits[0].title == "Alpha notes" and hits[0].heading == "Alpha > Usage"
    assert hits[0].metadata["tags"] == ["greek", "letters"]
    assert "title:" not in " ".join(h.text for h in hits)  # front matter is not body text
    assert _consistent(kb.home) == (3, report.chunks)


def test_reingest_adds_nothing(make_kb, corpus, fake_embedder):
    kb = make_kb()
    first = kb.ingest([corpus])
    embedded = fake_embedder.texts_embedded
    second = kb.ingest([corpus])
    assert len(second.unchanged) == 3 and not second.added and not second.updated and second.chunks == 0
    assert fake_embedder.texts_embedded == embedded
    assert _consistent(kb.home) == (3, first.chunks)


def test_changed_file_replaces_its_chunks(make_kb, corpus):
    kb = make_kb()
    kb.ingest([corpus])
    (corpus / "beta.txt").write_text("Beta is now about the second-brightest star of a constellation.\n")
    report = kb.ingest([corpus])
    assert [Path(p).name for p in report.updated] == ["beta.txt"]
    texts = " ".join(h.text for h in kb.search("beta", k=10, mode="lexical"))
    assert "second-brightest" in texts and "radioactive" not in texts
    _consistent(kb.home)


def test_deleted_file_is_removed_and_forget(make_kb, corpus):
    kb = make_kb()
    kb.ingest([corpus])
    (corpus / "sub" / "gamma.md").unlink()
    report = kb.ingest([corpus])
    assert [Path(p).name for p in report.removed] == ["gamma.md"]
    assert kb.forget(corpus / "beta.txt") == [str(corpus / "beta.txt")]
    assert _consistent(kb.home)[0] == 1
    assert kb.forget(corpus / "nothing-here") == []


def test_ingesting_a_subfolder_does_not_remove_siblings(make_kb, corpus):
    kb = make_kb()
    kb.ingest([corpus])
    report = kb.ingest([corpus / "sub"])
    assert not report.removed and len(report.unchanged) == 1
    assert kb.status()["documents"] == 3


def test_bad_inputs_are_reported_and_do_not_stop_the_ingest(make_kb, corpus, tmp_path, monkeypatch):
    bad = corpus / "bad"
    bad.mkdir()
    (bad / "zero.md").write_bytes(b"")
    (bad / "binary.md").write_bytes(bytes(range(256)) * 40)
    (bad / "gbk.txt").write_bytes("这是GBK编码的中文文本，应当被正确读取并且建立索引。".encode("gbk") * 5)
    (bad / "long-line.txt").write_text("lorem ipsum dolor " * 300_000)  # ~5.4 MB on one line
    (bad / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + os.urandom(2000))
    os.symlink("loop.md", bad / "loop.md")
    (bad / "secret.md").write_text("private")
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith("secret.md"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    kb = make_kb()
    events = []
    report = kb.ingest([corpus, tmp_path / "does-not-exist"], progress=events.append)
    progress = [e for e in events if e["event"] == "progress"]
    # files found broken before parsing (the symlink loop, the missing path) are not counted as parsed: it showed
    # "files 9/8"
    assert all(e["files_done"] <= e["files"] for e in progress) and progress[-1]["files_done"] == progress[-1]["files"]
    reasons = {Path(f.path).name: f.reason for f in report.failed}
    assert "empty" in reasons["zero.md"]
    assert "binary" in reasons["binary.md"]
    assert "PDF" in reasons["corrupt.pdf"]
    assert "symlink loop" in reasons["loop.md"]
    assert "permission denied" in reasons["secret.md"]
    assert "no such file" in reasons["does-not-exist"]
    added = {Path(p).name for p in report.added}
    assert {"gbk.txt", "long-line.txt", "alpha.md"} <= added
    assert report.ok
    assert kb.search("GBK编码", k=1, mode="lexical")[0].path.endswith("gbk.txt")
    _consistent(kb.home)


def test_nothing_ingestable_is_not_ok(make_kb, tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "zero.md").write_bytes(b"")
    report = make_kb().ingest([tmp_path / "e"])
    assert not report.ok and len(report.failed) == 1


def test_empty_folder(make_kb, tmp_path):
    (tmp_path / "empty").mkdir()
    report = make_kb().ingest([tmp_path / "empty"])
    assert report.ok and not report.added and not report.failed


def test_directory_symlink_loop_terminates(make_kb, corpus):
    os.symlink(corpus, corpus / "sub" / "back-to-top")
    report = make_kb().ingest([corpus])
    assert len(report.added) == 3


@pytest.mark.skipif(not (SHARED_DATA / "corpora" / "pdf").is_dir(), reason="shared data not present")
def test_hostile_pdfs_from_the_shared_corpus(make_kb, tmp_path):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    for name in ["password.pdf", "copy-protected.pdf", "invalid-pdf-structure-pdfminer-one-page.pdf", "fake-memo.pdf"]:
        shutil.copy(SHARED_DATA / "corpora" / "pdf" / name, folder / name)
    report = make_kb().ingest([folder])
    reasons = {Path(f.path).name: f.reason for f in report.failed}
    assert "encrypted" in reasons["password.pdf"] and "password" in reasons["password.pdf"]
    added = {Path(p).name for p in report.added}
    assert {"copy-protected.pdf", "invalid-pdf-structure-pdfminer-one-page.pdf", "fake-memo.pdf"} <= added


def test_search_before_ingest_says_to_ingest(make_kb):
    with pytest.raises(NotIngested) as e:
        make_kb().search("anything")
    assert "kb ingest" in e.value.hint


def test_other_embedding_model_is_refused(make_kb, corpus):
    make_kb().ingest([corpus])

    class Other(FakeEmbedder):
        model_id = "another-model"

    with pytest.raises(ModelMismatch, match="fake-embedder"):
        make_kb(embedder=Other()).ingest([corpus])
    with pytest.raises(ModelMismatch):
        make_kb(embedder=Other()).search("alpha", mode="dense")


def test_second_writer_is_refused_while_locked(make_kb, corpus, home):
    with write_lock(home):
        with pytest.raises(Locked, match="pid"):
            make_kb().ingest([corpus])
    assert make_kb().ingest([corpus]).added


def test_waiting_writer_gets_the_lock_when_freed(make_kb, corpus, home):
    import threading

    lock_held = threading.Event()

    def hold():
        with write_lock(home):
            lock_held.set()
            time.sleep(1.0)

    t = threading.Thread(target=hold)
    t.start()
    lock_held.wait()
    waited = []
    report = make_kb().ingest([corpus], wait=30, on_wait=waited.append)
    t.join()
    assert waited and len(report.added) == 3


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import FakeEmbedder
    from kb.api import KnowledgeBase
    KnowledgeBase({home!r}, embedder=FakeEmbedder()).ingest([{docs!r}])
    """
)


@pytest.mark.parametrize("crash_after", [1, 17, 120])
def test_sigkill_halfway_leaves_a_usable_index_that_the_next_ingest_completes(make_kb, tmp_path, home, crash_after):
    docs = tmp_path / "many"
    docs.mkdir()
    for i in range(150):
        (docs / f"doc{i:03}.md").write_text(f"# Note {i}\n\nThis is note number {i} about topic{i}.\n\n" + "filler words " * 300)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), home=str(home), docs=str(docs))
    # the pipeline's test hook kills the process with SIGKILL right after that many documents are committed
    env = {**os.environ, "KB_TEST_CRASH_AFTER": str(crash_after)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    partial_docs, _ = _consistent(home)
    assert partial_docs == crash_after
    kb = make_kb()
    assert kb.search("note", k=1, mode="dense") and kb.search("topic0", k=1, mode="lexical")
    report = kb.ingest([docs])
    assert len(report.unchanged) == crash_after and len(report.added) == 150 - crash_after
    assert _consistent(home)[0] == 150


def test_stale_vector_cache_is_repaired_on_open(make_kb, corpus, home):
    kb = make_kb()
    kb.ingest([corpus])
    cache = (home / "vectors.faiss").read_bytes()
    (corpus / "beta.txt").write_text("Beta, rewritten entirely: nothing about decay any more.\n")
    kb.ingest([corpus])
    kb.close()
    (home / "vectors.faiss").write_bytes(cache)  # as if the process died before saving the cache
    _consistent(home)
    (home / "vectors.faiss").write_bytes(b"garbage")
    _consistent(home)


def test_status(make_kb, corpus):
    kb = make_kb()
    assert kb.status()["ingested"] is False
    kb.ingest([corpus])
    s = kb.status()
    assert s["documents"] == 3 and s["chunks"] >= 3 and s["embedding_model"] == "fake-embedder"
    assert s["size_bytes"] > 0 and s["last_ingest"]


def test_filters(make_kb, corpus):
    from kb.retriever import Filters

    kb = make_kb()
    kb.ingest([corpus])
    for mode in ("dense", "lexical", "hybrid"):
        by_tag = kb.search("letter", k=5, mode=mode, filters=Filters(tags=["physics"]))
        assert {Path(h.path).name for h in by_tag} <= {"gamma.md"}
        by_type = kb.search("beta", k=5, mode=mode, filters=Filters(file_types=["txt"]))
        assert by_type and all(h.path.endswith(".txt") for h in by_type)
        by_date = kb.search("rays", k=5, mode=mode, filters=Filters(date_from="2023-01-01"))
        assert all(not h.path.endswith("gamma.md") for h in by_date)
        by_path = kb.search("gamma", k=5, mode=mode, filters=Filters(path="*/sub/*"))
        assert by_path and all("/sub/" in h.path for h in by_path)


def test_migration_reindexes_cjk_full_text_with_unigrams(make_kb, tmp_path, home):
    docs = tmp_path / "zh"
    docs.mkdir()
    (docs / "tomato.md").write_text("# 阳台种番茄\n\n番茄是喜光植物。\n", encoding="utf-8")
    kb = make_kb()
    kb.ingest([docs])
    kb.close()
    # as an index written before m003: bigrams only
    as_before_migration(home, "m003_cjk_unigrams_in_full_text", "UPDATE chunks_fts SET terms = '番茄 茄是 是喜'")
    store = Store(home)
    terms = store.db.execute("SELECT terms FROM chunks_fts").fetchone()[0].split()
    assert "喜" in terms and "喜光" in terms and "阳台" in terms
    store.close()
    assert make_kb().search("光", k=1, mode="lexical")[0].path.endswith("tomato.md")


def test_migration_reindexes_dotted_numbers_as_one_term(make_kb, tmp_path, home, capsys):
    """A home from before m005 (full-text table splitting on '.') is rebuilt so that "1.0.0" is one term."""
    kb = make_kb()
    kb.ingest([write_dotted_notes(tmp_path / "notes")])
    kb.close()
    as_before_migration(
        home, "m005_dotted_numbers_in_full_text", "DROP TABLE chunks_fts",
        "CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize='porter unicode61 remove_diacritics 2')",
        "INSERT INTO chunks_fts (rowid, terms) SELECT id, replace(text, '.', ' ') FROM chunks")
    capsys.readouterr()
    store = Store(home)
    assert "upgrading the index" in capsys.readouterr().err  # a long migration is never a silent hang
    count = "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?"
    assert store.db.execute(count, ['"1.0.0"']).fetchone()[0] == 1
    assert store.db.execute(count, ['"1"']).fetchone()[0] == 1  # before: 1.0.0 was also the terms 1, 0, 0
    store.close()
    assert [h.path.rsplit("/", 1)[1] for h in make_kb().search("1.0.0", k=5, mode="lexical")] == ["alpha.md"]


def test_a_large_vector_cache_becomes_an_inverted_file_index(make_kb, tmp_path, home, monkeypatch):
    """From IVF_FROM vectors on (here lowered to 100), the end of an ingest trains an IVF index; searches,
    filters, deletions, re-opening and growth keep working on it, and it agrees with the exact scan."""
    import kb.store.sqlite as sqlite_store
    from kb.retriever import Filters

    monkeypatch.setattr(sqlite_store, "IVF_FROM", 100)
    docs = tmp_path / "many"
    words = [a + b for a in ("ka", "ro", "mi", "te", "su", "na", "lo", "vi") for b in ("tor", "gal", "ben", "fis", "dre")]

    def note(i: int) -> str:
        return f"Note {i} is about the {words[i % 40]} {words[i * 7 % 39]} {words[i * 13 % 37]}."

    for i in range(240):
        folder = docs / ("rare" if i % 40 == 0 else "common")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"n{i:03}.md").write_text(f"# Note {i}\n\n{note(i)}\n")
    kb = make_kb()
    kb.ingest([docs])
    store = kb._open_store()
    vi = store.vectors()
    assert vi._ivf() is not None and vi.size == store.counts()[1]
    assert sorted(vi.ids().tolist()) == sorted(r[0] for r in store.db.execute("SELECT id FROM chunks"))
    query = note(123)
    assert kb.search(query, k=1, mode="dense")[0].path.endswith("n123.md")
    hits = kb.search(query, k=5, mode="dense", filters=Filters(path="*/rare/*"))
    assert len(hits) == 5 and all("/rare/" in h.path for h in hits)  # 6 rare notes: exact among them
    (docs / "common" / "n123.md").unlink()
    kb.ingest([docs])
    assert not any(h.path.endswith("n123.md") for h in kb.search(query, k=10, mode="dense"))
    kb.close()
    reopened = make_kb()
    vi = reopened._open_store().vectors()  # from the file on disk
    assert vi._ivf() is not None and vi.size == 239
    for i in (7, 77, 201):
        vector = reopened.embedder.embed_query(note(i))
        exact = max(vector @ np.vstack(list(reopened._open_store().chunk_vectors(vi.ids().tolist()).values())).T)
        assert reopened.search(note(i), k=1, mode="dense")[0].score == pytest.approx(exact, abs=2e-3)
    for i in range(240, 1000):  # four times the vectors it was trained on: trained again, on more lists
        (docs / "common" / f"n{i:03}.md").write_text(f"# Note {i}\n\n{note(i)}\n")
    lists = vi._ivf().nlist
    reopened.ingest([docs])
    assert reopened._open_store().vectors()._ivf().nlist > lists


def test_a_large_index_estimates_common_terms_from_a_stored_sample(make_kb, tmp_path, monkeypatch):
    """From TERM_SAMPLE_FROM chunks (here lowered), the end of an ingest stores the share of a random sample of
    chunks holding each common term; a fresh process estimates those terms' frequencies from it instead of
    counting their rows, and counts the others."""
    import json

    import kb.store.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "TERM_SAMPLE_FROM", 20)
    monkeypatch.setattr(sqlite_store, "TERM_SAMPLE_ROWS", 60)
    monkeypatch.setattr(sqlite_store, "TERM_SAMPLE_MIN_SHARE", 0.1)
    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(120):
        extra = " with a walrus" if i == 7 else ""
        (docs / f"n{i:03}.md").write_text(f"# Note {i}\n\nEvery note mentions the lighthouse{extra}.\n")
    kb = make_kb()
    kb.ingest([docs])
    store = kb._open_store()
    sample = json.loads(store.get_meta("term_sample"))
    assert sample["total"] == 120 and sample["rows"] == 60 and sample["shares"]["lighthouse"] == 1.0
    assert store.doc_freqs(["lighthouse", "walrus"]) == (120, {"lighthouse": 120, "walrus": 1})
    # the estimate is what answers for a sampled term: with a stored share of one half, half the chunks
    store.set_meta(term_sample=json.dumps({**sample, "shares": {"lighthouse": 0.5}}))
    store._stats = None  # forget the cached statistics, as a new generation would
    assert store.doc_freqs(["lighthouse"])[1]["lighthouse"] == 60
    kb.ingest([docs])  # nothing changed: the sample stays
    assert json.loads(store.get_meta("term_sample"))["shares"] == {"lighthouse": 0.5}
    for i in range(120, 140):  # a sixth more chunks: sampled again
        (docs / f"n{i:03}.md").write_text(f"# Note {i}\n\nEvery note mentions the lighthouse.\n")
    kb.ingest([docs])
    assert json.loads(store.get_meta("term_sample"))["total"] == 140
    assert kb.search("walrus lighthouse", k=1, mode="lexical")[0].path.endswith("n007.md")


def test_a_group_is_embedded_longest_first_and_each_vector_reaches_its_own_chunk(make_kb, tmp_path, monkeypatch):
    """The pipeline sorts a group of chunks by length before the embedder's calls (less padding) and shows
    progress between calls; every stored vector must still be its own chunk's."""
    import ingest.pipeline
    from ingest.chunk import _context_prefix

    monkeypatch.setattr(ingest.pipeline, "EMBED_CALL", 3)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        words = " ".join(f"topic{i}word{j}" for j in range(5 + 7 * (i % 4)))
        (docs / f"note{i}.md").write_text(f"# Note {i}\n\n{words}.\n", encoding="utf-8")
    embedder = FakeEmbedder()
    seen = []
    embed_batch = embedder.embed_batch
    embedder.embed_batch = lambda texts: (seen.append([len(t) for t in texts]), embed_batch(texts))[1]
    kb = make_kb(embedder=embedder)
    events = []
    kb.ingest([docs], progress=events.append)
    assert len(seen) >= 4 and all(len(call) <= 3 for call in seen)
    flat = [n for call in seen for n in call]
    assert flat == sorted(flat, reverse=True)  # one group, longest first across the calls
    assert sum(1 for e in events if e.get("event") == "progress") >= len(seen)
    store = kb._open_store()
    rows = store.hits([(i, 0.0) for i in range(1, 13)])
    vectors = store.chunk_vectors([h.chunk_id for h in rows])
    assert len(rows) == 12
    for hit in rows:
        embedded = _context_prefix(hit.title, hit.heading) + hit.text  # what the pipeline embedded for it
        assert np.allclose(vectors[hit.chunk_id], embed_batch([embedded])[0]), hit.path
