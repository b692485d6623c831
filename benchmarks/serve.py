"""kb serve under load, with the bundled models; prints a table and one JSON object.

1. One client, one question at a time: generation tokens/s through the server (the `kb.timings` of each
   answer) against `kb ask` in process on the same questions and settings.
2. `--clients` concurrent streaming clients (the OpenAI API, `stream: true`) for `--seconds`: every request
   must be answered or told 429 (then the client waits Retry-After); p50/p95 of the answered ones: time to
   the first text (kb's own "According to [n]," prefill, sent before the model runs, so this is retrieval
   and admission), time to the model's first token (queue wait and prompt evaluation included), and total;
   the server's RSS sampled every second, after a warm-up.

    .venv/bin/python benchmarks/serve.py [--clients 16] [--seconds 120] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import free_port, percentile, print_sections  # noqa: E402  (benchmarks/report.py)

QUESTIONS = [
    "How often should I feed a sourdough starter on the counter?",
    "What does hooch on a sourdough starter mean?",
    "When should I replace a bike chain?",
    "How much oil should I put on a bike chain?",
    "Which wifi network does the printer use?",
    "How hot should the water be for green tea?",
]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_client(url: str, max_tokens: int, rounds: int) -> list[float]:
    rates = []
    for i in range(rounds):
        for q in QUESTIONS:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                "model": "kb", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": q}]})
            timings = r.json()["kb"]["timings"]
            if timings.get("tokens_per_s"):
                rates.append(timings["tokens_per_s"])
    return rates


def in_process(home: Path, max_tokens: int, rounds: int) -> list[float]:
    from kb.api import KnowledgeBase

    rates = []
    with KnowledgeBase(home, max_tokens=max_tokens, temperature=0) as kb:
        for i in range(rounds):
            for q in QUESTIONS:
                answer = kb.ask(q, log=False)
                if answer.timings.get("tokens_per_s"):
                    rates.append(answer.timings["tokens_per_s"])
    return rates


def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        n = index
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < stop:
                q = QUESTIONS[n % len(QUESTIONS)]
                n += 1
                started = time.perf_counter()
                first = first_model = None
                texts = 0
                record = {"status": None}
                try:
                    with http.stream("POST", f"{url}/v1/chat/completions", json={
                            "model": "kb", "stream": True, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": q}]}) as r:
                        record["status"] = r.status_code
                        if r.status_code == 429:
                            r.read()
                            record["retry_after"] = float(r.headers.get("retry-after", "1"))
                        else:
                            for line in r.iter_lines():
                                if not line.startswith("data: {"):
                                    continue
                                chunk = json.loads(line[len("data: "):])
                                if "error" in chunk:
                                    record["status"] = "stream error"
                                # the first chunk carries the role and an empty content: not a token. The first
                                # text is kb's own prefill ("According to [n],", written before the model runs);
                                # the next is the model's first token.
                                content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                                if content:
                                    texts += 1
                                    if texts == 1:
                                        first = time.perf_counter()
                                    elif texts == 2:
                                        first_model = time.perf_counter()
                except httpx.HTTPError as e:
                    record["status"] = f"{type(e).__name__}"
                record["total_s"] = time.perf_counter() - started
                record["ttft_s"] = (first - started) if first else None
                record["first_model_token_s"] = (first_model - started) if first_model else None
                with lock:
                    results.append(record)
                if record["status"] == 429:
                    time.sleep(min(record["retry_after"], max(stop - time.monotonic(), 0)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answered = [r for r in results if r["status"] == 200]
    out = {"requests": len(results), "answered": len(answered),
           "told_429": sum(1 for r in results if r["status"] == 429),
           "failed": sum(1 for r in results if r["status"] not in (200, 429))}
    for timing in ("ttft_s", "first_model_token_s", "total_s"):
        values = [r[timing] for r in answered if r[timing]]
        out[f"{timing}_p50"], out[f"{timing}_p95"] = percentile(values, 0.5, 3), percentile(values, 0.95, 3)
    out["answers_per_min"] = round(len(answered) / seconds * 60, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="single-client passes over the questions")
    parser.add_argument("--queue", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kb-bench-serve-"))
    home = work / "home"
    subprocess.run([sys.executable, "-m", "kb", "ingest", str(ROOT / "examples"), "--kb", str(home), "-q"], check=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "kb", "serve", "--kb", str(home), "--port", str(port),
                               "--queue", str(args.queue), "--max-tokens", str(args.max_tokens)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        result: dict = {"setup": {"clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
                                  "queue": args.queue, "cpu_count": os.cpu_count()}}
        served = one_client(url, args.max_tokens, args.rounds)
        local = in_process(home, args.max_tokens, args.rounds)
        result["one_client"] = {
            "server_tokens_per_s_p50": round(statistics.median(served), 1),
            "in_process_tokens_per_s_p50": round(statistics.median(local), 1),
            "ratio": round(statistics.median(served) / statistics.median(local), 3)}
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.is_set():
                samples.append((time.monotonic() - started, rss_mb(server.pid)))
                time.sleep(1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        result["load"] = load(url, args.clients, args.seconds, args.max_tokens)
        done.set()
        sampler.join()
        warm = [mb for t, mb in samples if t >= min(30, args.seconds / 4)]
        third = max(1, len(warm) // 3)
        result["memory"] = {"rss_mb_start": round(samples[0][1]), "rss_mb_after_warm_up": round(warm[0]) if warm else None,
                            "rss_mb_end": round(samples[-1][1]), "rss_mb_max": round(max(mb for _, mb in samples)),
                            "growth_after_warm_up_mb": round(statistics.mean(warm[-third:]) - statistics.mean(warm[:third]), 1)
                            if warm else None}
    finally:
        server.terminate()
        server.wait(20)
    print_sections(result)


if __name__ == "__main__":
    main()
