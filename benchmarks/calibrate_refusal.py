"""Fit and calibrate kb's answerability models (kb/evidence.py ANSWERABILITY) on SQuAD-format sets.

For each question, kb retrieves candidates as `kb ask` does and assesses the evidence twice:
- answerable: the top-k passages, the question's own passage among them;
- unanswerable with related documents kept: the top-k passages kb retrieves once the answering passage is
  removed. The other paragraphs of the same article stay in the index, so the same names and topic words
  are all still there: the hard case users meet when a document is missing.

A logistic model per script group (spaced: with the embedding similarity; unspaced, CJK: without, since
the bundled embedder is English-only) is fitted on those signals, and its bias is set so that `--keep` of
the answerable questions pass at answerability 0.5 (kb's default `min_score`). The script prints a
two-fold cross-validated table per set (fitted on one half of the passages, measured on the other), the
final constants, and whether they equal those in kb/evidence.py.

    .venv/bin/python benchmarks/calibrate_refusal.py ../shared/data/qa/xquad.en.json \
        ../shared/data/qa/xquad.zh.json ../shared/data/qa/cmrc2018_trial.json [--limit 1200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kb.evaluate import _open_eval_kb, load_eval_set  # noqa: E402
from kb.evidence import ANSWERABILITY  # noqa: E402
from kb.retriever import CANDIDATES, SearchResult  # noqa: E402
from kb.text import unspaced_ratio  # noqa: E402


def signals_for(path: str, limit: int, cache: Path, k: int) -> list[dict]:
    eval_set = load_eval_set(path)
    kb, mapping = _open_eval_kb(eval_set, cache / eval_set.name, None, None)
    pids = list(eval_set.passages)
    rows = []
    step = max(1, len(eval_set.questions) // limit)
    for q in eval_set.questions[::step][:limit]:
        result = kb.search_result(q["question"], max(CANDIDATES // 5, 2 * k))
        gold = q["relevant"].keys()
        answerable = result.hits[:k]
        if not any(mapping.get(h.path) in gold for h in answerable):
            continue  # retrieval missed the passage: says nothing about answerability
        unanswerable = [h for h in result.hits if mapping.get(h.path) not in gold][:k]
        row = {"set": eval_set.name, "unspaced": unspaced_ratio(q["question"]) >= 0.5,
               "half": pids.index(next(iter(gold))) * 2 // len(pids)}
        for side, hits in (("pos", answerable), ("neg", unanswerable)):
            assessment, _ = kb.assess(q["question"], SearchResult(hits=hits, mode="hybrid",
                                                                  query_vector=result.query_vector))
            row[side] = assessment.signals
        rows.append(row)
    kb.close()
    return rows


def fit(rows: list[dict], features: list[str], keep: float, l2: float = 1e-2, steps: int = 4000) -> tuple[dict, float]:
    """L2-regularized logistic regression (plain gradient descent: deterministic), then the bias that lets
    `keep` of the answerable rows reach 0.5."""
    x = np.array([[r[side][f] for f in features] for side in ("pos", "neg") for r in rows])
    y = np.r_[np.ones(len(rows)), np.zeros(len(rows))]
    a = np.c_[x, np.ones(len(x))]
    w = np.zeros(a.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-a @ w))
        w -= 0.5 * (a.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0.0])
    pos = a[: len(rows)] @ w
    threshold = float(np.quantile(pos, 1 - keep))
    return {f: round(float(v), 3) for f, v in zip(features, w[:-1])}, round(float(w[-1] - threshold), 3)


def rates(rows: list[dict], weights: dict, bias: float) -> tuple[float, float]:
    def score(signals):
        return bias + sum(wt * signals.get(f, 0.0) for f, wt in weights.items())
    kept = sum(score(r["pos"]) >= 0 for r in rows) / len(rows)
    refused = sum(score(r["neg"]) < 0 for r in rows) / len(rows)
    return round(kept, 3), round(refused, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--limit", type=int, default=1200, help="questions per set")
    parser.add_argument("--k", type=int, default=5, help="passages assessed, as `kb ask -k`")
    parser.add_argument("--keep", type=float, default=0.96, help="share of answerable questions that must pass")
    parser.add_argument("--cache", default="/tmp/kb-calibrate")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    rows = []
    for f in args.files:
        rows += signals_for(f, args.limit, Path(args.cache), args.k)
    fitted = {}
    print(f"{'set':16} {'fold':>4} {'kept':>6} {'refused':>8}   (fitted on the other half of the passages)")
    for group, unspaced in (("spaced", False), ("unspaced", True)):
        group_rows = [r for r in rows if r["unspaced"] == unspaced]
        if not group_rows:
            continue
        features = list(ANSWERABILITY[group][0])
        for half in (0, 1):
            weights, bias = fit([r for r in group_rows if r["half"] != half], features, args.keep)
            for name in sorted({r["set"] for r in group_rows}):
                test = [r for r in group_rows if r["half"] == half and r["set"] == name]
                kept, refused = rates(test, weights, bias)
                print(f"{name:16} {half:>4} {kept:6.3f} {refused:8.3f}")
        weights, bias = fit(group_rows, features, args.keep)
        fitted[group] = (weights, bias)
        for name in sorted({r["set"] for r in group_rows}):
            kept, refused = rates([r for r in group_rows if r["set"] == name], weights, bias)
            print(f"{name:16}  all {kept:6.3f} {refused:8.3f}   (final model, on its own data)")
    print("\nANSWERABILITY = {")
    for group, (weights, bias) in fitted.items():
        print(f"    {json.dumps(group)}: ({json.dumps(weights)}, {bias}),")
    print("}")
    same = all(fitted[g] == (dict(ANSWERABILITY[g][0]), ANSWERABILITY[g][1]) for g in fitted)
    print("kb/evidence.py holds these constants" if same else "kb/evidence.py holds other constants: paste the above")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "fitted": fitted}))


if __name__ == "__main__":
    main()
