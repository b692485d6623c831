"""Evaluation on real question sets: retrieval (SQuAD or BEIR format) and end-to-end answers (SQuAD format).

Each passage becomes one document in a fresh home (or a reused one: ingest is incremental), so the
numbers measure kb exactly as a user runs it: same parser, chunker, embedder, store and retriever.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
import string
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from kb.errors import KBError
from kb.text import has_unspaced, lcs_length, unspaced_ratio


@dataclass
class EvalSet:
    """Passages (id -> text) and questions, each with its relevant passage ids and gold answers."""

    name: str
    passages: dict[str, str]
    questions: list[dict] = field(default_factory=list)  # {id, question, relevant: {pid: grade}, answers}


def load_squad(path: str | Path) -> EvalSet:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KBError(f"{path} is not a SQuAD-format JSON file: {e}",
                      hint="expected {\"data\": [{\"paragraphs\": [{\"context\", \"qas\"}]}]}") from e
    passages: dict[str, str] = {}
    questions = []
    for article in data:
        for paragraph in article.get("paragraphs", []):
            pid = f"p{len(passages):05d}"
            passages[pid] = paragraph["context"]
            for qa in paragraph.get("qas", []):
                if not str(qa.get("question", "")).strip():
                    continue  # a few published sets have empty questions; they measure nothing
                questions.append({
                    "id": str(qa.get("id", len(questions))),
                    "question": qa["question"],
                    "relevant": {pid: 1},
                    "answers": [a["text"] for a in qa.get("answers", [])],
                })
    return EvalSet(path.stem, passages, questions)


def load_beir(folder: str | Path, split: str = "test") -> EvalSet:
    folder = Path(folder)
    try:
        passages = {}
        with (folder / "corpus.jsonl").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    doc = json.loads(line)
                    title = doc.get("title") or ""
                    passages[str(doc["_id"])] = (title + "\n\n" if title else "") + doc["text"]
        queries = {}
        with (folder / "queries.jsonl").open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    q = json.loads(line)
                    queries[str(q["_id"])] = q["text"]
        relevant: dict[str, dict[str, int]] = collections.defaultdict(dict)
        with (folder / "qrels" / f"{split}.tsv").open(encoding="utf-8") as f:
            for n, line in enumerate(f):
                parts = line.rstrip("\n").split("\t")
                if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
                    continue  # header
                qid, pid, grade = parts[0], parts[1], int(parts[-1])
                if grade > 0 and pid in passages:
                    relevant[qid][pid] = grade
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise KBError(f"{folder} is not a BEIR-format folder: {e}",
                      hint="expected corpus.jsonl, queries.jsonl and qrels/test.tsv") from e
    questions = [{"id": qid, "question": queries[qid], "relevant": rel, "answers": []}
                 for qid, rel in relevant.items() if qid in queries]
    return EvalSet(folder.name, passages, questions)


def load_eval_set(path: str | Path) -> EvalSet:
    path = Path(path)
    if path.is_dir():
        return load_beir(path)
    if not path.is_file():
        raise KBError(f"evaluation file not found: {path}", hint="give a SQuAD .json file or a BEIR folder")
    return load_squad(path)


def write_passages(eval_set: EvalSet, folder: Path, ids: list[str] | None = None) -> dict[str, str]:
    """One text file per passage; returns file path -> passage id."""
    folder.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for pid in ids if ids is not None else list(eval_set.passages):
        name = re.sub(r"[^\w.-]", "_", pid)[:80] + ".txt"
        path = folder / name
        text = eval_set.passages[pid]
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        mapping[str(path.resolve())] = pid
    return mapping


def held_out(pid: str, share: float) -> bool:
    """A deterministic pseudo-random split of passages, stable across runs and machines."""
    return int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


# --- retrieval metrics ----------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def retrieval_metrics(ranked: list[list[str]], relevant: list[dict[str, int]], latencies: list[float]) -> dict:
    n = len(ranked)
    out: dict = {"queries": n}
    for k in (1, 5, 10):
        out[f"recall@{k}"] = sum(
            len(set(r[:k]) & rel.keys()) / len(rel) for r, rel in zip(ranked, relevant)) / n if n else 0.0
    mrr = ndcg = 0.0
    for r, rel in zip(ranked, relevant):
        mrr += next((1.0 / (i + 1) for i, pid in enumerate(r[:10]) if pid in rel), 0.0)
        dcg = sum((2 ** rel.get(pid, 0) - 1) / math.log2(i + 2) for i, pid in enumerate(r[:10]))
        ideal = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(sorted(rel.values(), reverse=True)[:10]))
        ndcg += dcg / ideal if ideal else 0.0
    out["mrr@10"] = mrr / n if n else 0.0
    out["ndcg@10"] = ndcg / n if n else 0.0
    out["latency_ms_p50"] = _percentile(latencies, 0.5)
    out["latency_ms_p95"] = _percentile(latencies, 0.95)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def ranked_passages(hits, path_to_pid: dict[str, str]) -> list[str]:
    """Passage ids in rank order, each once (a passage may have several chunks)."""
    seen: dict[str, None] = {}
    for hit in hits:
        pid = path_to_pid.get(hit.path)
        if pid is not None:
            seen.setdefault(pid, None)
    return list(seen)


# --- answer metrics (SQuAD v1.1 for spaced text, CMRC 2018 character level for Chinese) ----------------


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _cjk_units(text: str) -> list[str]:
    """CMRC-style units: each CJK character alone, other runs of letters and digits as words, no punctuation."""
    units, word = [], ""
    for ch in text.lower():
        if unicodedata.category(ch).startswith(("P", "S", "Z")) or ch.isspace():
            if word:
                units.append(word)
                word = ""
        elif unspaced_ratio(ch) > 0:
            if word:
                units.append(word)
                word = ""
            units.append(ch)
        else:
            word += ch
    if word:
        units.append(word)
    return units


def answer_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(exact match, F1) of `prediction` against the best-matching gold answer."""
    if not golds:
        return 0.0, 0.0
    best_em = best_f1 = 0.0
    for gold in golds:
        if has_unspaced(gold) or has_unspaced(prediction):  # CMRC's character level for Chinese
            p, g = _cjk_units(prediction), _cjk_units(gold)
            em = float(p == g)
            common = lcs_length(p, g) if p and g else 0
        else:
            p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
            em = float(p == g)
            common = sum((collections.Counter(p) & collections.Counter(g)).values())
        f1 = 0.0 if common == 0 else 2 * common / (len(p) + len(g))
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


