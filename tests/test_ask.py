"""kb ask and chat with a fake generator: refusal, packing, citations, templates, personas, log, chat."""

import json

import pytest
from click.testing import CliRunner

from conftest import FakeGenerator
from kb.answer import CitationFilter, tidy
from kb.errors import BadQuestion, NotIngested, TemplateError

QUESTION = "What is the first letter of the Greek alphabet?"


@pytest.fixture
def ingested(make_kb, corpus):
    def make(generator=None, **options):
        kb = make_kb(generator=generator or FakeGenerator(), **options)
        kb.ingest([corpus])
        return kb
    return make


def test_answer_cites_the_right_file_and_drops_invented_citations(ingested):
    kb = ingested(check_support=False)
    answer = kb.ask(QUESTION)
    assert not answer.refused
    assert answer.sources[0].path.endswith("alpha.md")
    assert "[1]" in answer.text and "[7]" not in answer.text
    assert answer.sources[0].cited and not any(s.cited for s in answer.sources[1:])
    assert answer.timings["citations_removed"] == [7]
    assert answer.text.endswith("and also.")  # the space left by the removed citation is tidied


def test_refusal_does_not_call_the_model_and_shows_closest_passages(ingested):
    generator = FakeGenerator()
    kb = ingested(generator)
    answer = kb.ask("How do volcanoes erupt under the ocean?")
    assert answer.refused and "do not contain" in answer.text
    assert generator.prompts == []
    assert answer.sources and answer.answerability < 0.5
    # min_score 0 never refuses
    assert not kb.ask("How do volcanoes erupt under the ocean?", min_score=0).refused


def test_bad_questions_and_no_ingest(ingested, make_kb, tmp_path):
    kb = ingested()
    for q in ("", "   \n "):
        with pytest.raises(BadQuestion):
            kb.ask(q)
    with pytest.raises(NotIngested):
        make_kb(path=tmp_path / "empty", generator=FakeGenerator()).ask(QUESTION)


def test_tiny_context_never_overflows(make_kb, tmp_path):
    docs = tmp_path / "long"
    docs.mkdir()
    for i in range(6):
        (docs / f"greek{i}.md").write_text(
            f"# Greek letters {i}\n\n" + f"The Greek alphabet {i} has letters alpha beta gamma delta. " * 25,
            encoding="utf-8")  # texts differ: kb gives one place to a passage repeated word for word
    for n_ctx in (128, 256, 512):
        generator = FakeGenerator(n_ctx=n_ctx)
        kb = make_kb(path=tmp_path / f"h{n_ctx}", generator=generator)
        kb.ingest([docs])
        answer = kb.ask("Which letters are in the Greek alphabet?", max_tokens=400)
        assert not answer.refused and answer.sources, n_ctx
        prompt_tokens = generator.count_tokens(generator.prompts[-1])
        assert prompt_tokens + generator.max_tokens[-1] <= n_ctx
        assert answer.timings["passages"] >= 1
        if n_ctx < 512:
            assert answer.timings["passages_dropped"] > 0


def test_question_too_long_for_the_context_is_a_clear_error(ingested):
    kb = ingested(FakeGenerator(n_ctx=64))
    with pytest.raises(BadQuestion, match="context window"):
        kb.ask(QUESTION + " alphabet" * 100)


def test_citation_filter_on_streamed_pieces():
    f = CitationFilter({1, 2})
    pieces = ["Alpha ", "[", "1", "] and [", "9", "] or [2", ", 5]", " and [x] [3"]
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert out == "Alpha [1] and  or [2] and [x] [3"
    assert f.cited == {1, 2} and f.removed == {9, 5}
    assert tidy("as shown [9].".replace("[9]", "")) == "as shown."


def test_templates_override_and_missing_variable(ingested, home):
    generator = FakeGenerator()
    kb = ingested(generator)
    (home / "prompts").mkdir()
    (home / "prompts" / "answer.txt").write_text("CUSTOM {passages}\nQ: {question}", encoding="utf-8")
    kb.ask(QUESTION)
    assert "CUSTOM" in generator.prompts[-1]
    (home / "prompts" / "answer.txt").write_text("{passages} {question} {colour}", encoding="utf-8")
    with pytest.raises(TemplateError, match="colour"):
        kb.ask(QUESTION)


def test_personas_bundled_home_and_unknown(ingested, home):
    from kb.prompting import personas

    generator = FakeGenerator()
    kb = ingested(generator)
    assert {"default", "teacher", "editor"} <= set(personas(home))
    (home / "personas").mkdir()
    (home / "personas" / "pirate.txt").write_text("Talk like a pirate.", encoding="utf-8")
    kb.ask(QUESTION, persona="pirate")
    assert "Talk like a pirate." in generator.prompts[-1]
    with pytest.raises(TemplateError, match="nobody") as error:
        kb.ask(QUESTION, persona="nobody")
    assert "kb personas" in error.value.hint


