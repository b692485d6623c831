"""Benchmark LoRA fine-tuning on the bundled model; prints a table and one JSON object.

1. Seconds per step and peak RSS for rank 8, batch 4, 2 threads (the first 2 steps, warm-up, excluded).
2. Time to build a question-answer dataset per 100 chunks with the bundled teacher.
3. Answer F1 on ../shared/data/qa/xquad.en.json (`kb eval answers --limit N`) without and with an adapter
   trained on a dataset built from the xquad passages (continuation + QA).

    .venv/bin/python benchmarks/finetune.py [--steps 200] [--qa-chunks 100] [--answers-limit 200]
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

from kb.api import KnowledgeBase  # noqa: E402
from report import QA, print_sections, run_child  # noqa: E402  (benchmarks/report.py, beside this script)
from kb.dataset import build_dataset  # noqa: E402
from kb.evaluate import _open_eval_kb, eval_answers, load_eval_set  # noqa: E402

XQUAD_EN = QA / "xquad.en.json"
WARM_UP_STEPS = 2  # the first steps allocate and compile; excluded from seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--qa-chunks", type=int, default=100)
    parser.add_argument("--answers-limit", type=int, default=200)
    parser.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "kb-bench-finetune"))
    args = parser.parse_args()
    keep = Path(args.keep)
    result: dict = {}

    eval_set = load_eval_set(XQUAD_EN)
    kb, _ = _open_eval_kb(eval_set, keep / "xquad.en", None, None)
    store = kb._open_store()
    teacher = KnowledgeBase(keep / "xquad.en" / "index").generator

    data = keep / "xquad-train.jsonl"
    for f in (data, data.with_name(data.name + ".progress")):
        if f.exists():
            f.unlink()
    t = time.perf_counter()
    qa = build_dataset(store, keep / "qa-timing.jsonl", kind="qa", teacher=teacher, limit=args.qa_chunks)
    seconds = time.perf_counter() - t
    result["dataset"] = {"qa_chunks": qa["chunks"], "qa_pairs_kept": qa.get("qa", 0),
                         "seconds_per_100_chunks": round(seconds / qa["chunks"] * 100, 1),
                         "rejected": {k: v for k, v in qa.items() if k.startswith("rejected")}}
    built = build_dataset(store, data, kind="continuation")
    with data.open("a") as out:  # plus the QA pairs just built
        out.write((keep / "qa-timing.jsonl").read_text())
    result["dataset"]["train_examples"] = built.get("continuation", 0) + qa.get("qa", 0)
    kb.close()

    # Training runs as its own `kb finetune` process, so that its peak memory is its own (the teacher and the
    # embedder loaded above would otherwise count).
    home = keep / "home"
    name = f"xquad-{int(time.time())}"
    kb_bin = Path(sys.executable).with_name("kb")
    _, peak_rss_mb, proc = run_child([str(kb_bin), "finetune", str(data), "--kb", str(home), "--name", name,
                                      "--steps", str(args.steps), "--threads", "2"])
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    card = json.loads((home / "adapters" / f"{name}.json").read_text())
    timed = card["step_seconds_this_session"][WARM_UP_STEPS:]
    result["train"] = {"steps": card["steps"], "rank": card["rank"], "batch": card["batch"], "threads": 2,
                       "examples": card["examples"],
                       "seconds_per_step": round(sum(timed) / len(timed), 2) if timed else None,
                       "seconds_per_step_with_warm_up": round(card["seconds_this_session"] / card["steps"], 2),
                       "peak_rss_mb": round(peak_rss_mb),
                       "final_loss": card["final_loss"]}
    adapter = home / "adapters" / f"{name}.gguf"
    base = eval_answers(XQUAD_EN, limit=args.answers_limit, home=keep / "xquad.en")
    tuned = eval_answers(XQUAD_EN, limit=args.answers_limit, home=keep / "xquad.en", adapter=str(adapter))
    result["answers"] = {"questions": base["questions"], "f1_base": base["f1"], "f1_adapter": tuned["f1"],
                         "em_base": base["exact_match"], "em_adapter": tuned["exact_match"],
                         "citation_accuracy_base": base["citation_accuracy"],
                         "citation_accuracy_adapter": tuned["citation_accuracy"]}
    print_sections(result)


if __name__ == "__main__":
    main()
