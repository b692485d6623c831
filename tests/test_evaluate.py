"""kb eval: metrics, SQuAD and BEIR loading, retrieval and answer runs (fakes), and the reranker protocol."""

import json

import pytest
from click.testing import CliRunner

from conftest import FakeGenerator
from kb.evaluate import answer_scores, eval_answers, eval_retrieval, load_beir, load_squad, retrieval_metrics

PASSAGES = [
    ("Alpha", "The alpha particle is a helium nucleus emitted in radioactive decay.", "What is an alpha particle?", "a helium nucleus"),
    ("Bread", "Sourdough bread rises because wild yeast in the starter ferments the flour.", "Why does sourdough bread rise?", "wild yeast"),
    ("Moon", "The Moon orbits the Earth once every twenty-seven days.", "How long does the Moon take to orbit the Earth?", "twenty-seven days"),
    ("Tea", "Green tea is brewed with water at about eighty degrees.", "At what temperature is green tea brewed?", "about eighty degrees"),
    ("Chain", "A bicycle chain is replaced when it has stretched by half a percent.", "When is a bicycle chain replaced?", "stretched by half a percent"),
]


@pytest.fixture
def squad_file(tmp_path):
    data = {"data": [{"title": t, "paragraphs": [{"context": c, "qas": [
        {"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": c.find(a)}]},
        {"id": f"empty{i}", "question": "  ", "answers": []}]}]} for i, (t, c, q, a) in enumerate(PASSAGES)]}
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(data))
    return path


def test_answer_scores_follow_squad_and_cmrc():
    assert answer_scores("The Eiffel Tower.", ["eiffel tower"]) == (1.0, 1.0)
    em, f1 = answer_scores("it is the tall eiffel tower", ["Eiffel Tower"])
    assert em == 0.0 and f1 == pytest.approx(2 * 2 / (5 + 2))
    assert answer_scores("北京。", ["北京"]) == (1.0, 1.0)
    em, f1 = answer_scores("位于北京市", ["北京"])
    assert em == 0.0 and f1 == pytest.approx(2 * 2 / (5 + 2))
    assert answer_scores("anything", []) == (0.0, 0.0)


def test_retrieval_metrics_on_a_known_ranking():
    ranked = [["a", "b"], ["x", "a"], ["y", "z"]]
    relevant = [{"a": 1}, {"a": 1}, {"a": 1}]
    m = retrieval_metrics(ranked, relevant, [1.0, 2.0, 3.0])
    assert m["recall@1"] == pytest.approx(1 / 3, abs=1e-4) and m["recall@5"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4) and m["latency_ms_p50"] == 2.0


def test_loaders(squad_file, tmp_path):
    s = load_squad(squad_file)
    assert len(s.passages) == 5 and len(s.questions) == 5  # empty questions are skipped
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "title": t, "text": c})
                                                 for i, (t, c, _, _) in enumerate(PASSAGES)))
    (beir / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": q})
                                                  for i, (_, _, q, _) in enumerate(PASSAGES)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5)))
    b = load_beir(beir)
    assert len(b.passages) == 5 and b.questions[2]["relevant"] == {"d2": 1}
    assert b.passages["d0"].startswith("Alpha\n\n")


def test_eval_retrieval_and_answers_with_fakes(squad_file, tmp_path, fake_embedder):
    results = eval_retrieval(squad_file, modes=("lexical", "hybrid"), home=tmp_path / "r", embedder=fake_embedder)
    for r in results:
        assert {"documents", "queries", "mode", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10",
                "latency_ms_p50", "latency_ms_p95"} <= set(r)
        assert r["documents"] == 5 and r["queries"] == 5 and r["recall@5"] == 1.0
    answers = eval_answers(squad_file, home=tmp_path / "a", embedder=fake_embedder,
                           generator=FakeGenerator())  # it quotes the first passage
    assert {"questions", "exact_match", "f1", "citation_accuracy", "refused_unanswerable", "answer_contains_gold",
            "evidence_top1", "evidence_top3", "language"} <= set(answers)
    assert answers["questions"] + answers["unanswerable_questions"] == 5
    assert 0 < answers["citation_accuracy"] <= 1 and 0 < answers["f1"] <= 1


def test_cli_eval_retrieval_json(squad_file, monkeypatch, fake_embedder):
    import kb.api
    from kb.cli import cli

    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    result = CliRunner().invoke(cli, ["eval", "retrieval", str(squad_file), "--json", "--mode", "lexical"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "lexical" and data["queries"] == 5


class KeywordReranker:
    """Puts passages that mention a keyword first: a deterministic stand-in for a CrossEncoder."""

    def __init__(self, keyword):
        self.keyword = keyword
        self.calls = 0

    def rerank(self, query, hits):
        self.calls += 1
        for h in hits:
            h.score = 1.0 if self.keyword in h.text.lower() else 0.0
        return sorted(hits, key=lambda h: h.score, reverse=True)


def test_reranker_protocol_reorders_results(make_kb, corpus, home, fake_embedder):
    from kb.api import KnowledgeBase

    make_kb().ingest([corpus])
    plain = KnowledgeBase(home, embedder=fake_embedder)
    first = plain.search("alpha greek letters", k=3)[0]
    assert first.path.endswith("alpha.md")
    reranker = KeywordReranker("photons")
    reranked = KnowledgeBase(home, embedder=fake_embedder, reranker=reranker).search("alpha greek letters", k=3)
    assert reranker.calls == 1 and reranked[0].path.endswith("gamma.md")
    plain.close()


def test_eval_answers_on_a_split_scores_only_that_part(squad_file, tmp_path, fake_embedder):
    from kb.dataset import split_of

    questions = load_squad(squad_file).questions
    for by, key in (("question", lambda q: q["id"]), ("document", lambda q: next(iter(q["relevant"])))):
        parts = {"train": 0, "test": 0}
        for q in questions:
            parts[split_of(key(q))] += 1
        for part, expected in parts.items():
            result = eval_answers(squad_file, home=tmp_path / f"{by}-{part}", embedder=fake_embedder,
                                  generator=FakeGenerator(), split=part, split_by=by)
            assert result["questions"] + result["unanswerable_questions"] == expected
            assert result["split"] == f"{part} by {by}"