def test_every_ask_is_logged_and_an_interrupted_one_is_not(ingested):
    kb = ingested()
    kb.ask(QUESTION)
    kb.ask("How do volcanoes erupt under the ocean?")
    log = kb.log()
    assert [e["refused"] for e in log] == [True, False]
    assert log[1]["sources"][0]["path"].endswith("alpha.md") and log[1]["model"] == "fake-generator"
    stream = kb.ask_stream(QUESTION)
    next(iter(stream))
    stream_iter = iter(stream)
    del stream_iter
    assert stream.answer is None and len(kb.log()) == 2


def test_chinese_question_over_chinese_documents(make_kb, tmp_path):
    docs = tmp_path / "zh"
    docs.mkdir()
    (docs / "tomato.md").write_text("# 阳台种番茄\n\n番茄是喜光植物，每天至少需要六到八个小时的直射阳光。\n", encoding="utf-8")
    (docs / "tea.md").write_text("# 泡茶\n\n绿茶适合用八十度左右的水冲泡，时间不宜太长。\n", encoding="utf-8")
    kb = make_kb(generator=FakeGenerator())
    kb.ingest([docs])
    answer = kb.ask("番茄每天需要多少小时的阳光？")
    assert not answer.refused and answer.sources[0].path.endswith("tomato.md")
    refused = kb.ask("火山是怎样喷发的？")
    assert refused.refused and refused.text == "文档中没有这个问题的答案。"


def test_chat_condenses_follow_ups_summarizes_and_resumes(ingested):
    generator = FakeGenerator(n_ctx=400)
    kb = ingested(generator)
    chat = kb.chat(persona="teacher")
    first = chat.ask(QUESTION)
    assert not first.refused and chat.sources[0].path.endswith("alpha.md")
    second = chat.ask("And in statistics?")
    assert second.standalone_question.startswith("STANDALONE")
    for _ in range(4):
        chat.ask("What does alpha denote in statistics?")
    assert chat.conversation.summary == "SUMMARY of earlier turns"
    # older turns were folded into the summary: the one kept verbatim plus the newest remain
    assert len(chat.conversation.messages) == 4
    resumed = kb.chat(resume=True)
    assert resumed.id == chat.id and resumed.persona == "teacher"
    assert resumed.conversation.summary == "SUMMARY of earlier turns"
    resumed.reset()
    assert resumed.id != chat.id and resumed.conversation.messages == []
    assert all(e["conversation_id"] == chat.id for e in kb.log(6))


def test_follow_ups_are_rewritten_only_by_a_model_that_writes_their_language(ingested, monkeypatch):
    """An English-only model "rewrote" the Chinese follow-up 日期格式呢？ into "4. 10. 日期格式：": kb keeps the
    user's words (with the previous question) where the model does not write the language, in extractive
    mode, and when the rewrite answers instead (a list item, a citation), switches language or drops the
    follow-up's words."""
    import dataclasses

    import kb.chat as chat_module
    from kb.chat import Turn, standalone_question

    generator = FakeGenerator()
    kb = ingested(generator)
    kb.settings = dataclasses.replace(kb.settings, model_languages="en")
    zh = [Turn("user", "线程池为什么不允许使用Executors创建？"), Turn("assistant", "通过 ThreadPoolExecutor [1]")]
    assert standalone_question(kb, zh, "日期格式呢？") == "线程池为什么不允许使用Executors创建？ 日期格式呢？"
    assert generator.prompts == []  # the model was not asked
    en = [Turn("user", QUESTION), Turn("assistant", "Alpha is the first letter [1].")]
    assert standalone_question(kb, en, "And in statistics?") == "STANDALONE And in statistics?"
    asked = len(generator.prompts)
    # extractive: no model; the follow-up alone, as the corpus answers it on its own (alpha in statistics)
    assert standalone_question(kb, en, "And in statistics?", extractive=True) == "And in statistics?"
    assert standalone_question(kb, en, "And how is it pronounced?", extractive=True) \
        == f"{QUESTION} And how is it pronounced?"  # needs the previous question to mean anything
    assert len(generator.prompts) == asked
    # a rewrite that answers, switches language or drops what the follow-up asks about ("statistics") is not
    # used: the user's words, chosen as without a model
    for reply in ("1. Alpha is a significance level [2]", "阿尔法是什么？", "The answer to this question is:",
                  QUESTION):
        monkeypatch.setattr(chat_module, "complete", lambda *a, reply=reply, **k: reply)
        assert standalone_question(kb, en, "And in statistics?") == "And in statistics?", reply
        assert standalone_question(kb, en, "And how is it pronounced?") == f"{QUESTION} And how is it pronounced?", reply
    monkeypatch.setattr(chat_module, "complete", lambda *a, **k: "What is alpha in statistics?")
    assert standalone_question(kb, en, "And in statistics?") == "What is alpha in statistics?"


