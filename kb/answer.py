"""Grounded answers: evidence and refusal, context packing, citation clean-up, extractive answers, streaming.

The steps of one ask, each a function here or in kb.evidence so that `KnowledgeBase.ask` and `Chat`
share them: retrieve -> `kb.evidence.assess` (the sentences that best answer, and whether the passages
answer at all: refuse without calling the model when they do not) -> either an extractive answer (the best
evidence, quoted and cited, no model) or `pack_passages` (fit the evidence and the passages to the
model's context window with its own tokenizer) -> generate through a `CitationFilter` (drop citation
numbers that were never given) -> `Answer`.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

from kb.evidence import (STOP_WORDS, Evidence, answer_type, holds_term, join_adjacent, number_places,
                         numbers_in, opens_mid_sentence, question_terms, split_sentences, term_units, tokenize,
                         type_candidates)
from kb.generator import Generator
from kb.text import flatten, unspaced_ratio
from kb.types import Hit

REFUSAL_EN = "The documents do not contain an answer to this question."
REFUSAL_ZH = "文档中没有这个问题的答案。"


@dataclass
class Source:
    """A passage as shown to the user: number `n` is the one the model saw in its prompt.

    `text` is the passage as stored, so that evidence offsets index it; `relevance` is the share of the
    question's terms (IDF-weighted) that the passage holds.
    """

    n: int
    path: str
    title: str
    heading: str
    page: int | None
    score: float
    text: str
    relevance: float = 0.0
    cited: bool = False
    chunk_id: int = 0

    @classmethod
    def from_hit(cls, n: int, hit: Hit, relevance: float) -> "Source":
        return cls(n=n, path=hit.path, title=hit.title, heading=hit.heading, page=hit.page, score=hit.score,
                   text=hit.text, relevance=round(relevance, 4), chunk_id=hit.chunk_id)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    question: str
    text: str
    sources: list[Source]
    refused: bool
    model: str
    timings: dict = field(default_factory=dict)
    standalone_question: str = ""
    evidence: list[Evidence] = field(default_factory=list)
    answerability: float = 0.0
    extractive: bool = False
    notice: str = ""  # one line for the reader, e.g. why the answer is extractive
    generated: str = ""  # the model's own answer when it was replaced by the evidence (not supported, or a refusal)
    support: float | None = None  # share of the generated answer's own words found in the passages it cites
    refusal_overruled: bool = False  # the model refused, but the evidence was strong enough to answer with it

    def quotes(self) -> list[Evidence]:
        """The evidence as a reader sees it: neighbouring sentences of one source joined into one quote."""
        return join_adjacent(self.evidence, {s.n: s.text for s in self.sources})

    def to_dict(self) -> dict:
        return {
            "answer": self.text,
            "refused": self.refused,
            "extractive": self.extractive,
            "answerability": round(self.answerability, 4),
            "evidence": [e.to_dict() for e in self.evidence],
            "sources": [s.to_dict() for s in self.sources],
            "model": self.model,
            "timings": self.timings,
            "question": self.question,
            "notice": self.notice,
            "generated": self.generated,
            "support": self.support,
            "refusal_overruled": self.refusal_overruled,
        }


def refusal_text(question: str, unmentioned: Sequence[str] = ()) -> str:
    """kb's refusal in the question's language, saying which of the question's names no document mentions."""
    if unspaced_ratio(question) >= 0.5:
        return REFUSAL_ZH + ("".join(f"文档中没有提到“{name}”。" for name in unmentioned))
    if not unmentioned:
        return REFUSAL_EN
    names = ", ".join(f"“{name}”" for name in unmentioned)
    return f"{REFUSAL_EN} None of them mentions {names}."


# --- evidence in the answer -----------------------------------------------------------------------


def evidence_block(evidence: list[Evidence]) -> str:
    """The evidence as the prompt shows it, before the passages: one quoted line each, with its source number."""
    return "\n".join(f"[{e.n}] \"{flatten(e.text)}\"" for e in evidence)


_MARKUP = re.compile(r"^\s*(?:[-*+•]\s+|#{1,6}\s+|>\s*)|\*\*|__|`")
_LINK = re.compile(r"!?\[([^\]\n]*)\]\((?:[^()\s]|\([^()\s]*\))+(?:\s+\"[^\"]*\")?\)")  # [text](url) reads as text


