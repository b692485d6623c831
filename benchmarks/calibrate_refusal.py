"""Calibrate the refusal thresholds of kb/answer.py on SQuAD-format sets.

For each question: the relevance signals (term coverage, dense cosine) of the best of the top-5 passages
with its gold passage in the index ("answerable"), and again with the gold passage removed from the
results ("unanswerable": what the index offers when the document is missing). Prints, for a grid of
thresholds, the share of answerable questions kept and of unanswerable ones refused, per set.

    .venv/bin/python benchmarks/calibrate_refusal.py ../shared/data/qa/xquad.en.json ... [--limit 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kb.answer import question_terms, relevance  # noqa: E402
from kb.evaluate import _open_eval_kb, load_eval_set  # noqa: E402
from kb.text import unspaced_ratio  # noqa: E402


def signals_for(path: str, limit: int, cache: Path) -> list[dict]:
    eval_set = load_eval_set(path)
    kb, mapping = _open_eval_kb(eval_set, cache / eval_set.name, None, None)
    store = kb._open_store()
    rows = []
    step = max(1, len(eval_set.questions) // limit)
    for q in eval_set.questions[::step][:limit]:
        result = kb.search_result(q["question"], 8)
        gold = q["relevant"].keys()
        with_gold = result.hits[:5]
        without = [h for h in result.hits if mapping.get(h.path) not in gold][:5]
        pos = relevance(store, q["question"], result.query_vector, with_gold)
        neg = relevance(store, q["question"], result.query_vector, without)
        rows.append({
            "set": eval_set.name,
            "unspaced": unspaced_ratio(q["question"]) >= 0.5,
            "gold_in_top5": any(mapping.get(h.path) in gold for h in with_gold),
            "terms": len(question_terms(q["question"])),
            "pos_cov": max((s["coverage"] for s in pos), default=0), "pos_dense": max((s["dense"] for s in pos), default=0),
            "neg_cov": max((s["coverage"] for s in neg), default=0), "neg_dense": max((s["dense"] for s in neg), default=0),
        })
    kb.close()
    return rows


def table(rows: list[dict]) -> None:
    for name in sorted({r["set"] for r in rows}):
        rs = [r for r in rows if r["set"] == name and r["gold_in_top5"]]
        print(f"\n{name}: {len(rs)} questions with the gold passage in the top 5")
        print("cov_t dense_t  kept(answerable)  refused(unanswerable)")
        for cov_t in (0.4, 0.5, 0.6, 0.7):
            for dense_t in (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 9):
                def ok(cov, dense, unspaced):
                    return cov >= cov_t or (not unspaced and dense >= dense_t)
                kept = sum(ok(r["pos_cov"], r["pos_dense"], r["unspaced"]) for r in rs) / len(rs)
                refused = sum(not ok(r["neg_cov"], r["neg_dense"], r["unspaced"]) for r in rs) / len(rs)
                print(f"{cov_t:5.2f} {dense_t:7.2f}  {kept:16.3f}  {refused:21.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--cache", default="/tmp/kb-calibrate")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    rows = []
    for f in args.files:
        rows += signals_for(f, args.limit, Path(args.cache))
    table(rows)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
