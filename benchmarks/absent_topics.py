"""Questions about documents that are not in the index at all: how often kb refuses them.

The calibration (benchmarks/calibrate_refusal.py) and `kb eval answers` take out one paragraph and keep the rest
of its article: the hard case. This is the common one: a user asks about something their documents do not
cover at all. For each SQuAD-format set, the passages of every other article (by the order of the file's
articles) are indexed and the questions of the remaining articles are asked (`KnowledgeBase.evidence_search`,
as `kb ask` runs it). Printed per set: how many were refused, how many of them because the question names
something no document mentions (kb.evidence.unmentioned), and how many the answerability model alone would
refuse (the same assessment without that rule).

    .venv/bin/python benchmarks/absent_topics.py [../shared/data/qa/xquad.en.json ...] [--limit 600]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import QA_SETS, print_sections  # noqa: E402  (benchmarks/report.py)

from kb import KnowledgeBase  # noqa: E402
from kb.evaluate import load_eval_set, write_passages  # noqa: E402
from kb.evidence import answerability  # noqa: E402
from kb.text import unspaced_ratio  # noqa: E402



def article_of(path: Path, pids: list[str]) -> dict[str, int]:
    """Passage id -> the index of its article in the file (kb's SQuAD loader numbers passages in file order)."""
    out, i = {}, 0
    for a, article in enumerate(json.loads(path.read_text(encoding="utf-8"))["data"]):
        for _ in article["paragraphs"]:
            out[pids[i]] = a
            i += 1
    return out


def absent(path: Path, cache: Path, limit: int) -> dict:
    eval_set = load_eval_set(path)
    pids = list(eval_set.passages)
    article = article_of(path, pids)
    home = cache / eval_set.name
    if not (home / "ready").exists():
        shutil.rmtree(home, ignore_errors=True)
        write_passages(eval_set, home / "passages", [p for p in pids if article[p] % 2 == 0])
        kb = KnowledgeBase(home / "kb")
        kb.ingest([home / "passages"])
        kb.close()
        (home / "ready").write_text("1")
    kb = KnowledgeBase(home / "kb")
    questions = [q for q in eval_set.questions if all(article[p] % 2 == 1 for p in q["relevant"])]
    step = max(1, len(questions) // limit)
    questions = questions[::step][:limit]
    refused = by_name = model_alone = 0
    for q in questions:
        _, assessment, _ = kb.evidence_search(q["question"])
        threshold = kb.settings.min_score
        refused += assessment.answerability < threshold
        by_name += bool(assessment.unmentioned)
        alone = answerability(assessment.signals, unspaced=unspaced_ratio(q["question"]) >= 0.5) if assessment.scored else 0.0
        model_alone += alone < threshold
    kb.close()
    n = len(questions)
    return {"questions": n, "articles_indexed": len({article[p] for p in pids if article[p] % 2 == 0}),
            "refused": round(refused / n, 3), "refused_for_an_unmentioned_name": round(by_name / n, 3),
            "refused_by_the_model_alone": round(model_alone / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="*", default=[str(p) for p in QA_SETS])
    parser.add_argument("--limit", type=int, default=600, help="questions per set")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "kb-bench-absent"))
    args = parser.parse_args()
    print_sections({Path(f).stem: absent(Path(f), Path(args.cache), args.limit) for f in args.files})


if __name__ == "__main__":
    main()