# An extractive answer quotes the second-best sentence too when it scores at least this share of the best:
# the scorer cannot tell them apart, so the reader sees both (docs/answers.md has the measurements).
SECOND_QUOTE = 0.85


def extractive_text(evidence: list[Evidence]) -> str:
    """An answer made of the best evidence sentence itself, cited (and the runner-up when it scores almost as
    well): nothing in it the documents do not say. Two sentences of one passage read in the passage's order."""
    if not evidence:
        return ""
    best = evidence[0].score
    chosen = evidence[:1] + [e for e in evidence[1:2] if best > 0 and e.score >= SECOND_QUOTE * best]
    if len(chosen) == 2 and chosen[0].n == chosen[1].n and chosen[0].chunk_id == chosen[1].chunk_id:
        chosen.sort(key=lambda e: e.start)
    parts = []
    for e in chosen:
        lines = [_MARKUP.sub("", _LINK.sub(r"\1", line)).strip() for line in e.text.splitlines()]
        text = flatten("\n".join(line for line in lines if line), rows=True)
        if opens_mid_sentence(e):
            text = "…" + text
        if unspaced_ratio(text) >= 0.5:
            text = re.sub(r"(?<=[\u3000-\u9fff\uff00-\uffef])\s+(?=[\u3000-\u9fff\uff00-\uffef])", "", text)
        parts.append((text, e.n))
    if len(parts) == 1:
        return f"{parts[0][0]} [{parts[0][1]}]"
    (first, n), (second, m) = parts
    if n != m:  # two sources: each quote with its citation, a space between (Chinese too: "。[1]9." misreads)
        return f"{first} [{n}] {second} [{m}]"
    joiner = "" if unspaced_ratio(first) >= 0.5 else " "
    if chosen[1].start - chosen[0].end > 2:  # text left out between them
        joiner = "…" if not joiner else " … "
    if second.startswith("|") or first.endswith("|"):  # a table's rows keep their lines
        joiner = "\n" if joiner in ("", " ") else "\n…\n"
    return f"{first}{joiner}{second} [{n}]"


# A generated answer passes when at least this share of its own words (those not in the question) occur in
# the passages it cites; docs/answers.md has the measurements behind it.
SUPPORTED = 0.75
UNSUPPORTED_NOTICE = ("The model's answer was not supported by the passages it cited; "
                      "the answer is the evidence itself, quoted from your documents.")
UNTYPED_NOTICE = ("The model's answer did not say what was asked ({kind}); "
                  "the answer is the evidence itself, quoted from your documents.")
REPEATED_NOTICE = ("The model repeated an earlier answer of this conversation; "
                   "the answer is the evidence itself, quoted from your documents.")
OVERRULED_NOTICE = ("The model said the documents do not answer this, but they hold strong evidence for it; "
                    "the answer is the evidence itself, quoted from your documents.")


def support(body: str, question: str, sources: list[Source]) -> float:
    """Share of the answer's own content words (stemmed words, numbers, even one digit, CJK characters; the
    question's words aside) found in the sources it cites, or in all of them when it cites none. 0 for an
    answer that says nothing beyond the question ("the answer is [2]")."""
    asked = set(tokenize(question).keys)
    words = [k for k in tokenize(_CITATION_MARK.sub(" ", _without_headers(body, sources))).keys
             if k not in STOP_WORDS and k not in asked and not (len(k) == 1 and k.isascii() and not k.isdigit())]
    if not words:
        return 0.0
    known: set[str] = set()
    for text in _cited_texts(sources):
        known.update(tokenize(text).keys)
    return sum(1 for k in words if k in known) / len(words)


