"""Benchmark `kb ask` on the bundled models; prints a table and one JSON object.

1. kb's generation overhead: the same packed prompt generated through kb (AnswerStream: streaming and
   citation filtering) and through raw llama-cpp-python (create_completion, stream=True), KV cache reset
   before each run, greedy decoding so both produce the same tokens. Time to first token and tokens/s.
2. Cold-process `kb ask` wall time (a fresh `kb` process per run: imports, model loads, retrieval, answer).
3. Answer quality on ../shared/data/qa/xquad.en.json (kb.evaluate.eval_answers): exact match, F1,
   citation accuracy, and the refusal rate on questions whose passage was held out of the index.

    .venv/bin/python benchmarks/ask.py [--runs 5] [--answers-limit 100] [--skip-answers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kb.api import KnowledgeBase  # noqa: E402
from report import QA, print_sections  # noqa: E402  (benchmarks/report.py, beside this script)
from kb.generator import REPEAT_PENALTY  # noqa: E402

QUESTIONS = [
    "How often should I feed a sourdough starter on the counter?",
    "What does hooch on a sourdough starter mean?",
    "When should I replace a bike chain?",
    "How much oil should I put on a bike chain?",
    "Which wifi network does the printer use?",
]
XQUAD_EN = QA / "xquad.en.json"


class Recording:
    """Wraps a generator to keep the last prompt and max_tokens kb sent."""

    def __init__(self, inner):
        self.inner = inner
        self.prompt = ""
        self.max_tokens = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, prompt, *, max_tokens, temperature, seed):
        self.prompt, self.max_tokens = prompt, max_tokens
        return self.inner.stream(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)


def overhead(home: Path, runs: int, max_tokens: int) -> dict:
    kb = KnowledgeBase(home, temperature=0.0, max_tokens=max_tokens)
    recording = Recording(kb.generator)
    kb._generator = recording
    llm = recording.inner.llm
    kb_ttft, kb_tps, kb_gen, raw_ttft, raw_tps, raw_gen, kb_total = [], [], [], [], [], [], []
    counts = []
    for run in range(runs):
        for q in QUESTIONS:
            stream = kb.ask_stream(q, log=False)  # retrieval and packing; generation starts on iteration
            if stream.refused:
                continue
            tokens = recording.inner._tokens(recording.prompt)
            for order in ("kb", "raw") if run % 2 == 0 else ("raw", "kb"):
                llm.reset()
                if order == "kb":
                    if stream.answer is not None:  # second pass of the kb side: a fresh stream
                        stream = kb.ask_stream(q, log=False)
                        llm.reset()
                    t = time.perf_counter()
                    for _piece in stream:
                        pass
                    end = time.perf_counter()
                    # the first token the model generated, not kb's own prefill ("According to ")
                    kb_ttft.append(stream.answer.timings["generation_first_token_ms"])
                    kb_gen.append(end - t)
                    kb_tps.append(stream.answer.timings["tokens_per_s"])
                    kb_total.append(stream.answer.timings["total_ms"])
                    kb_count = stream.answer.timings["completion_tokens"]
                else:
                    t = time.perf_counter()
                    first = None
                    count = 0
                    for part in llm.create_completion(tokens, max_tokens=recording.max_tokens, temperature=0.0,
                                                      seed=0, stream=True, repeat_penalty=REPEAT_PENALTY):
                        if part["choices"][0]["text"]:  # as kb counts: pieces that carry text
                            count += 1
                            first = first or time.perf_counter()
                    end = time.perf_counter()
                    raw_ttft.append((first - t) * 1000)
                    raw_gen.append(end - t)
                    raw_tps.append((count - 1) / (end - first) if count > 1 else 0.0)
            counts.append((kb_count, count))
    kb.close()
    med = statistics.median
    return {
        "answers_timed": len(kb_gen),
        "same_token_counts": sum(a == b for a, b in counts) / len(counts),
        "kb_first_token_ms_p50": round(med(kb_ttft), 1),
        "raw_first_token_ms_p50": round(med(raw_ttft), 1),
        "kb_tokens_per_s_p50": round(med(kb_tps), 1),
        "raw_tokens_per_s_p50": round(med(raw_tps), 1),
        "kb_generation_s_total": round(sum(kb_gen), 3),
        "raw_generation_s_total": round(sum(raw_gen), 3),
        "generation_overhead": round(sum(kb_gen) / sum(raw_gen) - 1, 4),
        "kb_ask_in_process_ms_p50": round(med(kb_total), 1),
    }


def cold_ask(home: Path, runs: int) -> dict:
    kb_bin = Path(sys.executable).with_name("kb")
    walls = []
    for i in range(runs):
        q = QUESTIONS[i % len(QUESTIONS)]
        t = time.perf_counter()
        out = subprocess.run([str(kb_bin), "ask", q, "--kb", str(home), "--json"], capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        last = json.loads(out.stdout)
    return {"cold_ask_s_p50": round(statistics.median(walls), 2), "cold_ask_s_max": round(max(walls), 2),
            "cold_ask_completion_tokens_last": last["timings"].get("completion_tokens"),
            "cold_ask_runs": runs}


def answers(limit: int, keep: Path) -> dict:
    from kb.evaluate import eval_answers

    return eval_answers(XQUAD_EN, limit=limit, home=keep)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--answers-limit", type=int, default=100)
    parser.add_argument("--skip-answers", action="store_true")
    parser.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "kb-bench-ask"))
    args = parser.parse_args()
    keep = Path(args.keep)
    home = keep / "examples"
    KnowledgeBase(home).ingest([ROOT / "examples"])
    result = {"overhead": overhead(home, args.runs, args.max_tokens), "cold": cold_ask(home, 2 * args.runs)}
    if not args.skip_answers:
        t = time.perf_counter()
        result["xquad_en"] = answers(args.answers_limit, keep / "xquad.en")
        result["xquad_en"]["seconds"] = round(time.perf_counter() - t, 1)
    print_sections(result)


if __name__ == "__main__":
    main()
