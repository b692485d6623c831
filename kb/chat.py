"""Multi-turn conversations: follow-ups rewritten into standalone questions, old turns summarized.

`Chat` keeps its conversation in SQLite (kb chat, the web page); `answer_conversation` answers the last
message of a conversation a client sends whole each time (the OpenAI-compatible API). Both use the same
steps: rewrite the follow-up (`standalone_question`), fold turns beyond the history budget into a summary
(`fit_history`), then kb's ask path with the history and summary in the prompt.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from kb import history as log
from kb.answer import Answer, AnswerStream
from kb.errors import BadQuestion, KBError
from kb.generator import complete
from kb.prompting import persona_text, render_template
from kb.text import unspaced_ratio

# Share of the context window the verbatim history may take before older turns are summarized.
HISTORY_SHARE = 0.25
KEEP_TURNS = 1  # question-and-answer pairs kept verbatim after a summary
CONDENSE_TOKENS = 64
SUMMARY_TOKENS = 160


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    content: str


def transcript(messages) -> str:
    return "\n".join(f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in messages)


def _fit(kb, text: str, share: float) -> str:
    return kb.generator.truncate(text, int(kb.generator.n_ctx * share))


def _generates(kb, text: str, extractive: bool | None) -> bool:
    """Whether kb would use its chat model for `text`: extractive mode is off and the model writes its language.
    Otherwise the model is neither loaded nor asked to rewrite or summarize (an English-only model "rewrote"
    the Chinese follow-up 日期格式呢？ into "4. 10. 日期格式：")."""
    return kb._extractive_notice(text, extractive) is None


def _without_model(kb, question: str, plain: str, lock=None) -> str:
    """With no model to rewrite it: the follow-up alone when the documents answer it at least as well on its
    own ("日期格式呢？" after a question on thread pools asks about something new), else with the previous
    question ("那应该用什么方式创建？" needs it). Two searches, no model; `lock` guards the store where it is shared."""
    if plain == question:
        return question
    try:
        with lock or contextlib.nullcontext():
            alone = kb.assess(question, kb.search_result(question))[0].answerability
            combined = kb.assess(plain, kb.search_result(plain))[0]
    except KBError:  # no documents yet, a question with no words: the ask path reports it
        return plain
    if alone < kb.settings.min_score:
        return plain
    # together they can score higher only because the previous question is answered again: after "When does
    # the on-call rotation change?", "Who gets the page if the primary does not answer?" with it found "The
    # on-call rotation changes every Monday at 10:00." first, which holds no word of the follow-up's own
    return question if alone >= combined.answerability or not _holds_own_terms(combined, question, plain) else plain


def _holds_own_terms(assessment, question: str, plain: str) -> bool:
    """Whether the best evidence for the follow-up with its previous question holds a term of the follow-up
    that the previous question does not."""
    from kb.evidence import holds_term, question_terms

    before = set(question_terms(plain[: len(plain) - len(question)]))
    own = [t for t in question_terms(question) if t not in before]
    if not own or not assessment.scored:
        return True
    return any(holds_term(assessment.scored[0].text, t) for t in own)


_ANSWER_LIKE = re.compile(r"^\s*(?:\d{1,2}[.)、]|[-*•])\s|\[\d+\]")


def standalone_question(kb, messages, question: str, *, extractive: bool | None = None, lock=None) -> str:
    """The follow-up `question` rewritten so that it can be understood without the conversation `messages`."""
    if not messages:
        return question
    previous = next((m.content for m in reversed(messages) if m.role == "user"), "")
    plain = f"{previous} {question}".strip()  # the user's own words, with the previous question for context
    if not _generates(kb, plain, extractive):
        return _without_model(kb, question, plain, lock)
    history = _fit(kb, transcript(messages[-4:]), 0.4)
    prompt = render_template("condense", kb.config_home, history=history, question=question)
    rewritten = complete(kb.generator, prompt, CONDENSE_TOKENS, seed=kb.settings.seed)
    rewritten = rewritten.splitlines()[0].strip() if rewritten else ""
    # A small model sometimes answers instead of rewriting (a list item, a citation), switches language, drops
    # what the follow-up asks about (SmolLM2-135M rewrote "And how much storage does it have?" into "The answer
    # to this question is:" and "How many seats?" into the previous question), or returns nothing: then the
    # user's own words, chosen as without a model.
    if not rewritten or len(rewritten) > 4 * len(question) + 200 or _ANSWER_LIKE.search(rewritten) \
            or (unspaced_ratio(rewritten) >= 0.5) != (unspaced_ratio(question) >= 0.5) \
            or not _keeps_terms(question, rewritten):
        return _without_model(kb, question, plain, lock)
    return rewritten


def _keeps_terms(question: str, rewritten: str) -> bool:
    """Whether the rewrite still holds every content word of the follow-up (stemmed; CJK bigrams)."""
    from kb.evidence import question_terms, stem

    kept = {stem(t) for t in question_terms(rewritten)}
    return all(stem(t) in kept for t in question_terms(question))


def fit_history(kb, messages, summary: str, *, extractive: bool | None = None) -> tuple[int, str]:
    """(how many of the oldest `messages` to fold, the new summary) so that the verbatim history stays
    within its share of the context window; (0, summary) when it already does."""
    if len(messages) <= 2 * KEEP_TURNS or not _generates(kb, transcript(messages[-2:]), extractive):
        return 0, summary  # nothing to fold, or no model to fold with (the answers are the evidence then)
    generator = kb.generator
    if generator.count_tokens(transcript(messages)) <= generator.n_ctx * HISTORY_SHARE:
        return 0, summary
    older = messages[: len(messages) - 2 * KEEP_TURNS]
    history = _fit(kb, (f"Earlier summary: {summary}\n" if summary else "") + transcript(older), 0.5)
    prompt = render_template("summarize", kb.config_home, history=history)
    return len(older), complete(generator, prompt, SUMMARY_TOKENS, seed=kb.settings.seed) or summary


def prepare_conversation(kb, messages: list[dict], *, extractive: bool | None = None, lock=None) -> dict:
    """The arguments of kb's ask path for the last user message of `messages` ([{role, content}], as
    OpenAI clients send them): the question, its standalone rewrite, the turns kept verbatim, the summary of
    older ones, and the client's system messages. Uses the chat model, not the store."""
    turns = [Turn(m["role"], m["content"]) for m in messages if m.get("role") in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
        raise BadQuestion("the conversation must end with a user message that asks something")
    question, earlier = turns[-1].content, turns[:-1]
    folded, summary = fit_history(kb, earlier, "", extractive=extractive)
    kept = earlier[folded:]
    return {"question": question, "standalone": standalone_question(kb, kept, question, extractive=extractive, lock=lock),
            "history": [{"role": t.role, "content": t.content} for t in kept], "summary": summary,
            "extra_system": "\n".join(m["content"] for m in messages if m.get("role") == "system" and m.get("content"))}


def answer_conversation(kb, messages: list[dict], **options) -> AnswerStream:
    """Answer the last user message of `messages`, the earlier turns being the conversation; the client's
    system messages are added to kb's own system prompt. Nothing is stored but the ask log."""
    return kb._answer(**prepare_conversation(kb, messages, extractive=options.get("extractive")), **options)


class Chat:
    """A conversation with the knowledge base. Use `stream(text)` or `ask(text)`, then `sources`."""

    def __init__(self, kb, *, persona: str | None = None, resume: bool | int = False, store_lock=None):
        """`store_lock` guards this conversation's use of the store (a server shares one connection among
        threads); it is never held while the model works, so it cannot wait behind a generation."""
        self.kb = kb
        self._lock = store_lock or contextlib.nullcontext()
        with self._lock:
            self._start(persona, resume)
        self.last: Answer | None = None

    def _start(self, persona, resume) -> None:
        kb = self.kb
        store = kb._open_store()
        if isinstance(resume, int) and not isinstance(resume, bool):
            conversation = log.load_conversation(store, resume)
            if conversation is None:
                raise BadQuestion(f"no conversation {resume}", hint="GET /api/conversations lists them")
        else:
            conversation = log.last_conversation(store) if resume else None
        if conversation is None:
            name = persona if persona is not None else kb.settings.persona
            persona_text(name, kb.config_home)  # fail now on an unknown persona, not at the first question
            conversation = log.new_conversation(store, name or "default")
        elif persona is not None:
            self.set_persona(persona, conversation=conversation)
        self.conversation = conversation

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
        with self._lock:
            self.conversation = log.new_conversation(self.kb._open_store(), self.persona)
        self.last = None

    def stream(self, question: str, **options) -> AnswerStream:
        """Answer `question` in the context of the conversation; iterate for tokens."""
        if question and question.strip():
            folded, summary = fit_history(self.kb, self.conversation.messages, self.conversation.summary,
                                          extractive=options.get("extractive"))
            if folded:
                with self._lock:
                    log.fold_into_summary(self.kb._open_store(), self.conversation, summary,
                                          keep_last=len(self.conversation.messages) - folded)
        standalone = standalone_question(self.kb, self.conversation.messages, question, extractive=options.get("extractive"),
                                         lock=self._lock) if question and question.strip() else question
        history = [{"role": m.role, "content": m.content} for m in self.conversation.messages]

        def remember(answer: Answer) -> None:
            with self._lock:
                log.add_turn(self.kb._open_store(), self.conversation, question, answer)
            self.last = answer

        options.setdefault("persona", self.persona)
        log_asks = options.pop("log", True)

        def done(answer: Answer) -> None:
            remember(answer)
            if log_asks:
                with self._lock:
                    log.log_ask(self.kb._open_store(), answer, conversation_id=self.id)

        with self._lock:
            return self.kb._answer(question, standalone, history=history, summary=self.conversation.summary,
                                   conversation_id=self.id, on_done=done, log=False, **options)

    def ask(self, question: str, **options) -> Answer:
        return self.stream(question, **options).result()


__all__ = ["Chat", "answer_conversation", "prepare_conversation", "standalone_question", "fit_history"]