def _without_headers(body: str, sources: list[Source]) -> str:
    """`body` without the lines that copy a passage's header as the prompt shows it ("[1] title — heading"):
    asked "How do I install Rust?", the bundled model wrote "the answer is:" and "[1] Using
    rustc_codegen_cranelift for debug builds — How do I install Rust?" (source 1's title and the question),
    every word in the source or the question, and nothing said."""
    headers = {_line_key(passage_header(s.title, s.heading, s.page)) for s in sources}
    titles = {s.n: s.title.strip().lower() for s in sources if s.title.strip()}

    def copies(line: str) -> bool:
        # "[1] <its title> — <anything>", as the prompt shows a header; not "[1], New Zealand became ...", which
        # is the reply's own "According to [1]," before an answer that opens with the title's words
        numbered = re.match(r"\s*\[(\d+)\]\s+(.*)", line)
        title = titles.get(int(numbered.group(1))) if numbered else None
        if title and numbered.group(2).lower().startswith(title):
            rest = numbered.group(2)[len(title):].strip()
            if not rest or rest.startswith("—"):
                return True
        return _line_key(line) in headers

    return "\n".join(line for line in body.split("\n") if not copies(line))


def _line_key(line: str) -> str:
    return re.sub(r"\W+", " ", _CITATION_MARK.sub(" ", line)).strip().lower()


def _cited_texts(sources: list[Source]) -> list[str]:
    """Title, heading and text of each source the answer cites, or of every source when it cites none."""
    return [f"{s.title}\n{s.heading}\n{s.text}" for s in [s for s in sources if s.cited] or sources]


def misplaced_numbers(body: str, question: str, sources: list[Source]) -> list[str]:
    """The numbers of an answer that its sources hold only where they speak of something else. Asked "When did
    New Zealand become a dominion?" over "In 1841, New Zealand became a colony ... and in 1907 it became a
    dominion; it gained full statutory independence in 1947 ...", the bundled model answered 1947: every word
    is in the source, but no word of the question is near 1947, while two ("became a dominion") are near 1907.
    A number counts as misplaced when no question word is within NUMBER_REACH characters of it (not across a
    ";") in any source, and at least two are near another number there. Western questions only: for Chinese,
    characters near a number say too little."""
    if unspaced_ratio(question) >= 0.5:
        return []
    asked = {k for k in tokenize(question).keys if k not in STOP_WORDS and not k[:1].isdigit()}
    said = numbers_in(_CITATION_MARK.sub(" ", body)) - numbers_in(question)
    if not said or len(asked) < 2:
        return []
    near: dict[str, int] = {}  # number -> most question words near one of its places
    for text in _cited_texts(sources):
        for start, end, number in number_places(text):
            a = max(text.rfind(";", 0, start) + 1, start - NUMBER_REACH)
            b = text.find(";", end)
            b = min(b if b >= 0 else len(text), end + NUMBER_REACH)
            near[number] = max(near.get(number, 0), len(asked & set(tokenize(text[a:b]).keys)))
    return sorted(n for n in said if n in near and near[n] == 0
                  and any(v >= 2 for other, v in near.items() if other != n and other not in said))


NUMBER_REACH = 50  # characters either side of a number that speak of it


def invented_numbers(body: str, question: str, sources: list[Source]) -> list[str]:
    """The numbers of an answer that neither the question nor the sources it cites (all of them, when it cites
    none) hold. A number is the fact a reader acts on, and one word in eight is not much of the support share:
    asked "What about hotfixes?" over "Version 3.3 follows six weeks later.", the bundled model wrote "Version
    3.4 follows six weeks later.", every other word in the passage."""
    said = numbers_in(_CITATION_MARK.sub(" ", body))
    if not said:
        return []
    known = numbers_in(question).union(*(numbers_in(text) for text in _cited_texts(sources)))
    return sorted(said - known)


_KIND_WORDS = {"date": "a date or time", "number": "a number or amount", "person": "a name", "place": "a place"}
_CLAUSES = re.compile(r"[,;:，；：。！？!?]\s*|\.\s+|\s+(?:and|but|while|whereas)\s+", re.I)


def _content_words(text: str) -> set[str]:
    return {k for k in tokenize(_FRAMING.sub("", _CITATION_MARK.sub(" ", text).strip())).keys if k not in STOP_WORDS}


