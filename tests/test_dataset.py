"""Training data: reading every format, the check report, --fix, and building from the corpus (fake teacher)."""

import json

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
