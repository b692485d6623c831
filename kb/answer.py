"""Grounded answers: relevance check and refusal, context packing, citation clean-up, streaming.

The steps of one ask, each a function here so that `KnowledgeBase.ask` and `Chat` share them:
retrieve -> `relevance` (refuse without calling the model when nothing is relevant enough) ->
`pack_passages` (fit the passages to the model's context window with its own tokenizer) ->
generate through a `CitationFilter` (drop citation numbers that were never given) -> `Answer`.

Relevance. Fused search scores rank passages but say nothing absolute, so the refusal decision uses two
signals that do: the cosine between the question's and the passage's embeddings, and the share of the
question's informative terms (IDF-weighted, stop words removed, CJK as character bigrams) that the passage
contains. The embedder is English-only, so for questions written mostly in unspaced scripts only the term
coverage counts. A passage is relevant when either signal clears its threshold; the thresholds were
calibrated on questions with and without their gold passage in the index (docs/answers.md).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from kb.generator import Generator
from kb.text import is_unspaced, lexical_terms, unspaced_ratio
from kb.types import Hit

# Calibrated in benchmarks/calibrate_refusal.py; see docs/answers.md. Bigram coverage runs lower than
# word coverage (a question's bigrams include some that straddle word boundaries and occur nowhere), so
# unspaced questions have their own coverage threshold.
DENSE_RELEVANT = 0.5
COVERAGE_RELEVANT = 0.5
COVERAGE_RELEVANT_UNSPACED = 0.25

REFUSAL_EN = "The documents do not contain an answer to this question."
REFUSAL_ZH = "文档中没有这个问题的答案。"

# Words that carry no topic: question words and function words. IDF would down-weight them in a big
# corpus, but in a small one a question word absent from every document would look informative.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves tell
explain describe give name list please does did much many kind type called
什么 为什 怎么 怎样 如何 哪个 哪些 哪里 哪儿 多少 是否 是不 不是 为何 何时 几个 谁是 的是 是什 么是 了什
""".split())


@dataclass
class Source:
    """A passage as shown to the user: number `n` is the one the model saw in its prompt."""

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
    def from_hit(cls, n: int, hit: Hit, relevance: float, text: str | None = None) -> "Source":
        return cls(n=n, path=hit.path, title=hit.title, heading=hit.heading, page=hit.page, score=hit.score,
                   text=hit.text if text is None else text, relevance=relevance, chunk_id=hit.chunk_id)

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

    def to_dict(self) -> dict:
        return {
            "answer": self.text,
            "refused": self.refused,
            "sources": [s.to_dict() for s in self.sources],
            "model": self.model,
            "timings": self.timings,
            "question": self.question,
        }


# --- relevance ------------------------------------------------------------------------------------


def question_terms(question: str) -> list[str]:
    seen: dict[str, None] = {}
    for term in lexical_terms(question, unigrams=False):  # the coverage thresholds were calibrated on bigrams
        if term in STOP_WORDS or (len(term) == 1 and not is_unspaced(term)):
            continue
        seen.setdefault(term, None)
    return list(seen)


def relevance(store, question: str, query_vector: np.ndarray | None, hits: list[Hit]) -> list[dict]:
    """Per hit: {"coverage", "dense", "score"}; `score` is in [0, 1] and compared with `min_score`."""
    if not hits:
        return []
    ids = [h.chunk_id for h in hits]
    terms = question_terms(question)
    total, df, present = store.term_stats(terms, ids)
    idf = {t: math.log(1 + (total - df[t] + 0.5) / (df[t] + 0.5)) for t in terms}
    weight = sum(idf.values())
    vectors = store.chunk_vectors(ids) if query_vector is not None else {}
    unspaced = unspaced_ratio(question) >= 0.5
    coverage_threshold = COVERAGE_RELEVANT_UNSPACED if unspaced else COVERAGE_RELEVANT
    out = []
    for hit in hits:
        coverage = sum(idf[t] for t in terms if hit.chunk_id in present[t]) / weight if weight else 0.0
        v = vectors.get(hit.chunk_id)
        dense = float(np.dot(query_vector, v)) if v is not None and len(v) == len(query_vector) else 0.0
        score = coverage / coverage_threshold
        if not unspaced:  # the bundled embedder is English-only: its cosines for CJK text carry no signal
            score = max(score, dense / DENSE_RELEVANT)
        out.append({"coverage": round(coverage, 4), "dense": round(dense, 4), "score": min(score / 2, 1.0)})
    return out