def repeats_earlier(body: str, earlier: Sequence[str], question: str = "") -> bool:
    """Whether a sentence of the answer says nothing that one earlier answer of the conversation did not (its
    content words, 3 or more, are all in that answer) and holds none of the follow-up's terms that no earlier
    answer holds. A small model copies the history it is shown: after "What is the taxi receipt deadline?" the
    bundled model answered the follow-up "And for meals?" with "According to [1], the taxi receipt deadline is
    30 days." again, and "And version 3.3?" after "When is version 3.2 released?" with "version 3.2 is released
    on March 14, 2025". An answer to "其他城市呢？" that takes "其他城市每晚不超过400元" from an earlier quote
    holding both city rules is no repeat: the follow-up asks nothing the earlier answer did not speak of."""
    before = [_content_words(text) for text in earlier]
    before = [words for words in before if words]
    if not before:
        return False
    # what the follow-up asks that no earlier answer spoke of ("meals", "3.3"); nothing new: a repeat may be right
    new = [t for t in question_terms(question) if not any(holds_term(e, t) for e in earlier)]
    if question and not new:
        return False
    text = _CITATION_MARK.sub(" ", body)
    for start, end in split_sentences(text):
        words = _content_words(text[start:end])
        if len(words) >= 3 and any(words <= b for b in before) \
                and not any(holds_term(text[start:end], t) for t in new):
            return True
    return False


def states_asked_type(body: str, question: str) -> bool:
    """Whether the part of an answer that speaks of the question holds what it asks for: for "How often should
    I feed the starter on the counter?", the clause of the answer that holds most of the question's terms
    must hold a number ("once a day"), not merely restate the question ("feed the starter on the counter at
    room temperature") while the answer's only number belongs to another clause ("once a week in the
    fridge"); a short phrase set off beside that clause counts with it ("In 1891, Dewar produced ..."). True
    when the question expects no type, or no clause holds a question term."""
    kind = answer_type(question)
    if kind is None:
        return True
    wanted = {unit for term in question_terms(question) for unit in term_units(term)}
    clauses = [c for c in _CLAUSES.split(_CITATION_MARK.sub(" ", body)) if c.strip()]
    scored = [(len(wanted & set(tokenize(c).keys)), c) for c in clauses]
    best = max((n for n, _ in scored), default=0)
    if best == 0:
        return True
    # the clause itself, or a short phrase set off beside it ("In 1891, Dewar produced liquid oxygen")
    near = {j for i, (n, _) in enumerate(scored) if n == best for j in (i - 1, i, i + 1)
            if 0 <= j < len(scored) and (j == i or len(scored[j][1].split()) <= 4)}
    return any(type_candidates(scored[j][1], kind, question) for j in near)


def asked_type_words(question: str) -> str:
    return _KIND_WORDS.get(answer_type(question) or "", "what was asked")


_CITATION_MARK = re.compile(r"\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]")
# kb's refusal, as a model (a retrieval-aware adapter is trained to) writes it: the answer is a refusal
_REFUSES = re.compile(r"^\W*(the )?documents? do(es)? not contain (an |the )?answer|^\W*文档中没有", re.I)
_FRAMING = re.compile(r"^\s*(?:according to|based on)\b|^\s*根据", re.I)


# --- context packing ------------------------------------------------------------------------------


def passage_header(title: str, heading: str, page: int | None) -> str:
    """Where a passage comes from, as the prompt shows it after its number: "title — heading — page 3"."""
    return " — ".join(x for x in (title, heading, f"page {page}" if page else "") if x)


def format_passage(n: int, hit: Hit, text: str | None = None) -> str:
    """A passage as the prompt shows it: its number, where it comes from, its text."""
    return f"[{n}] {passage_header(hit.title, hit.heading, hit.page)}\n{hit.text if text is None else text}"


@dataclass
class Packed:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    hits: list[Hit]
    texts: list[str]  # each kept passage's text, the last one possibly cut
    messages: list[dict] = field(default_factory=list)  # the chat messages `prompt` renders (before the prefill)


@dataclass
class AnswerPrompt:
    """kb's answer prompt for one question: packed passages, the start of the reply, sources, evidence shown."""

    packed: Packed
    prefill: str
    sources: list[Source]
    evidence: list[Evidence]


MIN_ANSWER_TOKENS = 16
MIN_PASSAGE_TOKENS = 48
MIN_CUT_TOKENS = 8


