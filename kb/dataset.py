"""Training data: build chat-format examples from the ingested corpus, and check or clean a dataset file.

Formats read: JSONL or JSON (a list), CSV and TSV; each example either `messages` (chat format) or
`prompt` and `completion`. Written: chat-format JSONL, one `{"messages": [...]}` per line.
"""

from __future__ import annotations

import collections
import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kb.errors import KBError
from kb.generator import complete
from kb.text import lcs_length, lexical_terms


@dataclass
class ReadResult:
    examples: list[list[dict]]  # usable examples as chat messages
    problems: list[str] = field(default_factory=list)  # "line N: what is wrong"
    raw_format: str = ""  # "messages" or "prompt/completion"
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)


def _rows(path: Path) -> list[tuple[int, object]]:
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [(n + 2, row) for n, row in enumerate(reader)]
    stripped = text.lstrip()
    if suffix == ".json" or stripped.startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise KBError(f"{path} is not valid JSON: {e}", hint="use JSONL (one example per line), JSON, CSV or TSV") from e
        if isinstance(data, dict):
            data = data.get("data") or data.get("examples") or [data]
        return [(n + 1, row) for n, row in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except ValueError:
            rows.append((n, ValueError(f"not valid JSON: {line[:60]}")))
    return rows


def read_examples(path: str | Path) -> ReadResult:
    path = Path(path)
    if not path.is_file():
        raise KBError(f"dataset file not found: {path}", hint="give a .jsonl, .json, .csv or .tsv file")
    result = ReadResult(examples=[])
    kinds = collections.Counter()
    for n, row in _rows(path):
        if isinstance(row, Exception):
            result.problems.append(f"line {n}: {row}")
            continue
        if not isinstance(row, dict):
            result.problems.append(f"line {n}: not an object")
            continue
        if "messages" in row:
            kinds["messages"] += 1
            messages = row["messages"]
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except ValueError:
                    messages = None
            if not isinstance(messages, list) or not messages:
                result.problems.append(f"line {n}: `messages` is missing or empty")
                continue
            bad = [i for i, m in enumerate(messages)
                   if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                   or not str(m.get("content") or "").strip()]
            if bad:
                result.problems.append(f"line {n}: message {bad[0] + 1} has no valid role or empty content")
                continue
            if messages[-1]["role"] != "assistant":
                result.problems.append(f"line {n}: the last message is not the assistant's")
                continue
            clean = [{"role": m["role"], "content": str(m["content"])} for m in messages]
            result.examples.append(clean)
            result.prompts.append(clean[-2]["content"] if len(clean) > 1 else "")
            result.completions.append(clean[-1]["content"])
        elif "prompt" in row or "completion" in row:
            kinds["prompt/completion"] += 1
            prompt, completion = str(row.get("prompt") or ""), str(row.get("completion") or "")
            missing = [k for k, v in (("prompt", prompt), ("completion", completion)) if not v.strip()]
            if missing:
                result.problems.append(f"line {n}: empty or missing {' and '.join(missing)}")
                continue
            result.prompts.append(prompt)
            result.completions.append(completion)
            result.examples.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
        else:
            result.problems.append(f"line {n}: neither `messages` nor `prompt`/`completion`")
    result.raw_format = kinds.most_common(1)[0][0] if kinds else ""
    if len(kinds) > 1:
        result.problems.append(f"mixed formats: {dict(kinds)}")
    return result


def _common_suffix(texts: list[str]) -> str:
    if not texts:
        return ""
    shortest = min(texts, key=len)
    n = 0
    while n < len(shortest) and all(t[len(t) - n - 1] == shortest[len(shortest) - n - 1] for t in texts):
        n += 1
    return shortest[len(shortest) - n:] if n else ""


def check_dataset(path: str | Path, count_tokens, n_ctx: int) -> dict:
    """What a hosted fine-tuning service's data preparation tool reports, as a dict."""
    result = read_examples(path)
    keys = [json.dumps(m, ensure_ascii=False, sort_keys=True) for m in result.examples]
    counts = collections.Counter(keys)
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    tokens = [sum(count_tokens(m["content"]) + 4 for m in example) for example in result.examples]
    too_long = [i for i, t in enumerate(tokens) if t > n_ctx]
    report = {
        "file": str(path),
        "format": result.raw_format,
        "examples": len(result.examples),
        "problems": result.problems,
        "duplicates": duplicates,
        "too_long": len(too_long),
        "n_ctx": n_ctx,
        "tokens": sum(tokens),
        "tokens_max": max(tokens, default=0),
        "notes": [],
    }
    if result.raw_format == "prompt/completion" and result.prompts:
        suffix = _common_suffix(result.prompts)
        endings = collections.Counter(p[-1:] for p in result.prompts)
        if not suffix.strip() and len(endings) > 1:
            report["notes"].append("prompts end in different ways: give them one fixed separator "
                                   "(e.g. \"\\n\\n###\\n\\n\"), or use chat format, which needs none")
        completion_ends = collections.Counter(c[-1:] for c in result.completions)
        if len(completion_ends) > 1 and not _common_suffix(result.completions).strip():
            report["notes"].append("completions end in different ways: the model learns where to stop from "
                                   "a consistent ending (chat format adds one)")
        starts = collections.Counter(c[:1].isspace() for c in result.completions)
        if len(starts) > 1:
            report["notes"].append("some completions start with whitespace and some do not")
    return report


def fix_dataset(path: str | Path, out: str | Path, count_tokens, n_ctx: int) -> dict:
    """Write the usable, distinct, short-enough examples as chat-format JSONL, whitespace trimmed."""
    result = read_examples(path)
    seen = set()
    kept = dropped = 0
    out = Path(out)
    with out.open("w", encoding="utf-8") as f:
        for example in result.examples:
            clean = [{"role": m["role"], "content": m["content"].strip()} for m in example]
            key = json.dumps(clean, ensure_ascii=False, sort_keys=True)
            if key in seen or sum(count_tokens(m["content"]) + 4 for m in clean) > n_ctx:
                dropped += 1
                continue
            seen.add(key)
            f.write(json.dumps({"messages": clean}, ensure_ascii=False) + "\n")
            kept += 1
    return {"out": str(out), "kept": kept, "dropped": dropped + len(result.problems)}


# --- building from the corpus ---------------------------------------------------------------------


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure over lexical terms (words; bigrams for CJK), as self-instruct uses for near-duplicates."""
    x, y = lexical_terms(a), lexical_terms(b)
    if not x or not y:
        return 0.0
    lcs = lcs_length(x, y)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def supported(answer: str, passage: str, threshold: float = 0.7) -> bool:
    """Most of the answer's content terms occur in the passage."""
    terms = [t for t in lexical_terms(answer) if len(t) > 2 or not t.isascii()]
    if not terms:
        return False
    present = set(lexical_terms(passage))
    return sum(t in present for t in terms) / len(terms) >= threshold


def degenerate(text: str) -> bool:
    """Empty, too short, or looping text."""
    words = text.split()
    if len(text.strip()) < 8 or not words:
        return True
    trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return bool(trigrams) and len(set(trigrams)) / len(trigrams) < 0.6


QUESTION_PROMPT = ("Here is a passage from a document titled \"{title}\".\n\n{text}\n\n"
                   "Write one question that a reader could answer from this passage alone. "
                   "Reply with the question only.")
ANSWER_PROMPT = ("Passage:\n{text}\n\nAnswer the question using only the passage, in one or two sentences.\n"
                 "Question: {question}")


def continuation_example(title: str, heading: str, text: str) -> list[dict]:
    where = f"the section \"{heading}\" of \"{title}\"" if heading else f"\"{title}\""
    return [{"role": "user", "content": f"Write {where}."}, {"role": "assistant", "content": text}]


def build_dataset(store, out: str | Path, *, kind: str = "both", teacher=None, progress=None,
                  limit: int | None = None) -> dict:
    """Write chat-format examples from every chunk of the index to `out`; resumable.

    Each processed chunk id is appended to `<out>.progress`, so a stopped build continues where it was.
    """
    out = Path(out)
    done_file = out.with_name(out.name + ".progress")
    done = set()
    if done_file.exists() and out.exists():
        done = {int(x) for x in done_file.read_text().split()}
    elif out.exists():
        out.unlink()
    kept_questions: list[str] = []
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            example = json.loads(line)["messages"]
            if example[0]["content"].startswith("Write "):
                continue
            kept_questions.append(example[-2]["content"])
    rows = [(chunk_id, text, heading, title) for chunk_id, title, heading, text in store.iter_chunks()]
    if limit:
        rows = rows[:limit]
    stats = collections.Counter()
    with out.open("a", encoding="utf-8") as f, done_file.open("a") as progress_file:
        for n, (chunk_id, text, heading, title) in enumerate(rows, 1):
            if chunk_id in done:
                continue
            examples = []
            if kind in ("continuation", "both") and not degenerate(text):
                examples.append(continuation_example(title or "", heading or "", text))
                stats["continuation"] += 1
            if kind in ("qa", "both") and teacher is not None:
                pair = _qa_pair(teacher, title or "", text, kept_questions, stats)
                if pair:
                    examples.append(pair)
            for example in examples:
                f.write(json.dumps({"messages": example}, ensure_ascii=False) + "\n")
            f.flush()
            progress_file.write(f"{chunk_id}\n")
            progress_file.flush()
            if progress:
                progress(n, len(rows), dict(stats))
    done_file.unlink()
    return {"out": str(out), "chunks": len(rows), **dict(stats)}


def _qa_pair(teacher, title: str, text: str, kept_questions: list[str], stats) -> list[dict] | None:
    question = complete(teacher, QUESTION_PROMPT.format(title=title, text=text), 48, min_room=16)
    question = question.splitlines()[0].strip() if question else ""
    question = re.sub(r"^(question\s*\d*\s*[:：]\s*)", "", question, flags=re.I)
    if degenerate(question) or not question.endswith(("?", "？")):
        stats["rejected_degenerate"] += 1
        return None
    if any(rouge_l(question, q) > 0.7 for q in kept_questions):
        stats["rejected_duplicate"] += 1
        return None
    answer = complete(teacher, ANSWER_PROMPT.format(text=text, question=question), 96, min_room=16)
    if degenerate(answer):
        stats["rejected_degenerate"] += 1
        return None
    if not supported(answer, text):
        stats["rejected_unsupported"] += 1
        return None
    kept_questions.append(question)
    stats["qa"] += 1
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# --- retrieval-aware examples (RAG) ----------------------------------------------------------------

# Share of examples whose answering passage is left out, with kb's refusal as the target. Measured on xquad.en
# (benchmarks/rag_adapter.py, README): with 20% the adapter refused a fifth of the answerable questions it was
# shown and cost users 0.06 of answers holding the gold; with 5% its own answers hold the gold 0.61 of the time
# (0.41 with 20%, 0.24 without an adapter) and it refuses unanswerable ones as often as without it.
LEAVE_OUT_SHARE = 0.05
REFUSAL_TARGET = {"en": "the documents do not contain an answer to this question.",
                  "zh": "文档中没有这个问题的答案。"}


def split_of(key: str, test_share: float = 0.25) -> str:
    """A deterministic train/test split by a question's or a document's id, stable across runs and machines."""
    import hashlib

    return "test" if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < test_share else "train"


def read_questions(path: str | Path) -> list[dict]:
    """Questions with answers from a SQuAD-format file or JSONL of {question, answer|answers, source?}:
    [{id, question, answers, source, document}] (`document`: the SQuAD passage's id, for splits by document)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise KBError(f"cannot read {path}: {e.strerror or e}") from e
    out: list[dict] = []
    if text.lstrip().startswith("{") and '"data"' in text[:2000]:
        from kb.evaluate import load_squad

        squad = load_squad(path)
        for q in squad.questions:
            passage = next(iter(q["relevant"]))  # as `kb eval` names its passage files: p00012.txt
            out.append({"id": q["id"], "question": q["question"], "answers": q["answers"], "source": passage,
                        "document": passage})
        return out
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            out.append({"id": f"line{n}", "question": "", "answers": [], "problem": f"line {n}: not JSON"})
            continue
        answers = row.get("answers") or ([row["answer"]] if row.get("answer") else [])
        out.append({"id": str(row.get("id", f"line{n}")), "question": str(row.get("question") or ""),
                    "answers": [str(a) for a in answers if str(a).strip()], "source": row.get("source"),
                    "document": str(row.get("source") or row.get("id", f"line{n}"))})
    return out


def build_rag_dataset(kb, out: str | Path, *, questions: list[dict] | None = None, teacher=None,
                      leave_out_share: float = LEAVE_OUT_SHARE, limit: int | None = None, seed: int = 0,
                      progress=None) -> dict:
    """Examples in kb's exact answer prompt, for `kb finetune`: the persona's system prompt, the evidence and
    the passages kb retrieves and packs for the question (the answering passage among real distractors, or,
    in `leave_out_share` of them, left out, with kb's refusal as the target), and a target that cites the
    answering passage and quotes the sentence that answers. Questions come from `questions` (see
    `read_questions`) or are written by `teacher` from each chunk. Returns counts, kept and dropped by reason."""
    import random

    from kb.answer import _MARKUP
    from kb.evaluate import contains_gold
    from kb.evidence import split_sentences
    from kb.retriever import SearchResult
    from kb.text import unspaced_ratio

    rng = random.Random(seed)
    store = kb._open_store()
    stats: collections.Counter = collections.Counter()
    items = list(questions or [])
    if not items and teacher is not None:
        kept_questions: list[str] = []
        for chunk_id, title, heading, text in list(store.iter_chunks())[:limit or None]:
            pair = _qa_pair(teacher, title or "", text, kept_questions, stats)
            if pair:
                items.append({"id": str(chunk_id), "question": pair[0]["content"], "answers": [pair[1]["content"]],
                              "chunk_id": chunk_id, "teacher": True})
    if limit:
        items = items[:limit]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for n, item in enumerate(items, 1):
            example = _rag_example(kb, store, item, rng.random() < leave_out_share, stats, contains_gold,
                                   split_sentences, SearchResult, unspaced_ratio, _MARKUP)
            if example is not None:
                f.write(json.dumps({"messages": example}, ensure_ascii=False) + "\n")
            if progress:
                progress(n, len(items), dict(stats))
    meta = {"kind": "rag", "prompt_template_sha256": prompt_template_hash(kb.config_home), "examples": stats["rag"],
            "n_ctx": kb.generator.n_ctx}
    out.with_name(out.name + ".meta.json").write_text(json.dumps(meta, indent=1))
    return {"out": str(out), "questions": len(items), "rag": 0, "rag_refusal": 0, **dict(stats)}


def _rag_example(kb, store, item, leave_out, stats, contains_gold, split_sentences, SearchResult, unspaced_ratio,
                 markup) -> list[dict] | None:
    question, answers = item.get("question", "").strip(), item.get("answers") or []
    if item.get("problem") or not question:
        stats["dropped_bad_question"] += 1
        return None
    if not answers:
        stats["dropped_no_answer"] += 1
        return None
    result = kb.search_result(question, max(kb.settings.top_k, 1))
    hits = list(result.hits)
    gold = _answering_chunk(kb, store, item, question, answers, hits, contains_gold)
    if gold is None:
        stats["dropped_answer_not_found"] += 1
        return None
    others = [h for h in hits if h.chunk_id != gold.chunk_id]
    if leave_out:
        if not others:
            stats["dropped_no_distractors"] += 1
            return None
        hits = others
    else:
        if not others:
            stats["dropped_no_distractors"] += 1
            return None
        if all(h.chunk_id != gold.chunk_id for h in hits):
            hits = others[: max(len(hits) - 1, 1)]
            hits.insert(min(len(hits), int(len(hits) * _position_of(question))), gold)
    assessment, passages = kb.assess(question, SearchResult(hits=hits, mode="hybrid", query_vector=result.query_vector))
    usable = kb.usable_passages(assessment, passages, hits, keep=None if leave_out else gold.chunk_id)
    position = next((i + 1 for i, (_, h) in enumerate(usable) if h.chunk_id == gold.chunk_id), None)
    prompt = kb.answer_prompt(question, question, assessment, usable, first=position)
    if not leave_out and (position is None or position > len(prompt.packed.hits)):
        stats["dropped_answer_cut_from_prompt"] += 1
        return None
    language = "zh" if unspaced_ratio(question) >= 0.5 else "en"
    if leave_out:
        target = REFUSAL_TARGET[language]
        stats["rag_refusal"] += 1
    else:
        sentences = [gold.text[a:b] for a, b in split_sentences(gold.text)]
        quote = next((x for x in sentences if contains_gold(x, answers)), None)
        if quote is None and not item.get("teacher"):
            stats["dropped_answer_not_in_a_sentence"] += 1
            return None
        quote = quote or answers[0]
        target = _after_prefill(" ".join(markup.sub("", line).strip() for line in quote.splitlines() if line.strip()),
                                gold.text)
    stats["rag"] += 1
    separator = "" if language == "zh" else " "
    return [*prompt.packed.messages, {"role": "assistant", "content": prompt.prefill + separator + target}]


def _after_prefill(sentence: str, passage: str) -> str:
    """The quote as it reads after "According to [n],": its first word in lower case when that word is an
    ordinary one (the passage also has it in lower case), so "A starter is fed" but "Alpha is the first"."""
    import re

    word = re.match(r"[A-Z][a-z]*\b", sentence)
    if word and re.search(rf"\b{word.group().lower()}\b", passage):
        return sentence[0].lower() + sentence[1:]
    return sentence


def _position_of(text: str) -> float:
    """A position in [0, 1) derived from the question: where the answering passage goes, the same every run."""
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0x100000000


def _answering_chunk(kb, store, item, question, answers, hits, contains_gold):
    """The chunk that answers: given (teacher questions), else the best-ranked chunk that holds a gold answer
    and, when the question names its source (a document's path, or its file name without extension), comes from
    that document: a short answer ("24") is in many passages. Among more candidates when needed."""
    if item.get("chunk_id") is not None:
        found = store.hits([(item["chunk_id"], 0.0)])
        return found[0] if found else None
    source = item.get("source")

    def matches(h):
        from_source = not source or Path(h.path).stem == str(source) or h.path.endswith(str(source))
        return from_source and contains_gold(h.text, answers)

    found = next((h for h in hits if matches(h)), None)
    if found is None:
        found = next((h for h in kb.search(question, 30) if matches(h)), None)
    return found


def prompt_template_hash(home: Path) -> str:
    """What an adapter trained on kb's answer prompt depends on: the answer, prefix and system templates."""
    import hashlib

    from kb.prompting import template_text

    h = hashlib.sha256()
    for name in ("chat_system", "answer", "answer_prefix", "answer_prefix_zh"):
        h.update(template_text(name, home).encode("utf-8"))
    return h.hexdigest()


__all__ = ["read_examples", "check_dataset", "fix_dataset", "build_dataset", "rouge_l", "supported",
           "degenerate", "continuation_example", "build_rag_dataset", "read_questions", "split_of",
           "prompt_template_hash"]
