"""`kb doctor`: check a knowledge base home and repair what can be repaired.

Checks, in order: the database (opens, passes SQLite's integrity check, every chunk has its full-text row
and its vector), the vector cache (up to date with the database), the write lock (held by a live process?),
and the sources (documents whose file is gone). Repairs: a damaged database is moved aside, with its
vector cache, into `damaged-<time>/` in the home, and the index is rebuilt by ingesting again the paths
recorded at each ingest (`sources.json`, kept beside the database so it survives its damage); a stale
vector cache is rebuilt from the database; missing full-text rows are re-derived; documents whose file is
gone are forgotten.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

from kb.errors import DamagedIndex, Locked
from kb.store import read_sources
from kb.store.sqlite import DB_NAME, INDEX_NAME, LOCK_NAME, SQLiteStore as Store, write_lock


def check_home(home: Path, *, repair: bool = False, wait: float = 0.0, progress=None) -> dict:
    """Findings as {what, status: ok|problem|fixed, detail}; `problems` counts those left unrepaired."""
    findings: list[dict] = []

    def note(what: str, status: str, detail: str) -> None:
        findings.append({"what": what, "status": status, "detail": detail})

    if not (home / DB_NAME).exists():
        note("database", "ok" if not home.exists() else "problem",
             f"no knowledge base at {home} yet" if not home.exists() else f"{home / DB_NAME} is missing")
        if home.exists() and repair and read_sources(home):
            _rebuild(home, note, progress)
        return _summary(home, findings)
    damage = _database_damage(home / DB_NAME)
    if damage:
        if repair:
            try:
                with write_lock(home, timeout=wait):
                    aside = _move_aside(home)
                note("database", "fixed", f"damaged ({damage}); moved aside to {aside}")
                _rebuild(home, note, progress)
            except Locked as e:
                note("database", "problem", f"damaged ({damage}); cannot repair now: {e}")
        else:
            note("database", "problem", f"{home / DB_NAME} is damaged ({damage})")
        return _summary(home, findings)
    note("database", "ok", f"{home / DB_NAME} passes SQLite's integrity check")
    store = Store(home)
    try:
        _check_contents(home, store, repair, wait, note)
    finally:
        store.close()
    return _summary(home, findings)


def _summary(home: Path, findings: list[dict]) -> dict:
    return {"home": str(home), "findings": findings,
            "problems": sum(1 for f in findings if f["status"] == "problem")}


def _database_damage(path: Path) -> str | None:
    """None when the file is a sound SQLite database, else what is wrong with it."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        return str(e)
    messages = [r[0] for r in rows]
    return None if messages == ["ok"] else "; ".join(messages[:3])


def _move_aside(home: Path) -> Path:
    aside = home / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", INDEX_NAME):
        if (home / name).exists():
            shutil.move(str(home / name), str(aside / name))
    return aside


def _rebuild(home: Path, note, progress) -> None:
    from kb.api import KnowledgeBase

    sources = [p for p in read_sources(home) if os.path.exists(p)]
    if not sources:
        note("rebuild", "problem", "no recorded source paths exist any more; run `kb ingest PATH` again")
        return
    with KnowledgeBase(home) as kb:
        report = kb.ingest(sources, progress=progress)
    note("rebuild", "fixed", f"re-ingested {len(sources)} recorded path(s): {len(report.added)} documents, "
                             f"{report.chunks} chunks, {len(report.failed)} failed")


def _check_contents(home: Path, store: Store, repair: bool, wait: float, note) -> None:
    chunks, fts = store.counts()[1], store.fts_rows()
    if chunks != fts:
        if repair:
            with write_lock(home, timeout=wait):
                store.rebuild_full_text()
            note("full-text index", "fixed", f"{chunks} chunks had {fts} full-text rows; re-derived them")
        else:
            note("full-text index", "problem", f"{chunks} chunks but {fts} full-text rows")
    else:
        note("full-text index", "ok", f"{fts} rows, one per chunk")
    missing = store.missing_vectors()
    note("vectors", "problem" if missing else "ok",
         f"{missing} chunks have no vector; re-ingest their files" if missing else "every chunk has its vector")
    info = store.model_info()
    if info is not None:
        cached = store.cached_vectors_generation()
        if cached != store.generation:
            if repair:
                with write_lock(home, timeout=wait):
                    store.save_vectors()
                note("vector cache", "fixed", f"{INDEX_NAME} was out of date; rebuilt from the database")
            else:
                note("vector cache", "problem", f"{INDEX_NAME} is out of date (it is rebuilt on the next search)")
        else:
            note("vector cache", "ok", f"{INDEX_NAME} matches the database")
    holder = (home / LOCK_NAME).read_text().strip() if (home / LOCK_NAME).exists() else ""
    if holder.isdigit() and _alive(int(holder)):
        note("write lock", "ok", f"held by running process {holder} (an ingest in progress?)")
    else:
        note("write lock", "ok", "free")
    gone = [d for d in store.all_documents() if not os.path.lexists(d)]
    if gone:
        if repair:
            with write_lock(home, timeout=wait):
                for path in gone:
                    store.delete_document(path)
                store.save_vectors()
            note("sources", "fixed", f"forgot {len(gone)} document(s) whose file is gone, e.g. {gone[0]}")
        else:
            note("sources", "problem", f"{len(gone)} document(s) whose file is gone are still answered from, "
                                       f"e.g. {gone[0]}")
    else:
        note("sources", "ok", "every document's file exists")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["check_home", "DamagedIndex"]