def pack_passages(generator: Generator, hits: list[Hit], build: Callable[[str, int], list[dict]],
                  max_tokens: int, prefill: str = "") -> Packed:
    """Fit as many passages, best first, as the context window holds next to the prompt and the answer.

    `build(passages_text, kept)` returns the chat messages for a passages block of the first `kept` hits
    (the evidence lines it shows must come from those); `prefill` is the start of
    the assistant's reply, written by kb (see prompts/answer_prefix.txt). The answer keeps at
    most a third of the room the fixed prompt leaves, so a tiny context still gets passages. The whole
    prompt is counted again at the end, since token counts of parts do not add up exactly.
    """
    from kb.errors import BadQuestion

    n_ctx = generator.n_ctx
    fixed = generator.count_tokens(generator.format_chat(build("", len(hits))) + prefill)  # all evidence: an upper bound
    free = n_ctx - fixed
    if free < MIN_ANSWER_TOKENS + 1:
        raise BadQuestion(
            f"the question and prompt take {fixed} tokens, more than the model's context window of {n_ctx} allows",
            hint="shorten the question, or raise --ctx",
        )
    answer_room = max(MIN_ANSWER_TOKENS, min(max_tokens, free // 3 if hits else free))
    room = free - answer_room - 1
    kept: list[Hit] = []
    texts: list[str] = []
    for hit in hits:
        block = format_passage(len(kept) + 1, hit)
        cost = generator.count_tokens(block + "\n\n")
        if cost <= room:
            kept.append(hit)
            texts.append(hit.text)
            room -= cost
            continue
        # A cut passage is worth keeping if it is the only one, or long enough to say something.
        if not kept or room >= MIN_PASSAGE_TOKENS:
            header = generator.count_tokens(format_passage(len(kept) + 1, hit, "") + " …\n\n")
            cut = generator.truncate(hit.text, room - header) if room - header >= MIN_CUT_TOKENS else ""
            if cut.strip():
                kept.append(hit)
                texts.append(cut + " …")
        break
    if hits and not kept:
        raise BadQuestion(
            f"the model's context window ({n_ctx} tokens) leaves no room for any passage next to the prompt",
            hint="raise --ctx, or shorten the question",
        )
    while True:
        passages = "\n\n".join(format_passage(i + 1, h, t) for i, (h, t) in enumerate(zip(kept, texts)))
        messages = build(passages, len(kept))
        prompt = generator.format_chat(messages) + prefill
        prompt_tokens = generator.count_tokens(prompt)
        if prompt_tokens + answer_room <= n_ctx:
            break
        if len(kept) == 1:  # the sum of parts undercounted: cut the only passage a little more
            texts[0] = generator.truncate(texts[0], max(generator.count_tokens(texts[0]) - (prompt_tokens + answer_room - n_ctx) - 2, 0)) + " …"
            if generator.count_tokens(texts[0]) <= 2:
                raise BadQuestion(f"the model's context window ({n_ctx} tokens) is too small for this question",
                                  hint="raise --ctx")
            continue
        kept.pop()
        texts.pop()
    return Packed(prompt=prompt, prompt_tokens=prompt_tokens, max_tokens=min(answer_room, n_ctx - prompt_tokens),
                  hits=kept, texts=texts, messages=messages)


# --- citations ------------------------------------------------------------------------------------

_CITATION = re.compile(r"\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]")
_MAYBE_CITATION = re.compile(r"\[[\d\s,;]*")


class TurnCut:
    """Ends a streamed answer where the model starts a new turn of the prompt's format ("\nQuestion: And version
    3.3?" after its answer, "\nUser: ..."): that text and everything after it is dropped. A line that could
    still become such a label is held back until it is clearly something else."""

    LABELS = ("question", "user", "assistant", "documents", "key sentences", "问题", "用户")
    _LABEL = re.compile(r"\n[ \t]*(?:" + "|".join(LABELS) + r")[ \t]*[:：]", re.I)

    def __init__(self):
        self.done = False
        self._buffer = ""

    def _may_become_label(self, line: str) -> bool:
        t = line.lstrip(" \t").lower()
        return any(w.startswith(t) or (t.startswith(w) and not t[len(w):].strip(" \t")) for w in self.LABELS)

    def feed(self, text: str) -> str:
        if self.done:
            return ""
        self._buffer += text
        m = self._LABEL.search(self._buffer)
        if m:
            self.done = True
            out, self._buffer = self._buffer[:m.start()], ""
            return out
        i = self._buffer.rfind("\n")
        if i >= 0 and self._may_become_label(self._buffer[i + 1:]):
            out, self._buffer = self._buffer[:i], self._buffer[i:]
            return out
        out, self._buffer = self._buffer, ""
        return out

    def flush(self) -> str:
        out, self._buffer = self._buffer, ""
        return "" if self.done else out


class CitationFilter:
    """Removes, from streamed text, citation numbers that are not among the passages given to the model.

    Text that might be the start of a citation (`[1`, `[2, `) is held back until it is complete.
    """

    def __init__(self, valid: set[int]):
        self.valid = valid
        self.cited: set[int] = set()
        self.removed: set[int] = set()
        self._buffer = ""

    def _rewrite(self, citation: str) -> str:
        numbers = [int(x) for x in re.findall(r"\d+", citation)]
        good = [n for n in numbers if n in self.valid]
        self.cited.update(good)
        self.removed.update(n for n in numbers if n not in self.valid)
        return "[" + ", ".join(str(n) for n in good) + "]" if good else ""

    def feed(self, text: str) -> str:
        self._buffer += text
        out = []
        while self._buffer:
            i = self._buffer.find("[")
            if i < 0:
                out.append(self._buffer)
                self._buffer = ""
                break
            out.append(self._buffer[:i])
            self._buffer = self._buffer[i:]
            m = _CITATION.match(self._buffer)
            if m:
                out.append(self._rewrite(m.group()))
                self._buffer = self._buffer[m.end():]
                continue
            if _MAYBE_CITATION.fullmatch(self._buffer) and len(self._buffer) < 32:
                break  # wait for the rest
            out.append(self._buffer[0])
            self._buffer = self._buffer[1:]
        return "".join(out)

    def flush(self) -> str:
        rest, self._buffer = self._buffer, ""
        return rest


def tidy(text: str) -> str:
    """Whitespace left where a citation was removed: 'as shown [9].' -> 'as shown.'"""
    text = re.sub(r"[ \t]+([.,;:!?。，；：！？])", r"\1", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


# --- one ask, streamed ----------------------------------------------------------------------------


class AnswerStream:
    """Iterate to receive the answer's text as it is generated; `.answer` is set once it is complete.

    `sources` and `evidence` are known before the first token: the passages given to the model (or, for a
    refusal, the closest passages found) and the sentences that best answer. An answer without a model
    (a refusal, an extractive answer) arrives as one piece. Stopping early (Ctrl-C, `close()`) leaves
    `.answer` unset and logs nothing.
    """

    def __init__(self, *, question: str, standalone: str, sources: list[Source], refused: bool, model: str,
                 timings: dict, pieces: Iterator[str] | None, on_done: Callable[[Answer], None] | None,
                 text: str = "", prefill: str = "", evidence: list[Evidence] | None = None,
                 answerability: float = 0.0, extractive: bool = False, notice: str = "",
                 fallback: str = "", refusal_fallback: str = "", earlier: Sequence[str] = ()):
        self.question = question
        self.standalone = standalone
        self.sources = sources
        self.refused = refused
        self.model = model
        self.timings = timings
        self.evidence = evidence or []
        self.answerability = answerability
        self.extractive = extractive
        self.notice = notice
        self.answer: Answer | None = None
        self._pieces = pieces
        self._on_done = on_done
        self._text = text
        self._prefill = prefill
        self._fallback = fallback  # the extractive answer that replaces a generated one the passages do not support
        self._refusal_fallback = refusal_fallback  # ... that replaces the model's refusal (strong evidence only)
        self._earlier = earlier  # the conversation's earlier answers, which the answer must not repeat
        self._overruled = False
        self._generated = ""
        self._support: float | None = None
        self._started = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        if self.answer is not None:
            yield self.answer.text
            return
        if self._pieces is None:
            citations = CitationFilter({s.n for s in self.sources})
            text = citations.feed(self._text) + citations.flush()
            if not self.refused:
                for s in self.sources:
                    s.cited = s.n in citations.cited
            yield text
            self._finish(text)
            return
        citations = CitationFilter({s.n for s in self.sources})
        turn = TurnCut()
        parts: list[str] = []
        first = None
        count = 0
        start = time.perf_counter()
        text = citations.feed(self._prefill)
        if text:
            parts.append(text)
            yield text
        for piece in self._pieces:
            count += 1
            if first is None:
                first = time.perf_counter()
                if self._prefill[-1:] in (",", ":") and piece[:1].isalnum():
                    piece = " " + piece  # "According to [1]," + "Alpha" reads "According to [1], Alpha"
            text = citations.feed(turn.feed(piece))
            if text:
                parts.append(text)
                yield text
            if turn.done:
                close = getattr(self._pieces, "close", None)
                if close:
                    close()  # stop generating: the rest is a turn the model made up
                break
        rest = citations.feed(turn.flush()) + citations.flush()
        if rest:
            parts.append(rest)
            yield rest
        end = time.perf_counter()
        self.timings.update(
            first_token_ms=round(((first or end) - self._t0()) * 1000, 1),
            generation_first_token_ms=round(((first or end) - start) * 1000, 1),
            generate_ms=round((end - start) * 1000, 1),
            completion_tokens=count,
            tokens_per_s=round((count - 1) / (end - first), 2) if first and count > 1 and end > first else 0.0,
        )
        for s in self.sources:
            s.cited = s.n in citations.cited
        self.timings["citations_removed"] = sorted(citations.removed)
        text = tidy("".join(parts))
        if _REFUSES.search(_CITATION_MARK.sub("", _FRAMING.sub("", text))[:200]):  # the model says the passages lack it
            if self._refusal_fallback:
                self._overruled = True
                yield from self._replace(text, self._refusal_fallback, OVERRULED_NOTICE)
                text = self._refusal_fallback
            else:
                self.refused, text = True, refusal_text(self.question)
                for s in self.sources:
                    s.cited = False
        elif self._fallback:
            body = _FRAMING.sub("", text)
            self._support = round(support(body, self.standalone, self.sources), 4)
            if self._support < SUPPORTED or invented_numbers(body, self.standalone, self.sources) \
                    or misplaced_numbers(body, self.standalone, self.sources):
                yield from self._replace(text, self._fallback, UNSUPPORTED_NOTICE)
                text = self._fallback
            elif not states_asked_type(body, self.standalone):
                notice = UNTYPED_NOTICE.format(kind=asked_type_words(self.standalone))
                yield from self._replace(text, self._fallback, notice)
                text = self._fallback
            elif repeats_earlier(body, self._earlier, self.question):
                yield from self._replace(text, self._fallback, REPEATED_NOTICE)
                text = self._fallback
        self._finish(text)

    def _replace(self, generated: str, text: str, notice: str) -> Iterator[str]:
        """The evidence answer in place of what the model wrote, saying why; the model's text kept aside."""
        self._generated, self.notice = generated, notice
        cited = {int(n) for n in re.findall(r"\[(\d+)\]", text)}
        for s in self.sources:
            s.cited = s.n in cited
        yield f"\n\n({notice})\n{text}"

    def _t0(self) -> float:
        return self.timings.get("_t0", self._started)

    def _finish(self, text: str) -> None:
        self.timings["total_ms"] = round((time.perf_counter() - self._t0()) * 1000, 1)
        self.timings.pop("_t0", None)
        self.answer = Answer(question=self.question, text=text, sources=self.sources, refused=self.refused,
                             model=self.model, timings=self.timings, standalone_question=self.standalone,
                             evidence=self.evidence, answerability=self.answerability,
                             extractive=self.extractive, notice=self.notice, generated=self._generated,
                             support=self._support, refusal_overruled=self._overruled)
        if self._on_done:
            self._on_done(self.answer)

    def result(self) -> Answer:
        """Run to the end, discarding the pieces, and return the Answer."""
        for _ in self:
            pass
        assert self.answer is not None
        return self.answer


__all__ = ["Answer", "AnswerStream", "Source", "CitationFilter", "pack_passages", "refusal_text", "tidy",
           "evidence_block", "extractive_text", "support", "SUPPORTED", "OVERRULED_NOTICE",
           "states_asked_type", "repeats_earlier", "REPEATED_NOTICE", "TurnCut", "invented_numbers",
           "misplaced_numbers"]