# --- runs -----------------------------------------------------------------------------------------


def _open_eval_kb(eval_set: EvalSet, home: Path | None, ids: list[str] | None, progress, **kb_options):
    from kb.api import KnowledgeBase

    home = Path(home) if home else Path(tempfile.mkdtemp(prefix=f"kb-eval-{eval_set.name}-"))
    mapping = write_passages(eval_set, home / "passages", ids)
    kb = KnowledgeBase(home / "index", **kb_options)
    kb.ingest([home / "passages"], progress=progress)
    return kb, mapping


def eval_retrieval(path, *, modes=("hybrid",), k: int = 10, home=None, limit: int | None = None,
                   progress=None, **kb_options) -> list[dict]:
    eval_set = load_eval_set(path)
    kb, mapping = _open_eval_kb(eval_set, home, None, progress, **kb_options)
    questions = eval_set.questions[:limit] if limit else eval_set.questions
    results = []
    try:
        for mode in modes:
            kb.search("warm up", 1, mode=mode)
            ranked, latencies = [], []
            for q in questions:
                t = time.perf_counter()
                hits = kb.search(q["question"], k, mode=mode)
                latencies.append((time.perf_counter() - t) * 1000)
                ranked.append(ranked_passages(hits, mapping))
            metrics = retrieval_metrics(ranked, [q["relevant"] for q in questions], latencies)
            results.append({"file": str(path), "documents": len(eval_set.passages), "mode": mode, **metrics})
    finally:
        kb.close()
    return results


HELD_OUT_SHARE = 0.1

# kb's own framing of an answer, which a reader skips and a metric must too: the prefilled "According to
# [n]," (or "根据[n]，") and citation marks.
_FRAMING = re.compile(r"^\s*(?:according to|based on)\s*(?:\[[\d,\s]*\](?:\s*(?:,|and|&)\s*\[[\d,\s]*\])*)?\s*[,:]?\s*"
                      r"|^\s*根据\s*(?:\[[\d,\s]*\])+\s*[，,：:]?\s*", re.I)
_CITATION_MARK = re.compile(r"\s*\[\s*\d+(?:\s*[,;]\s*\d+)*\s*\]")


def answer_body(text: str) -> str:
    """The answer a reader reads: kb's "According to [n]," framing and citation marks removed."""
    return " ".join(_CITATION_MARK.sub("", _FRAMING.sub("", text)).split())


_PUNCT = re.compile("[" + re.escape(string.punctuation) + "‘’“”–—]")


def _contains_units(text: str) -> str:
    """Text for containment checks: lower case, punctuation as spaces, articles dropped (SQuAD style)."""
    text = _PUNCT.sub(" ", text.lower())
    return " " + " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split()) + " "


def contains_gold(text: str, golds: list[str]) -> bool:
    """Whether a gold answer appears in `text` after normalization: whole words for spaced scripts,
    characters without punctuation or spaces (as CMRC scores) for Chinese."""
    for gold in golds:
        if has_unspaced(gold) or has_unspaced(text):  # "1562年" in Chinese text: characters, not words
            unit = "".join(_cjk_units(gold))
            if unit and unit in "".join(_cjk_units(text)):
                return True
        elif _contains_units(gold).strip() and _contains_units(gold) in _contains_units(text):
            return True
    return False