# --- the CLI, with the fake generator in place of llama.cpp -----------------------------------------


@pytest.fixture
def cli_ingested(corpus, home, monkeypatch, fake_embedder):
    import kb.api
    from kb.cli import cli

    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    result = CliRunner().invoke(cli, ["ingest", str(corpus), "--kb", str(home), "-q"])
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture
def cli_home(cli_ingested, monkeypatch):
    import kb.generator

    monkeypatch.setattr(kb.generator, "LlamaGenerator", lambda *a, **k: FakeGenerator())
    return cli_ingested


def test_cli_ask_json_and_text(cli_home):
    from kb.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["ask", QUESTION, "--kb", str(cli_home), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) >= {"answer", "refused", "sources", "model", "timings"}
    assert {"n", "path", "title", "page", "heading", "score", "text"} <= set(data["sources"][0])
    text = runner.invoke(cli, ["ask", QUESTION, "--kb", str(cli_home)]).output
    assert "Sources:" in text and "alpha.md" in text and "✓ cited" in text
    refused = runner.invoke(cli, ["ask", "How do volcanoes erupt?", "--kb", str(cli_home)]).output
    assert "do not contain" in refused and "Closest passages" in refused
    log = runner.invoke(cli, ["log", "--kb", str(cli_home), "--json"])
    assert len(json.loads(log.output)) == 3


def test_cli_chat_session(cli_home):
    from kb.cli import cli

    runner = CliRunner()
    script = f"{QUESTION}\n/sources\n/persona editor\n/persona nobody\n/reset\n/exit\n"
    result = runner.invoke(cli, ["chat", "--kb", str(cli_home)], input=script)
    assert result.exit_code == 0, result.output
    assert "alpha.md" in result.output and "Persona: editor" in result.output
    assert "no persona named 'nobody'" in result.output and "New conversation" in result.output


def test_cli_model_errors_name_the_file(tmp_path, cli_ingested):
    from kb.cli import cli

    home = cli_ingested
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    runner = CliRunner()
    for model, message in [(tmp_path / "missing.gguf", "not found"), (not_gguf, "not a GGUF"),
                           (tmp_path, "folder")]:
        result = runner.invoke(cli, ["ask", QUESTION, "--kb", str(home), "--model", str(model), "--min-score", "0"])
        assert result.exit_code == 1, result.output
        assert message in result.output and str(model) in result.output and "Traceback" not in result.output


def test_chat_template_fallback_is_chatml():
    from kb.generator import compile_chat_template

    for source in (None, "", "{% broken"):
        text = compile_chat_template(source).render(
            messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], add_generation_prompt=True)
        assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def test_a_follow_up_that_stands_alone_is_not_joined_to_a_question_it_only_answers_again(make_kb, tmp_path):
    """Joined to the previous question, "Who gets the page if the primary does not answer?" scored higher, only
    because the joined text found the rotation sentence again: its best sentence held no word of the follow-up.
    A follow-up that needs its previous question is still joined."""
    from kb.chat import Turn, standalone_question

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "oncall.md").write_text(
        "# On-call\n\nThe on-call rotation changes every Monday at 10:00. The primary engineer must acknowledge a "
        "page within 15 minutes.\n\nIf the primary does not answer, the page escalates to the secondary after 30 "
        "minutes.\n\n# Expenses\n\nMeals while travelling are reimbursed up to 60 euros per day.\n", encoding="utf-8")
    kb = make_kb(generator=FakeGenerator())
    kb.ingest([docs])
    before = [Turn("user", "When does the on-call rotation change?"), Turn("assistant", "Every Monday [1].")]
    follow_up = "Who gets the page if the primary does not answer?"
    joined = f"{before[0].content} {follow_up}"
    assert kb.assess(joined, kb.search_result(joined))[0].answerability > \
        kb.assess(follow_up, kb.search_result(follow_up))[0].answerability
    assert standalone_question(kb, before, follow_up, extractive=True) == follow_up
    assert standalone_question(kb, before, "And at what time?", extractive=True) == \
        "When does the on-call rotation change? And at what time?"