def refusal_text(question: str) -> str:
    return REFUSAL_ZH if unspaced_ratio(question) >= 0.5 else REFUSAL_EN


# Relevance scores are scaled so that 0.5 means "clears the calibrated threshold of one signal".
DEFAULT_MIN_SCORE = 0.5


# --- context packing ------------------------------------------------------------------------------


def format_passage(n: int, hit: Hit, text: str | None = None) -> str:
    where = " — ".join(x for x in (hit.title, hit.heading, f"page {hit.page}" if hit.page else "") if x)
    return f"[{n}] {where}\n{hit.text if text is None else text}"


@dataclass
class Packed:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    hits: list[Hit]
    texts: list[str]  # each kept passage's text, the last one possibly cut


MIN_ANSWER_TOKENS = 16
MIN_PASSAGE_TOKENS = 48
MIN_CUT_TOKENS = 8


def pack_passages(generator: Generator, hits: list[Hit], build: Callable[[str], list[dict]],
                  max_tokens: int, prefill: str = "") -> Packed:
    """Fit as many passages, best first, as the context window holds next to the prompt and the answer.

    `build(passages_text)` returns the chat messages for a given passages block; `prefill` is the start of
    the assistant's reply, written by kb (see prompts/answer_prefix.txt). The answer keeps at
    most a third of the room the fixed prompt leaves, so a tiny context still gets passages. The whole
    prompt is counted again at the end, since token counts of parts do not add up exactly.
    """
    from kb.errors import BadQuestion

    n_ctx = generator.n_ctx
    fixed = generator.count_tokens(generator.format_chat(build("")) + prefill)
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
        prompt = generator.format_chat(build(passages)) + prefill
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
                  hits=kept, texts=texts)


# --- citations ------------------------------------------------------------------------------------

_CITATION = re.compile(r"\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]")
_MAYBE_CITATION = re.compile(r"\[[\d\s,;]*")


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

    `sources` are known before the first token: the passages given to the model, or, for a refusal, the
    closest passages found. Stopping early (Ctrl-C, `close()`) leaves `.answer` unset and logs nothing.
    """

    def __init__(self, *, question: str, standalone: str, sources: list[Source], refused: bool, model: str,
                 timings: dict, pieces: Iterator[str] | None, on_done: Callable[[Answer], None] | None,
                 refusal: str = "", prefill: str = ""):
        self.question = question
        self.standalone = standalone
        self.sources = sources
        self.refused = refused
        self.model = model
        self.timings = timings
        self.answer: Answer | None = None
        self._pieces = pieces
        self._on_done = on_done
        self._refusal = refusal
        self._prefill = prefill
        self._started = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        if self.answer is not None:
            yield self.answer.text
            return
        if self._pieces is None:
            yield self._refusal
            self._finish(self._refusal)
            return
        citations = CitationFilter({s.n for s in self.sources})
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
            text = citations.feed(piece)
            if text:
                parts.append(text)
                yield text
        rest = citations.flush()
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
        self._finish(tidy("".join(parts)))

    def _t0(self) -> float:
        return self.timings.get("_t0", self._started)

    def _finish(self, text: str) -> None:
        self.timings["total_ms"] = round((time.perf_counter() - self._t0()) * 1000, 1)
        self.timings.pop("_t0", None)
        self.answer = Answer(question=self.question, text=text, sources=self.sources, refused=self.refused,
                             model=self.model, timings=self.timings, standalone_question=self.standalone)
        if self._on_done:
            self._on_done(self.answer)

    def result(self) -> Answer:
        """Run to the end, discarding the pieces, and return the Answer."""
        for _ in self:
            pass
        assert self.answer is not None
        return self.answer


__all__ = ["Answer", "AnswerStream", "Source", "CitationFilter", "pack_passages", "relevance",
           "refusal_text", "question_terms", "DEFAULT_MIN_SCORE", "tidy"]
