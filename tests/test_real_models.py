"""The bundled models, for real: the numpy query encoder, and the CLI end to end on examples/."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kb.cli import cli
from kb.embedder import NumpyBertEncoder, SentenceTransformerEmbedder, bundled_embedder_path

pytestmark = pytest.mark.real
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def st_embedder():
    return SentenceTransformerEmbedder(precision="fp32")


def test_bf16_bulk_embeddings_match_float32(st_embedder):
    texts = ["Feed the starter once a day when it lives on the counter.", "番茄是喜光植物。", "word " * 300]
    bf16 = SentenceTransformerEmbedder(precision="bf16").embed_batch(texts)
    fp32 = st_embedder.embed_batch(texts)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert float((bf16 * fp32).sum(1).min()) > 0.999


def test_numpy_query_encoder_equals_sentence_transformers(st_embedder):
    queries = ["how often should I feed a sourdough starter", "番茄每天需要多少阳光", "x", "word " * 400]
    assert NumpyBertEncoder.supports(bundled_embedder_path())
    fast = SentenceTransformerEmbedder()  # a fresh one: its queries go through numpy, torch untouched
    for q in queries:
        a = fast.embed_query(q)
        b = st_embedder.embed_batch([q])[0]
        assert a.shape == b.shape == (384,)
        assert float(a @ b) > 0.9999, q


@pytest.fixture(scope="module")
def example_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    result = CliRunner().invoke(cli, ["ingest", str(EXAMPLES), "--kb", str(home)])
    assert result.exit_code == 0, result.output
    return home, result.output


def test_cli_ingest_reports(example_home):
    _, output = example_home
    assert "added 5" in output and "failed 0" in output


def test_cli_search_finds_the_right_file_in_english_and_chinese(example_home):
    home, _ = example_home
    runner = CliRunner()
    for query, expected in [
        ("how often should I feed a sourdough starter", "sourdough.md"),
        ("when do I need a new bike chain", "bike-maintenance.md"),
        ("which wifi network does the printer use", "home-network.html"),
        ("番茄每天需要多少阳光", "zh-garden.md"),
    ]:
        for mode in ("dense", "lexical", "hybrid"):
            if mode == "dense" and not query.isascii():
                continue  # the bundled embedder is English-only
            result = runner.invoke(cli, ["search", query, "--kb", str(home), "--json", "-k", "3", "--mode", mode])
            assert result.exit_code == 0, result.output
            hits = json.loads(result.output)
            assert hits[0]["path"].endswith(expected), (query, mode, [h["path"] for h in hits])


def test_cli_status_and_forget(example_home, tmp_path):
    home, _ = example_home
    runner = CliRunner()
    status = json.loads(runner.invoke(cli, ["status", "--kb", str(home), "--json"]).output)
    assert status["documents"] == 5 and status["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    again = runner.invoke(cli, ["ingest", str(EXAMPLES), "--kb", str(home)])
    assert "unchanged 5" in again.output and "added 0" in again.output


def test_cli_errors_are_one_line_with_a_hint(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["search", "anything", "--kb", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "Error:" in result.output and "kb ingest" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["ingest", str(tmp_path / "missing"), "--kb", str(tmp_path / "h")])
    assert result.exit_code == 1 and "no such file" in result.output
    result = runner.invoke(cli, ["ingest", str(EXAMPLES), "--kb", str(tmp_path / "h2"),
                                 "--embedding-model", str(tmp_path / "no-model")])
    assert result.exit_code == 1 and "not found" in result.output and "Traceback" not in result.output


def test_python_m_kb_and_fast_help():
    import subprocess
    import sys
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kb", "--help"], capture_output=True, text=True, check=True)
    assert "ingest" in out.stdout and "search" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import kb.cli, sys; print(any(m in sys.modules for m in ('torch','sentence_transformers','unstructured','llama_cpp')))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "False"


def test_search_process_does_not_import_torch(example_home):
    import subprocess
    import sys

    home, _ = example_home
    code = (
        "import sys; from kb.api import KnowledgeBase; "
        f"hits = KnowledgeBase({str(home)!r}).search('sourdough feeding', 1); "
        "print(hits[0].path.endswith('sourdough.md'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


# --- kb ask with the bundled GGUF ----------------------------------------------------------------


def test_ask_cites_the_right_file_and_refuses_what_is_not_there(example_home):
    home, _ = example_home
    runner = CliRunner()
    result = runner.invoke(cli, ["ask", "How often should I feed a sourdough starter on the counter?",
                                 "--kb", str(home), "--json", "--max-tokens", "48"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert not answer["refused"] and answer["answer"].strip()
    assert answer["sources"][0]["path"].endswith("sourdough.md")
    assert answer["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    refused = json.loads(runner.invoke(cli, ["ask", "What is the capital of Peru?", "--kb", str(home), "--json"]).output)
    assert refused["refused"] and refused["model"] == ""
    zh = json.loads(runner.invoke(cli, ["ask", "番茄每天需要多少小时的阳光？", "--kb", str(home), "--json",
                                        "--max-tokens", "32"]).output)
    assert not zh["refused"] and zh["sources"][0]["path"].endswith("zh-garden.md")


def test_ask_with_a_tiny_context_does_not_overflow(example_home):
    from kb.api import KnowledgeBase

    home, _ = example_home
    with KnowledgeBase(home, ctx=256) as kb:
        answer = kb.ask("How often should I feed a sourdough starter on the counter?", max_tokens=512, log=False)
    assert not answer.refused and answer.timings["prompt_tokens"] + answer.timings["completion_tokens"] <= 256


def test_truncated_gguf_is_a_clear_error(example_home, tmp_path):
    from kb.generator import bundled_model_path

    home, _ = example_home
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(bundled_model_path().read_bytes()[:2_000_000])
    result = CliRunner().invoke(cli, ["ask", "How often should I feed a sourdough starter?", "--kb", str(home),
                                      "--model", str(truncated)])
    assert result.exit_code == 1 and str(truncated) in result.output and "Traceback" not in result.output