def eval_answers(path, *, limit: int | None = None, home=None, progress=None, on_question=None,
                 ask_options: dict | None = None, details: bool = False, split: str = "all",
                 split_by: str = "question", **kb_options) -> dict:
    """What users see, on a SQuAD-format set. Answerable questions (their passage is indexed): exact match
    and F1 of the answer without kb's framing, answer-contains-gold, evidence-contains-gold (the best
    sentence; any of the quotes shown), citation accuracy, and how many were refused. Unanswerable
    questions: those whose passage was held out of the index (a deterministic 10% of passages) while the
    other paragraphs of the same article, the related documents, stay indexed: the share refused."""
    eval_set = load_eval_set(path)
    indexed = [pid for pid in eval_set.passages if not held_out(pid, HELD_OUT_SHARE)]
    kb, mapping = _open_eval_kb(eval_set, home, indexed, progress, **kb_options)
    indexed_set = set(indexed)
    answerable = [q for q in eval_set.questions if q["relevant"].keys() & indexed_set and q["answers"]]
    unanswerable = [q for q in eval_set.questions if not q["relevant"].keys() & indexed_set]
    if split != "all":  # the same split `kb dataset build --kind rag --questions` uses
        from kb.dataset import split_of

        def part(q):
            return split_of(q["id"] if split_by == "question" else next(iter(q["relevant"])))

        answerable = [q for q in answerable if part(q) == split]
        unanswerable = [q for q in unanswerable if part(q) == split]
    if limit:
        answerable = answerable[:limit]
        unanswerable = unanswerable[:limit]
    sums = collections.Counter()
    records = []
    try:
        for q in answerable:
            answer = kb.ask(q["question"], log=False, **(ask_options or {}))
            body = answer_body(answer.text)
            e, f = answer_scores(body, q["answers"]) if not answer.refused else (0.0, 0.0)
            cited = {mapping.get(s.path) for s in answer.sources if s.cited}
            row = {
                "exact_match": e, "f1": f,
                "answer_contains_gold": float(not answer.refused and contains_gold(body, q["answers"])),
                "evidence_top1": float(bool(answer.evidence) and contains_gold(answer.evidence[0].text, q["answers"])),
                "evidence_top3": float(any(contains_gold(x.text, q["answers"]) for x in answer.quotes())),
                "citation_accuracy": float(bool(cited & q["relevant"].keys())),
                "refused_answerable": float(answer.refused),
                "extractive": float(answer.extractive),
                "replaced_by_evidence": float(bool(answer.generated) and not answer.refusal_overruled),
                "refusal_overruled": float(answer.refusal_overruled),
                "generated_contains_gold": float(not answer.refused and not answer.extractive and contains_gold(
                    answer_body(answer.generated or answer.text), q["answers"])),
                "answer_chars": len(body),
            }
            sums.update(row)
            if details:
                records.append({"id": q["id"], "question": q["question"], "gold": q["answers"], "answer": answer.text,
                                "refused": answer.refused, "answerability": answer.answerability, **row})
            if on_question:
                on_question(q, answer, e, f)
        refused = overruled = 0
        for q in unanswerable:
            answer = kb.ask(q["question"], log=False, **(ask_options or {}))
            refused += answer.refused
            overruled += answer.refusal_overruled
            if details:
                records.append({"id": q["id"], "question": q["question"], "unanswerable": True, "answer": answer.text,
                                "refused": answer.refused, "answerability": answer.answerability})
            if on_question:
                on_question(q, answer, None, None)
    finally:
        kb.close()
    n = len(answerable)
    result = {
        "file": str(path),
        "split": split if split == "all" else f"{split} by {split_by}",
        "language": "zh" if unspaced_ratio("".join(q["question"] for q in eval_set.questions[:50])) >= 0.5 else "en",
        "questions": n,
        **{key: round(sums[key] / n, 4) if n else 0.0 for key in ANSWER_METRICS},
        "unanswerable_questions": len(unanswerable),
        "refused_unanswerable": round(refused / len(unanswerable), 4) if unanswerable else 0.0,
        "refusal_overruled_unanswerable": round(overruled / len(unanswerable), 4) if unanswerable else 0.0,
    }
    if details:
        result["details"] = records
    return result


ANSWER_METRICS = ("exact_match", "f1", "answer_contains_gold", "evidence_top1", "evidence_top3",
                  "citation_accuracy", "refused_answerable", "extractive", "replaced_by_evidence",
                  "refusal_overruled", "generated_contains_gold", "answer_chars")


__all__ = ["EvalSet", "load_squad", "load_beir", "load_eval_set", "eval_retrieval", "eval_answers",
           "answer_scores", "normalize_answer", "retrieval_metrics", "held_out", "answer_body", "contains_gold",
           "ANSWER_METRICS"]
