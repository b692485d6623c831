"""The ask log and chat conversations, kept in the knowledge base's SQLite database."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from kb.store import Store, transaction


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    sources: list[dict] = field(default_factory=list)


@dataclass
class Conversation:
    id: int
    persona: str
    summary: str
    messages: list[Message]  # the turns not yet folded into the summary


def log_ask(store: Store, answer, *, conversation_id: int | None = None) -> int:
    """Record one finished ask; called only once the answer is complete, so nothing half-written is kept."""
    with transaction(store.db):
        return store.db["asks"].insert({
            "at": time.time(),
            "question": answer.question,
            "standalone": answer.standalone_question,
            "answer": answer.text,
            "refused": int(answer.refused),
            "sources": json.dumps([s.to_dict() for s in answer.sources], ensure_ascii=False),
            "model": answer.model,
            "timings": json.dumps(answer.timings),
            "conversation_id": conversation_id,
        }).last_pk


def recent_asks(store: Store, limit: int = 10) -> list[dict]:
    rows = store.db.execute(
        "SELECT id, at, question, answer, refused, sources, model, timings, conversation_id "
        "FROM asks ORDER BY id DESC LIMIT ?", [limit]).fetchall()
    return [
        {"id": r[0], "at": r[1], "question": r[2], "answer": r[3], "refused": bool(r[4]),
         "sources": json.loads(r[5] or "[]"), "model": r[6], "timings": json.loads(r[7] or "{}"),
         "conversation_id": r[8]}
        for r in rows
    ]


def new_conversation(store: Store, persona: str) -> Conversation:
    now = time.time()
    with transaction(store.db):
        cid = store.db["conversations"].insert(
            {"started_at": now, "updated_at": now, "persona": persona, "summary": "", "title": ""}).last_pk
    return Conversation(id=cid, persona=persona, summary="", messages=[])


def last_conversation(store: Store) -> Conversation | None:
    row = store.db.execute("SELECT id FROM conversations ORDER BY updated_at DESC, id DESC LIMIT 1").fetchone()
    return load_conversation(store, row[0]) if row else None


def load_conversation(store: Store, conversation_id: int) -> Conversation | None:
    row = store.db.execute(
        "SELECT id, persona, summary FROM conversations WHERE id = ?", [conversation_id]).fetchone()
    if row is None:
        return None
    messages = [
        Message(role=r[0], content=r[1], sources=json.loads(r[2] or "[]"))
        for r in store.db.execute(
            "SELECT role, content, sources FROM messages WHERE conversation_id = ? AND summarized = 0 ORDER BY id",
            [conversation_id]).fetchall()
    ]
    return Conversation(id=row[0], persona=row[1] or "", summary=row[2] or "", messages=messages)


def add_turn(store: Store, conversation: Conversation, question: str, answer) -> None:
    """Append a finished question and answer to the conversation, in one transaction."""
    now = time.time()
    sources = [s.to_dict() for s in answer.sources]
    with transaction(store.db):
        store.db["messages"].insert_all([
            {"conversation_id": conversation.id, "role": "user", "content": question, "sources": "[]",
             "at": now, "summarized": 0},
            {"conversation_id": conversation.id, "role": "assistant", "content": answer.text,
             "sources": json.dumps(sources, ensure_ascii=False), "at": now, "summarized": 0},
        ])
        store.db.execute(
            "UPDATE conversations SET updated_at = ?, title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?",
            [now, question[:80], conversation.id])
    conversation.messages += [Message("user", question), Message("assistant", answer.text, sources)]


def fold_into_summary(store: Store, conversation: Conversation, summary: str, keep_last: int) -> None:
    """Mark all but the last `keep_last` messages as summarized, and store the new summary."""
    ids = [r[0] for r in store.db.execute(
        "SELECT id FROM messages WHERE conversation_id = ? AND summarized = 0 ORDER BY id", [conversation.id])]
    folded = ids[: max(len(ids) - keep_last, 0)]
    with transaction(store.db):
        if folded:
            store.db.execute(
                f"UPDATE messages SET summarized = 1 WHERE id IN ({','.join('?' * len(folded))})", folded)
        store.db.execute("UPDATE conversations SET summary = ?, updated_at = ? WHERE id = ?",
                         [summary, time.time(), conversation.id])
    conversation.summary = summary
    conversation.messages = conversation.messages[len(conversation.messages) - keep_last:] if keep_last else []


def set_persona(store: Store, conversation: Conversation, persona: str) -> None:
    with transaction(store.db):
        store.db.execute("UPDATE conversations SET persona = ? WHERE id = ?", [persona, conversation.id])
    conversation.persona = persona


__all__ = ["Message", "Conversation", "log_ask", "recent_asks", "new_conversation", "last_conversation",
           "load_conversation", "add_turn", "fold_into_summary", "set_persona"]
