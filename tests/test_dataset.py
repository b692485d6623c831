"""Training data: reading every format, the check report, --fix, and building from the corpus (fake teacher)."""

import json
import re

import pytest

from conftest import FakeGenerator
from kb.dataset import build_dataset, check_dataset, degenerate, fix_dataset, read_examples, rouge_l, supported
from kb.errors import KBError


def words(text):
    return len(text.split())


def test_read_examples_in_every_format(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(chat) + "\n\n" + json.dumps({"prompt": "P", "completion": "C"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([chat, chat]))
    (tmp_path / "c.csv").write_text('prompt,completion\n"What, now?",Later\n')
    (tmp_path / "d.tsv").write_text("prompt\tcompletion\nQ one\tA one\n")
    assert len(read_examples(tmp_path / "a.jsonl").examples) == 2
    assert len(read_examples(tmp_path / "b.json").examples) == 2
    c = read_examples(tmp_path / "c.csv")
    assert c.examples == [[{"role": "user", "content": "What, now?"}, {"role": "assistant", "content": "Later"}]]
    assert read_examples(tmp_path / "d.tsv").raw_format == "prompt/completion"
    with pytest.raises(KBError, match="not found"):
        read_examples(tmp_path / "missing.jsonl")


def test_check_reports_problems_duplicates_length_and_endings_and_fix_cleans(tmp_path):
    rows = [
        {"prompt": "Q1 ->", "completion": " A1\n"},
        {"prompt": "Q1 ->", "completion": " A1\n"},
        {"prompt": "Q2?", "completion": "A2"},
        {"prompt": "", "completion": "orphan"},
        {"prompt": "long " * 50, "completion": "x"},
        {"text": "no known fields"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    report = check_dataset(path, words, n_ctx=40)
    assert report["examples"] == 4 and report["duplicates"] == 1 and report["too_long"] == 1
    assert any("empty or missing prompt" in p for p in report["problems"])
    assert any("neither" in p for p in report["problems"]) and any("not valid JSON" in p for p in report["problems"])
    assert any("prompts end in different ways" in n for n in report["notes"])
    assert any("completions end in different ways" in n for n in report["notes"])
    assert report["tokens"] > 0
    fixed = fix_dataset(path, tmp_path / "clean.jsonl", words, n_ctx=40)
    lines = [json.loads(l) for l in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert fixed["kept"] == len(lines) == 2
    assert lines[0]["messages"][1]["content"] == "A1"  # whitespace trimmed


def test_filters():
    assert rouge_l("What is the capital of France?", "What is the capital of France?") == 1.0
    assert rouge_l("What is the capital of France?", "How do bees make honey?") < 0.3
    assert supported("Feed it once a day.", "Feed the starter once a day on the counter.")
    assert not supported("It needs ten litres of milk.", "Feed the starter once a day on the counter.")
    assert degenerate("the the the the the the the the the") and degenerate("ok") and not degenerate("A normal answer here.")


class Teacher(FakeGenerator):
    """Writes a question about, and an answer from, the passage it is shown."""

    def stream(self, prompt, *, max_tokens, temperature, seed):
        self.prompts.append(prompt)
        if "Write one question" in prompt:
            passage = prompt.split("\n\n")[1]
            first_word = passage.split()[0]
            yield f"What does the passage say about {first_word}?"
        else:
            passage = prompt.split("Passage:\n", 1)[1].split("\n\nAnswer the question", 1)[0]
            yield passage.split(".")[0] + "."


def test_build_from_the_corpus_is_resumable(make_kb, corpus, tmp_path):
    kb = make_kb()
    kb.ingest([corpus])
    store = kb._open_store()
    out = tmp_path / "train.jsonl"
    calls = []

    def stop_after_two(n, total, stats):
        calls.append(n)
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dataset(store, out, kind="both", teacher=Teacher(), progress=stop_after_two)
    assert (tmp_path / "train.jsonl.progress").exists()
    result = build_dataset(store, out, kind="both", teacher=Teacher())
    examples = [json.loads(l)["messages"] for l in out.read_text().splitlines()]
    n_chunks = store.counts()[1]
    assert result["chunks"] == n_chunks and not (tmp_path / "train.jsonl.progress").exists()
    continuations = [e for e in examples if e[0]["content"].startswith("Write ")]
    qa = [e for e in examples if not e[0]["content"].startswith("Write ")]
    assert len(continuations) == n_chunks  # each chunk once, although the build was stopped halfway
    assert qa and all(e[0]["content"].endswith("?") for e in qa)
    assert len({e[0]["content"] for e in qa}) == len(qa)  # near-duplicate questions were dropped


def test_cli_dataset_check_and_adapters(tmp_path):
    from click.testing import CliRunner

    from kb.cli import cli

    path = tmp_path / "d.jsonl"
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    path.write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["dataset", "check", str(path), "--json", "--fix", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["examples"] == 2 and report["duplicates"] == 1 and report["fixed"]["kept"] == 1
    home = tmp_path / "home"
    assert "No adapters yet" in runner.invoke(cli, ["adapters", "--kb", str(home)]).output
    missing = runner.invoke(cli, ["adapters", "rm", "nope", "--kb", str(home)])
    assert missing.exit_code == 1 and "no adapter named 'nope'" in missing.output
    (home / "adapters").mkdir(parents=True)
    (home / "adapters" / "style.gguf").write_bytes(b"GGUF")
    (home / "adapters" / "style.json").write_text(json.dumps({"base_model_name": "base.gguf", "steps": 3, "rank": 8}))
    listed = json.loads(runner.invoke(cli, ["adapters", "--kb", str(home), "--json"]).output)
    assert listed[0]["name"] == "style" and listed[0]["finished"]
    assert runner.invoke(cli, ["adapters", "rm", "style", "--kb", str(home)]).exit_code == 0
    assert not (home / "adapters" / "style.gguf").exists()
    unknown = runner.invoke(cli, ["ask", "anything?", "--kb", str(home), "--adapter", "ghost"])
    assert unknown.exit_code == 1 and "ghost" in unknown.output and "Traceback" not in unknown.output


# --- retrieval-aware (RAG) examples -----------------------------------------------------------------


def _rag_corpus(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "starter.md").write_text(
        "# Sourdough starter\n\nA starter on the counter is fed twice a day. In the fridge it needs food once a "
        "week. Discard half before each feeding.\n", encoding="utf-8")
    (root / "bread.md").write_text(
        "# Baking bread\n\nBake the loaf at 250 degrees for twenty minutes with steam. Then lower the oven to "
        "220 degrees.\n", encoding="utf-8")
    (root / "coffee.md").write_text(
        "# Coffee\n\nGrind the beans just before brewing. A pour-over takes about three minutes.\n", encoding="utf-8")
    (root / "tea.md").write_text(
        "# Tea\n\nGreen tea steeps at 80 degrees for two minutes. Black tea takes boiling water.\n", encoding="utf-8")
    (root / "car.md").write_text(  # distractors: they share words with the questions, not the answers
        "# The car\n\nThe starter motor is fed by the battery. Bread and tea were on the counter; the oven was off.\n",
        encoding="utf-8")
    (root / "shop.md").write_text(
        "# Shop\n\nThe shop sells green tea, starter cultures and a bread oven at a fair temperature.\n", encoding="utf-8")
    return root


def _questions(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\nnot json\n", encoding="utf-8")
    return path


def test_rag_examples_use_the_answer_prompt_cite_the_passage_and_count_what_was_dropped(make_kb, tmp_path):
    from kb.dataset import build_rag_dataset, prompt_template_hash, read_questions

    kb = make_kb()
    kb.ingest([_rag_corpus(tmp_path / "docs")])
    qfile = _questions(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "How often is a starter on the counter fed?", "answer": "twice a day", "source": "starter"},
        {"id": "q2", "question": "How long does green tea steep?", "answers": ["two minutes"]},
        {"id": "q3", "question": "What temperature is bread baked at?", "answer": "250 degrees", "source": "bread.md"},
        {"id": "q4", "question": "Who wrote this?"},  # no answer
        {"id": "q5", "question": "What colour is the sky?", "answer": "blue"},  # the answer is in no document
        {"id": "q6", "question": "", "answer": "x"},
    ])
    questions = read_questions(qfile)
    out = tmp_path / "rag.jsonl"
    result = build_rag_dataset(kb, out, questions=questions, leave_out_share=0.0)
    assert result["questions"] == 7 and result["rag"] == 3
    assert result["dropped_no_answer"] == 1 and result["dropped_answer_not_found"] == 1
    assert result["dropped_bad_question"] == 2  # the empty question and the line that is not JSON
    examples = [json.loads(line)["messages"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(examples) == 3
    for messages, (question, quote) in zip(examples, [
            ("How often is a starter on the counter fed?", "a starter on the counter is fed twice a day."),
            ("How long does green tea steep?", "Green tea steeps at 80 degrees for two minutes."),
            ("What temperature is bread baked at?", "Bake the loaf at 250 degrees for twenty minutes with steam.")]):
        roles = [m["role"] for m in messages]
        assert roles[-1] == "assistant" and "user" in roles
        prompt = "\n".join(m["content"] for m in messages[:-1])
        assert question in prompt
        cited = re.match(r"According to \[(\d+)\], (.+)$", messages[-1]["content"], re.S)
        assert cited, messages[-1]["content"]
        assert cited.group(2) == quote  # the target quotes the sentence that answers
        n = int(cited.group(1))
        documents = prompt.split("Documents:", 1)[1]
        passage = re.search(rf"^\[{n}\][^\n]*\n(.+?)(?:\n\[\d+\]|\Z)", documents, re.S | re.M)
        assert passage and quote[1:] in passage.group(1)  # ... and cites the passage that holds it
        assert len(re.findall(r"^\[\d+\]", documents, re.M)) >= 2  # among distractors
    meta = json.loads((tmp_path / "rag.jsonl.meta.json").read_text())
    assert meta == {"kind": "rag", "prompt_template_sha256": prompt_template_hash(kb.config_home), "examples": 3,
                    "n_ctx": kb.generator.n_ctx}  # `kb finetune` trains on examples that long


def test_rag_left_out_examples_target_the_refusal_and_a_tiny_corpus_is_reported(make_kb, tmp_path):
    from kb.dataset import REFUSAL_TARGET, build_rag_dataset

    kb = make_kb()
    kb.ingest([_rag_corpus(tmp_path / "docs")])
    q = [{"id": "q1", "question": "How long does green tea steep?", "answers": ["two minutes"], "source": None}]
    out = tmp_path / "rag.jsonl"
    result = build_rag_dataset(kb, out, questions=q, leave_out_share=1.0)
    assert result["rag"] == result["rag_refusal"] == 1
    messages = json.loads(out.read_text())["messages"]
    assert messages[-1]["content"].endswith(REFUSAL_TARGET["en"])
    assert "two minutes" not in "\n".join(m["content"] for m in messages)  # the answering passage is left out

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "only.md").write_text("Green tea steeps at 80 degrees for two minutes.\n")
    small = make_kb(path=tmp_path / "small-home")
    small.ingest([lonely])
    result = build_rag_dataset(small, tmp_path / "small.jsonl", questions=q, leave_out_share=0.0)
    assert result["rag"] == 0 and result["dropped_no_distractors"] == 1


def test_rag_from_a_teacher_that_returns_garbage_is_counted_not_a_crash(make_kb, tmp_path):
    from kb.dataset import build_rag_dataset

    kb = make_kb(generator=FakeGenerator(reply="the the the the the the the the"))
    kb.ingest([_rag_corpus(tmp_path / "docs")])
    result = build_rag_dataset(kb, tmp_path / "rag.jsonl", teacher=kb.generator)
    assert result.get("rag", 0) == 0 and result["questions"] == 0
    rejected = {k: v for k, v in result.items() if k.startswith(("rejected", "dropped"))}
    assert sum(rejected.values()) == kb._open_store().counts()[1]  # one per chunk, each with its reason
    assert rejected.get("rejected_degenerate")


def test_splits_are_deterministic_and_shared_by_build_and_eval(tmp_path):
    from kb.dataset import read_questions, split_of

    parts = [split_of(f"q{i}") for i in range(400)]
    assert parts == [split_of(f"q{i}") for i in range(400)]
    assert 0.18 < parts.count("test") / 400 < 0.32
    squad = {"data": [{"title": "T", "paragraphs": [
        {"context": "Alpha is first. Beta is second.", "qas": [
            {"id": "a1", "question": "What is first?", "answers": [{"text": "Alpha", "answer_start": 0}]},
            {"id": "a2", "question": "What is second?", "answers": [{"text": "Beta", "answer_start": 16}]}]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    rows = read_questions(path)
    assert [r["id"] for r in rows] == ["a1", "a2"] and rows[0]["answers"] == ["Alpha"]
    assert rows[0]["document"] == rows[1]["document"]  # one passage: a split by document keeps them together


def test_rag_adapter_card_and_the_warning_when_the_prompt_changed(tmp_path, caplog):
    import logging

    from kb.adapters import warn_if_prompt_changed
    from kb.dataset import prompt_template_hash

    home = tmp_path / "home"
    (home / "adapters").mkdir(parents=True)
    (home / "adapters" / "ok.json").write_text(json.dumps({"kind": "rag", "prompt_template_sha256": prompt_template_hash(home)}))
    (home / "adapters" / "old.json").write_text(json.dumps({"kind": "rag", "prompt_template_sha256": "0" * 64}))
    (home / "adapters" / "plain.json").write_text(json.dumps({"kind": "general"}))
    with caplog.at_level(logging.WARNING, logger="kb"):
        for name in ("ok", "plain", "old", "old"):
            warn_if_prompt_changed(home, name)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "old" in warnings[0] and "train it again" in warnings[0]


def test_cli_dataset_build_rag_from_a_question_file(tmp_path, monkeypatch, fake_embedder):
    from click.testing import CliRunner

    import kb.api
    from kb.cli import cli

    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    home = tmp_path / "home"
    runner = CliRunner()
    assert runner.invoke(cli, ["ingest", str(_rag_corpus(tmp_path / "docs")), "--kb", str(home)]).exit_code == 0
    rows = [{"id": f"q{i}", "question": "How long does green tea steep?", "answer": "two minutes"} for i in range(40)]
    qfile = _questions(tmp_path / "q.jsonl", rows)
    out = tmp_path / "rag.jsonl"
    result = runner.invoke(cli, ["dataset", "build", "--kind", "rag", "--questions", str(qfile), "--out", str(out),
                                 "--split", "test", "--leave-out", "0", "--kb", str(home)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    from kb.dataset import split_of

    test_ids = [i for i in [f"q{n}" for n in range(40)] + ["line41"] if split_of(i) == "test"]  # line 41: not JSON
    assert summary["questions"] == len(test_ids)  # the test part only
    assert summary["rag"] == len(out.read_text().splitlines()) == sum(i != "line41" for i in test_ids)
    empty = runner.invoke(cli, ["dataset", "build", "--kind", "qa", "--questions", str(qfile), "--kb", str(home)])
    assert empty.exit_code == 2 and "--kind rag" in empty.output
