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


def tiny_bert(folder, *, pooling: str, normalize: bool, cross_encoder: bool = False):
    """A 2-layer BERT with random weights, saved as a sentence-transformers (or CrossEncoder) folder, with the
    bundled model's tokenizer files: a second model layout, made here with no download."""
    import shutil

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    bundled = bundled_embedder_path()
    config = BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=128, num_labels=1)
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bundled / name).exists():
            shutil.copy(bundled / name, folder / name)
    if cross_encoder:
        BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
        return folder
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 48, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean"}))
    return folder


@pytest.mark.parametrize("pooling, normalize", [("cls", False), ("mean", True)])
def test_numpy_query_encoder_on_a_second_model_layout(tmp_path, pooling, normalize):
    folder = tiny_bert(tmp_path / "tiny", pooling=pooling, normalize=normalize)
    assert NumpyBertEncoder.supports(folder)
    fast = SentenceTransformerEmbedder(str(folder))
    slow = SentenceTransformerEmbedder(str(folder), precision="fp32")
    for q in ["how often should I feed a sourdough starter", "番茄每天需要多少阳光", "x"]:
        a, b = fast.embed_query(q), slow.embed_batch([q])[0]
        assert abs(float(np.linalg.norm(a)) - 1) < 1e-5 and abs(float(np.linalg.norm(b)) - 1) < 1e-5
        assert float(np.abs(a - b).max()) < 1e-4, q


def test_a_real_cross_encoder_reranks(tmp_path, example_home):
    from sentence_transformers import CrossEncoder

    from kb.api import KnowledgeBase

    home, _ = example_home
    folder = tiny_bert(tmp_path / "reranker", pooling="cls", normalize=False, cross_encoder=True)
    query = "how often should I feed a sourdough starter"
    with KnowledgeBase(home) as plain:  # the pool the reranker sees: the retriever's candidates
        candidates = plain.search(query, k=50)
    with KnowledgeBase(home, reranker=str(folder)) as kb:
        reranked = kb.search(query, k=5)
    scores = CrossEncoder(str(folder), device="cpu").predict([(query, h.text) for h in candidates])
    expected = [h.chunk_id for _, h in sorted(zip(scores, candidates), key=lambda x: -x[0])][:5]
    assert [h.chunk_id for h in reranked] == expected
    assert [round(h.score, 5) for h in reranked] == sorted((round(float(s), 5) for s in scores), reverse=True)[:5]


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


def test_cli_status_reingest_and_forget(example_home, tmp_path):
    import shutil

    home, _ = example_home
    runner = CliRunner()
    status = json.loads(runner.invoke(cli, ["status", "--kb", str(home), "--json"]).output)
    assert status["documents"] == 5 and status["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    again = runner.invoke(cli, ["ingest", str(EXAMPLES), "--kb", str(home)])
    assert "unchanged 5" in again.output and "added 0" in again.output
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    forgot = runner.invoke(cli, ["forget", str(EXAMPLES / "notes" / "tea.txt"), "--kb", str(copy)])
    assert forgot.exit_code == 0 and "removed 1 document" in forgot.output
    assert json.loads(runner.invoke(cli, ["status", "--kb", str(copy), "--json"]).output)["documents"] == 4
    hits = json.loads(runner.invoke(cli, ["search", "green tea temperature", "--kb", str(copy), "--json"]).output)
    assert not any(h["path"].endswith("tea.txt") for h in hits)


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


def test_python_m_kb_and_help_import_no_heavy_library():
    import subprocess
    import sys

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


@pytest.mark.real
def test_the_bundled_model_runs_from_its_q8_0_copy(tmp_path, monkeypatch, caplog, capfd):
    """The primary path on the real file: the Q8_0 copy is written once, quietly (llama.cpp's log of it reached
    `kb dataset check --json` and the terminal), and is what llama.cpp loads; where it cannot be written, the
    original loads and a warning says so."""
    from kb.gguf import read_header
    from kb.generator import LlamaGenerator, _LOADED, bundled_model_path, runtime_model_file

    monkeypatch.setenv("KB_CACHE_DIR", str(tmp_path / "cache"))
    bundled = bundled_model_path()
    capfd.readouterr()
    copy = runtime_model_file(bundled)
    assert capfd.readouterr() == ("", "")
    assert copy.parent == tmp_path / "cache" and copy.name.endswith(".Q8_0.gguf")
    assert read_header(copy).quantization == "Q8_0"  # quantize writes general.file_type last
    assert runtime_model_file(bundled) == copy and not list(copy.parent.glob(".*.tmp"))
    _LOADED.clear()
    generator = LlamaGenerator(None)
    assert generator.llm.model_path == str(copy) and generator.model_id == bundled.name
    assert generator.count_tokens("Feed the starter once a day.") > 3
    _LOADED.clear()
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("KB_CACHE_DIR", str(tmp_path / "not-a-folder" / "cache"))
    with caplog.at_level("WARNING", logger="kb"):
        assert runtime_model_file(bundled) == bundled
    assert "loading SmolLM2-135M-Instruct.Q4_1.gguf as it is" in caplog.text
