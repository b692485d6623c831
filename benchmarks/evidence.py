"""Evidence quality and cost; prints a table and one JSON object.

1. For every question of each SQuAD-format set (each passage indexed as a document, as `kb eval` does):
   retrieval and evidence as `kb ask` runs them (KnowledgeBase.evidence_search); whether a gold answer is in
   the best evidence sentence (top-1) and in the quotes shown (the best three sentences, neighbours joined:
   top-3), whether it is in the extractive answer (the best sentence, and the second best when it scores
   almost as well: kb.answer.extractive_text), whether it is in the passages given at all (the ceiling), and
   how often a passage from below the top k took a place for its evidence. Same normalization as `kb eval answers`.
2. The cost of evidence per question on top of retrieval (in process, warm): p50 and p95.
3. `kb ask --extractive` from a cold process on the bundled examples: wall time p50 and max.

    .venv/bin/python benchmarks/evidence.py [../shared/data/qa/xquad.en.json ...] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import QA_SETS, print_sections, run_child  # noqa: E402  (benchmarks/report.py)

from kb.answer import extractive_text  # noqa: E402
from kb.evaluate import _open_eval_kb, answer_body, contains_gold, load_eval_set  # noqa: E402
from kb.evidence import join_adjacent  # noqa: E402



def evidence_quality(path: Path, cache: Path) -> dict:
    eval_set = load_eval_set(path)
    kb, _ = _open_eval_kb(eval_set, cache / eval_set.name, None, None)
    top1 = top3 = extractive = ceiling = swapped = 0
    costs = []
    questions = [q for q in eval_set.questions if q["answers"]]
    for q in questions:
        result, assessment, passages = kb.evidence_search(q["question"])
        evidence = assessment.evidence(3)
        quotes = join_adjacent(evidence, {p.n: p.text for p in passages})
        costs.append(result.timings["evidence_ms"])
        swapped += bool(result.timings.get("evidence_swapped"))
        top1 += bool(evidence) and contains_gold(evidence[0].text, q["answers"])
        top3 += any(contains_gold(x.text, q["answers"]) for x in quotes)
        extractive += contains_gold(answer_body(extractive_text(evidence)), q["answers"])
        ceiling += any(contains_gold(h.text, q["answers"]) for h in result.hits)
    kb.close()
    n = len(questions)
    costs.sort()
    return {"questions": n, "evidence_top1": round(top1 / n, 4), "evidence_top3": round(top3 / n, 4),
            "extractive_contains_gold": round(extractive / n, 4),
            "gold_in_passages": round(ceiling / n, 4), "passages_swapped": round(swapped / n, 4),
            "evidence_ms_p50": round(statistics.median(costs), 2), "evidence_ms_p95": round(costs[int(0.95 * n)], 2)}


def cold_extractive(runs: int, home: Path) -> dict:
    kb_bin = Path(sys.executable).with_name("kb")
    run_child([str(kb_bin), "ingest", str(ROOT / "examples"), "--kb", str(home), "-q"])
    questions = ["How often should I feed a sourdough starter on the counter?", "番茄每天需要多少小时的阳光？",
                 "When should I replace a bike chain?"]
    walls = []
    for i in range(runs):
        wall, _, proc = run_child([str(kb_bin), "ask", questions[i % len(questions)], "--kb", str(home),
                                   "--extractive", "--json"])
        if proc.returncode != 0 or not json.loads(proc.stdout)["extractive"]:
            raise SystemExit(f"extractive ask failed: {proc.stderr}")
        walls.append(wall)
    return {"runs": runs, "wall_s_p50": round(statistics.median(walls), 3), "wall_s_max": round(max(walls), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="*", default=[str(p) for p in QA_SETS])
    parser.add_argument("--runs", type=int, default=10, help="cold extractive asks (0: none)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "kb-bench-evidence"))
    args = parser.parse_args()
    cache = Path(args.cache)
    result = {Path(f).stem: evidence_quality(Path(f), cache) for f in args.files}
    if args.runs > 0:  # --runs 0: quality and warm cost only
        with tempfile.TemporaryDirectory(prefix="kb-bench-") as tmp:
            result["cold_extractive_ask"] = cold_extractive(args.runs, Path(tmp))
    print_sections(result)


if __name__ == "__main__":
    main()
