"""The ask log and chat conversations, kept in the knowledge base's store (whichever backend it is)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kb.store import Store


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
    return store.log_ask({
        "question": answer.question, "standalone": answer.standalone_question, "answer": answer.text,
        "refused": answer.refused, "sources": [s.to_dict() for s in answer.sources], "model": answer.model,
        "timings": answer.timings, "conversation_id": conversation_id,
    })


def recent_asks(store: Store, limit: int = 10) -> list[dict]:
    return store.recent_asks(limit)


def new_conversation(store: Store, persona: str) -> Conversation:
    return Conversation(id=store.new_conversation(persona), persona=persona, summary="", messages=[])


def last_conversation(store: Store) -> Conversation | None:
    found = store.last_conversation_id()
    return load_conversation(store, found) if found is not None else None


def load_conversation(store: Store, conversation_id: int) -> Conversation | None:
    data = store.conversation(conversation_id)
    if data is None:
        return None
    return Conversation(id=data["id"], persona=data["persona"], summary=data["summary"],
                        messages=[Message(m["role"], m["content"], m["sources"]) for m in data["messages"]])


def add_turn(store: Store, conversation: Conversation, question: str, answer) -> None:
    """Append a finished question and answer to the conversation, in one transaction."""
    sources = [s.to_dict() for s in answer.sources]
    store.add_turn(conversation.id, question, answer.text, sources)
    conversation.messages += [Message("user", question), Message("assistant", answer.text, sources)]


def fold_into_summary(store: Store, conversation: Conversation, summary: str, keep_last: int) -> None:
    """Mark all but the last `keep_last` messages as summarized, and store the new summary."""
    store.fold_into_summary(conversation.id, summary, keep_last)
    conversation.summary = summary
    conversation.messages = conversation.messages[len(conversation.messages) - keep_last:] if keep_last else []


def set_persona(store: Store, conversation: Conversation, persona: str) -> None:
    store.set_persona(conversation.id, persona)
    conversation.persona = persona


def list_conversations(store: Store, limit: int = 50) -> list[dict]:
    return store.list_conversations(limit)


def conversation_messages(store: Store, conversation_id: int) -> dict | None:
    """A conversation with every message (summarized ones too), oldest first; None if there is none."""
    return store.conversation(conversation_id, summarized=True)


__all__ = ["Message", "Conversation", "log_ask", "recent_asks", "new_conversation", "last_conversation",
           "load_conversation", "add_turn", "fold_into_summary", "set_persona", "list_conversations",
           "conversation_messages"]
