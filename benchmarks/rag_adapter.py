"""Benchmark the retrieval-aware adapter (issue 14); prints a table and one JSON object.

For each question set (xquad.en, then cmrc2018_trial):
1. Index its passages as `kb eval answers` does (10% of passages held out: their questions are unanswerable).
2. `kb dataset build --kind rag` from the *train* part of a deterministic split (by document by default: the
   adapter never sees a test question nor a test passage's questions), 20% of examples with the answering
   passage left out (target: kb's refusal).
3. `kb finetune` on it in its own process: seconds per step (warm-up excluded) and peak RSS.
4. `kb eval answers --split test` without and with the adapter, as users get them (support check on, a model's
   refusal overruled by strong evidence), and with the adapter once more with the model's refusals standing
   (`overrule_refusal = 1`): answer-contains-gold (what the user reads, and `generated_contains_gold` for the
   model's own text), F1, citation accuracy, refusal, and how often evidence replaced or overruled the model.

The bundled model is English-only, so for Chinese kb would answer extractively; the cmrc run forces
generation (`model_languages = en,zh`) so that the adapter's effect on the model is what is measured.

    .venv/bin/python benchmarks/rag_adapter.py [--steps 200] [--batch 2] [--limit 150] [--split-by document]
        [--sets xquad.en,cmrc2018_trial]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import QA, print_sections, run_child  # noqa: E402  (benchmarks/report.py, beside this script)

from kb.dataset import LEAVE_OUT_SHARE, read_questions, split_of  # noqa: E402
from kb.evaluate import HELD_OUT_SHARE, _open_eval_kb, eval_answers, held_out, load_eval_set  # noqa: E402

WARM_UP_STEPS = 2
REPORTED = ("answer_contains_gold", "f1", "citation_accuracy", "refused_answerable", "refused_unanswerable",
            "generated_contains_gold", "replaced_by_evidence", "refusal_overruled", "refusal_overruled_unanswerable")


def run_set(name: str, args, keep: Path) -> dict:
    path = Path(args.qa_dir) / f"{name}.json"
    eval_set = load_eval_set(path)
    chinese = name.startswith(("cmrc", "xquad.zh"))
    options = {"model_languages": "en,zh"} if chinese else {}
    home = keep / name
    indexed = [pid for pid in eval_set.passages if not held_out(pid, HELD_OUT_SHARE)]
    kb, _ = _open_eval_kb(eval_set, home, indexed, None, **options)
    questions = [q for q in read_questions(path)
                 if split_of(q["id"] if args.split_by == "question" else q["document"]) == "train"]
    data = keep / f"{name}-rag-train.jsonl"
    t = time.perf_counter()
    built = kb.build_rag_dataset(data, questions=questions, leave_out_share=args.leave_out)
    build_s = time.perf_counter() - t
    kb.close()
    out: dict = {"dataset": {"train_questions": len(questions), "examples": built["rag"],
                             "refusal_examples": built["rag_refusal"],
                             "dropped": {k: v for k, v in built.items() if k.startswith("dropped")},
                             "seconds_per_100_questions": round(build_s / max(len(questions), 1) * 100, 1)}}

    adapter_home = keep / "home"
    adapter = f"{name}-rag-{int(time.time())}"
    kb_bin = Path(sys.executable).with_name("kb")
    wall, peak_rss_mb, proc = run_child([str(kb_bin), "finetune", str(data), "--kb", str(adapter_home),
                                         "--name", adapter, "--steps", str(args.steps), "--batch", str(args.batch),
                                         "--lr", str(args.lr), "--threads", "2"])
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    card = json.loads((adapter_home / "adapters" / f"{adapter}.json").read_text())
    timed = card["step_seconds_this_session"][WARM_UP_STEPS:]
    out["train"] = {"steps": card["steps"], "batch": card["batch"], "rank": card["rank"], "lr": card["lr"],
                    "max_len": card["max_len"], "examples": card["examples"], "skipped": card["examples_skipped"],
                    "seconds_per_step": round(sum(timed) / len(timed), 2) if timed else None,
                    "wall_minutes": round(wall / 60, 1), "peak_rss_mb": round(peak_rss_mb),
                    "final_loss": card["final_loss"], "kind": card.get("kind")}
    gguf = adapter_home / "adapters" / f"{adapter}.gguf"
    runs = (("base", {}), ("adapter", {"adapter": str(gguf)}),
            ("adapter_refusal_stands", {"adapter": str(gguf), "overrule_refusal": 1.0}))
    for label, extra in runs:
        r = eval_answers(path, limit=args.limit, home=home, split="test", split_by=args.split_by, **options, **extra)
        out[f"test_{label}"] = {"questions": r["questions"], "unanswerable": r["unanswerable_questions"],
                                **{m: r[m] for m in REPORTED}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--leave-out", type=float, default=LEAVE_OUT_SHARE)
    parser.add_argument("--limit", type=int, default=150, help="answerable (and unanswerable) test questions")
    parser.add_argument("--split-by", choices=["question", "document"], default="document")
    parser.add_argument("--sets", default="xquad.en,cmrc2018_trial")
    parser.add_argument("--qa-dir", default=str(QA), help="folder of the SQuAD-format sets")
    parser.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "kb-bench-rag-adapter"))
    args = parser.parse_args()
    keep = Path(args.keep)
    result = {}
    for name in args.sets.split(","):
        for section, values in run_set(name, args, keep).items():
            result[f"{name}.{section}"] = values
    print_sections(result)


if __name__ == "__main__":
    main()
