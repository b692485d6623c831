"""Multi-turn conversations: follow-ups rewritten into standalone questions, old turns summarized, all kept in SQLite."""

from __future__ import annotations

from kb import history as log
from kb.answer import Answer, AnswerStream
from kb.generator import complete
from kb.prompting import persona_text, render_template

# Share of the context window the verbatim history may take before older turns are summarized.
HISTORY_SHARE = 0.25
KEEP_TURNS = 1  # question-and-answer pairs kept verbatim after a summary
CONDENSE_TOKENS = 64
SUMMARY_TOKENS = 160


def transcript(messages) -> str:
    return "\n".join(f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in messages)


class Chat:
    """A conversation with the knowledge base. Use `stream(text)` or `ask(text)`, then `sources`."""

    def __init__(self, kb, *, persona: str | None = None, resume: bool = False):
        self.kb = kb
        store = kb._open_store()
        conversation = log.last_conversation(store) if resume else None
        if conversation is None:
            name = persona if persona is not None else kb.settings.persona
            persona_text(name, kb.config_home)  # fail now on an unknown persona, not at the first question
            conversation = log.new_conversation(store, name or "default")
        elif persona is not None:
            self.set_persona(persona, conversation=conversation)
        self.conversation = conversation
        self.last: Answer | None = None

    @property
    def id(self) -> int:
        return self.conversation.id

    @property
    def persona(self) -> str:
        return self.conversation.persona

    @property
    def sources(self):
        """The sources of the last answer."""
        return self.last.sources if self.last else []

    def set_persona(self, name: str, *, conversation=None) -> None:
        persona_text(name, self.kb.config_home)
        log.set_persona(self.kb._open_store(), conversation or self.conversation, name)

    def reset(self) -> None:
        """Start a new conversation with the same persona; the old one stays in the log."""
        self.conversation = log.new_conversation(self.kb._open_store(), self.persona)
        self.last = None

    def _complete(self, content: str, max_tokens: int) -> str:
        return complete(self.kb.generator, content, max_tokens, seed=self.kb.settings.seed)

    def _fit(self, text: str, share: float) -> str:
        generator = self.kb.generator
        return generator.truncate(text, int(generator.n_ctx * share))

    def standalone(self, question: str) -> str:
        """The follow-up `question` rewritten so that it can be understood without the conversation."""
        messages = self.conversation.messages
        if not messages:
            return question
        history = self._fit(transcript(messages[-4:]), 0.4)
        prompt = render_template("condense", self.kb.config_home, history=history, question=question)
        rewritten = self._complete(prompt, CONDENSE_TOKENS)
        rewritten = rewritten.splitlines()[0].strip() if rewritten else ""
        # A small model sometimes answers instead of rewriting, or returns nothing: keep the user's own
        # words then, with the previous question for context, which retrieval handles well.
        if not rewritten or len(rewritten) > 4 * len(question) + 200:
            previous = next((m.content for m in reversed(messages) if m.role == "user"), "")
            return f"{previous} {question}".strip()
        return rewritten

    def _summarize_if_needed(self) -> None:
        generator = self.kb.generator
        messages = self.conversation.messages
        text = transcript(messages)
        if len(messages) <= 2 * KEEP_TURNS or generator.count_tokens(text) <= generator.n_ctx * HISTORY_SHARE:
            return
        older = messages[: len(messages) - 2 * KEEP_TURNS]
        history = (f"Earlier summary: {self.conversation.summary}\n" if self.conversation.summary else "")
        history = self._fit(history + transcript(older), 0.5)
        prompt = render_template("summarize", self.kb.config_home, history=history)
        summary = self._complete(prompt, SUMMARY_TOKENS)
        log.fold_into_summary(self.kb._open_store(), self.conversation, summary or self.conversation.summary,
                              keep_last=2 * KEEP_TURNS)

    def stream(self, question: str, **options) -> AnswerStream:
        """Answer `question` in the context of the conversation; iterate for tokens."""
        if question and question.strip():
            self._summarize_if_needed()
        standalone = self.standalone(question) if question and question.strip() else question
        history = [{"role": m.role, "content": m.content} for m in self.conversation.messages]

        def remember(answer: Answer) -> None:
            log.add_turn(self.kb._open_store(), self.conversation, question, answer)
            self.last = answer

        options.setdefault("persona", self.persona)
        stream = self.kb._answer(question, standalone, history=history, summary=self.conversation.summary,
                                 conversation_id=self.id, on_done=remember, **options)
        return stream

    def ask(self, question: str, **options) -> Answer:
        return self.stream(question, **options).result()


__all__ = ["Chat"]
