"""Evidence sentences, answer types, answerability, extractive answers and the support check (fakes)."""

import json

import pytest
from click.testing import CliRunner

from conftest import FakeGenerator, write_gguf
from kb.evidence import (Passage, answer_type, assess, join_adjacent, prepare_question, question_terms,
                         select_evidence, split_sentences, type_candidates)

RELEASES = """As the year draws to a close, it is time to plan the 1.0 release cycle of Quill.

**In short: we switch to a six-week release cycle on Jan 9, 2015, and ship Quill 1.0 final two cycles later**:

* Quill 1.0.0-alpha -- Friday, Jan 9, 2015
* Quill 1.0.0-beta -- Week of Feb 16, 2015
* Quill 1.0.0 -- One or more six-week cycles later

Reaching alpha means the language is feature-complete. The standard library is nearly complete."""


def flat_doc_freqs(terms):
    return 1000, {t: 5 for t in terms}


def sentences(text):
    return [text[s:e] for s, e in split_sentences(text)]


def test_sentences_western_abbreviations_and_markdown_units():
    got = sentences("Dr. Smith went to Washington D.C. on Jan. 5. He left e.g. early. It cost 3.5 dollars! Done?")
    assert got == ["Dr. Smith went to Washington D.C. on Jan. 5.", "He left e.g. early.", "It cost 3.5 dollars!", "Done?"]
    got = sentences(RELEASES)
    assert "* Quill 1.0.0-alpha -- Friday, Jan 9, 2015" in got  # list items and key -- value lines are units
    assert any(s.startswith("**In short") and s.endswith("later**:") for s in got)  # a wrapped line is joined
    assert "Reaching alpha means the language is feature-complete." in got


def test_numbered_items_keep_their_number_and_a_wrapped_version_number_is_no_item():
    got = sentences("Steps:\n\n1. Install the tool. It is quick.\n2. Run it.\nB. Plan B.")
    assert got == ["Steps:", "1. Install the tool.", "It is quick.", "2. Run it.", "B. Plan B."]
    # "1.52.1" at the start of a wrapped line is a version, not item 1 (the quote was cut at "getting Rust")
    got = sentences("If you have a previous version of Rust installed via rustup, getting Rust\n1.52.1 is as easy as:")
    assert len(got) == 1


def test_sentences_chinese_tables_and_giant_runs():
    assert sentences("黑豹队赢了。他说：“我们会赢！”然后离开了。这是第一句") == ["黑豹队赢了。", "他说：“我们会赢！”", "然后离开了。", "这是第一句"]
    table = "| year | champion |\n|---|---|\n| 2015 | Broncos |\n| 2016 | Patriots |"
    assert "| 2015 | Broncos |" in sentences(table)
    giant = " ".join(f"word{i}" for i in range(2000))  # no boundary at all
    spans = split_sentences(giant)
    assert len(spans) > 5 and all(e - s <= 500 for s, e in spans)
    assert giant[spans[0][0]:spans[-1][1]] == giant  # nothing lost
    cjk = "甲乙丙丁" * 300
    assert all(e - s <= 250 for s, e in split_sentences(cjk))
    assert split_sentences("") == [] and split_sentences("  \n\n ") == []


def test_footnote_marks_stay_with_the_sentence_they_close():
    """A saved Wikipedia page keeps its footnote marks: "casual.[319][320] However" is two sentences."""
    text = ("Standards have since relaxed and fashion is casual.[319][320] However, the industry grew after "
            "2000.[320] It was cited.[citation needed] See e.g. here. 中国是一个国家。[1]首都是北京。[2]")
    assert sentences(text) == ["Standards have since relaxed and fashion is casual.[319][320]",
                               "However, the industry grew after 2000.[320]", "It was cited.[citation needed]",
                               "See e.g. here.", "中国是一个国家。[1]", "首都是北京。[2]"]


def test_answer_types_in_english_and_chinese():
    assert answer_type("On what date will Quill 1.0.0-alpha be released?") == "date"
    assert answer_type("How many points did the Panthers surrender?") == "number"
    assert answer_type("Who won Super Bowl 50?") == "person"
    assert answer_type("Where was the game played?") == "place"
    assert answer_type("What sea bordered the empire when he died?") == "place"  # the first question word decides
    assert answer_type("What did Luther do when he was young?") is None
    assert answer_type("黑豹队的防守丢了多少分？") == "number"
    assert answer_type("比赛是什么时候举行的？") == "date"
    assert answer_type("谁赢得了比赛？") == "person"
    assert answer_type("超级碗在哪里举行？") == "place"
    question = "On what date will Quill 1.0.0-alpha be released?"
    spans = type_candidates("* Quill 1.0.0-alpha -- Friday, Jan 9, 2015", "date", question)
    assert spans and all("1.0.0" not in "* Quill 1.0.0-alpha -- Friday, Jan 9, 2015"[a:b] for a, b in spans)
    assert type_candidates("Quill is written in Rust.", "date", question) == []
    # "what date" names the type, not the topic; a version is one term
    assert question_terms(question) == ["quill", "1.0.0", "alpha", "released"]
    assert type_candidates("Today we announce the release of Quill 1.0.0.alpha.2!", "date", question) == []


def test_the_tail_of_a_quoted_sentence_in_the_next_chunk_is_not_quoted_again():
    """Chunks overlap: the next chunk opens with the end of the rule already quoted, and the answer quoted
    "5.【强制】主键索引名为 pk_字段名；唯一索引名为 uk_字段名；普通索引名则为 idx_字段名。 [1] …uk_字段名；普通索引名则为 idx_字段名。 [2]"."""
    rule = "5.【强制】主键索引名为 pk_字段名；唯一索引名为 uk_字段名；普通索引名则为 idx_字段名。"
    passages = [Passage(n=1, text="4.【强制】表名不使用复数名词。" + rule),
                Passage(n=2, text="uk_字段名；普通索引名则为 idx_字段名。6.【推荐】小数类型为 decimal。")]
    quotes = [e.text for e in assess(prepare_question("索引名怎么命名？", flat_doc_freqs), passages).evidence(3)]
    assert quotes[0] == rule and not any(q in rule for q in quotes[1:])


def test_requests_for_a_summary_and_their_topic():
    from kb.evidence import summary_topic

    assert summary_topic("Summarize the history of New Zealand.") == "the history of New Zealand"
    assert summary_topic("Can you give me a brief overview of the refund policy?") == "the refund policy"
    assert summary_topic("Tell me about the on-call rotation") == "the on-call rotation"
    assert summary_topic("总结一下线程池的规约") == "线程池的规约"
    assert summary_topic("这份手册主要讲了什么？") == "手册"
    assert summary_topic("介绍一下日志规约") == "日志规约"
    for question in ("When was it released?", "What is a summary?", "什么是线程池？", "Summarize.", "总结一下"):
        assert summary_topic(question) is None, question


def test_a_request_for_a_summary_is_answered_with_the_openings_of_the_passages_on_its_topic(make_kb, tmp_path):
    """"Summarize the history of Zealandia." asks for no fact one sentence states, and was refused with the
    History section right there. The answer quotes the section's opening sentence on the topic (not the image
    caption that opens it); a summary of a topic no document covers is still refused."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zealandia.md").write_text(
        "# Zealandia\n\n## History\n\nA torn sheet of paper on a desk\n\nThe first settlers reached Zealandia "
        "around 1300 and built villages along the coast. Traders arrived in 1642 and mapped the western shore. "
        "The colony became a dominion in 1907.\n\n## Economy\n\nZealandia exports wool, dairy and timber.\n",
        encoding="utf-8")
    (docs / "tomato.md").write_text("# 阳台种番茄\n\n番茄是喜光植物，每天至少需要六到八个小时的直射阳光。朝南的阳台最适合。\n",
                                    encoding="utf-8")
    kb = make_kb()
    kb.ingest([docs])
    answer = kb.ask("Summarize the history of Zealandia.", extractive=True)
    assert not answer.refused and answer.text.startswith("The first settlers reached Zealandia around 1300")
    assert answer.sources[0].heading.endswith("History")
    answer = kb.ask("介绍一下阳台种番茄", extractive=True)
    assert not answer.refused and answer.text.startswith("番茄是喜光植物")
    assert kb.ask("Summarize the history of Peru.", extractive=True).refused
    assert kb.ask("Give me an overview of the tax rules.", extractive=True).refused


def test_how_long_does_it_take_asks_for_a_duration_not_about_length(make_kb, tmp_path):
    """"long" and "take" say what kind of answer is wanted: over a refund policy that says "within five business
    days", "How long does it take to get a refund?" and "How long do refunds take?" were refused (they weighed
    as much as "refund")."""
    assert question_terms("How long does it take to get a refund?") == ["get", "refund"]
    assert question_terms("How tall is the tower?") == ["tower"] and question_terms("退款需要多久？")[0] == "退款"
    assert answer_type("How long does it take to get a refund?") == "number"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "refunds.md").write_text("# Refund policy\n\nCustomers can ask for a refund within 30 days of purchase. "
                                     "Refunds are paid to the original card within five business days.\n",
                                     encoding="utf-8")
    (docs / "team.md").write_text("# On-call\n\nThe on-call rotation changes every Monday at 10:00.\n", encoding="utf-8")
    kb = make_kb()
    kb.ingest([docs])
    answer = kb.ask("How long do refunds take?", extractive=True)
    assert not answer.refused and "five business days" in answer.text
    assert kb.ask("How long does it take to get a passport?", extractive=True).refused


def test_a_year_in_a_date_is_no_count():
    """"How many official languages ...?" was answered with "... one of New Zealand's official languages in
    2006.[280]": its year, its reference mark and "one of" all passed for a count."""
    def numbers(text, question="How many official languages does New Zealand have?"):
        return [text[a:b] for a, b in type_candidates(text, "number", question)]

    assert numbers("It was declared one of New Zealand's official languages in 2006.[280]") == []
    assert numbers("Since the 1980s the party, founded on June 5, 1907, has had 3 leaders.") == ["3"]
    assert numbers("By 1990 it had 1200 soldiers and 40% of the vote.") == ["1", "2", "0", "0", "4", "0"]
    assert numbers("Three languages are official.") == ["Three"]
    # a year is still a year where one is asked
    assert type_candidates("It was declared official in 2006.", "date", "When was it declared?")
    # "2006年" says when, in Chinese too, unless the question asks how many years
    assert numbers("2006年被宣布为官方语言，共有3种。", "有多少种官方语言？") == ["3"]
    assert numbers("该工程前后历时1000年才完工，于2006年正式开放。", "历时多少年？") == ["1", "0", "0", "0", "2", "0", "0", "6"]
    assert numbers("该工程前后历时1000年才完工，于2006年正式开放。", "有多少个出口？") == []


def test_chinese_numbers_are_numbers_not_words_that_hold_a_numeral():
    def numbers(text, question="它有多长？"):
        return [text[a:b] for a, b in type_candidates(text, "number", question)]

    # 一 in "其中一个种", 半 in "半岛", 万 in "万物" name no quantity: the sentence holds no answer to "how long"
    assert numbers("蓝线裸顶鲷，为鲈形目龙占鱼科的其中一个种。") == []
    assert numbers("它一直分布在半岛南部，统一称为万物之一。") == []
    assert numbers("体长可达80公分。") == ["8", "0"]
    assert numbers("学校现有两个校区。") == ["两"]
    assert numbers("容量为一百零一发，约一米高。") == ["一百零一", "一"]
    assert numbers("这是全国第三大城市。") == ["第三"]


def test_evidence_finds_the_date_line_with_offsets_into_the_passage():
    q = prepare_question("On what date will Quill 1.0.0-alpha be released?", flat_doc_freqs)
    passage = Passage(n=1, text=RELEASES, title="Quill 1.0: scheduling the trains")
    a = assess(q, [passage])
    top = select_evidence(a.scored, 3)
    assert top[0].text == "* Quill 1.0.0-alpha -- Friday, Jan 9, 2015"
    for e in top:
        assert RELEASES[e.start:e.end] == e.text and e.n == 1
        assert all(0 <= s < t <= len(e.text) for s, t in e.matches)
    assert "alpha" in [top[0].text[s:t].lower() for s, t in top[0].matches]
    assert a.answerability >= 0.5


def test_evidence_prefers_the_sentence_with_the_asked_aspect():
    text = ("The Malayan pangolin lives in the forests of Southeast Asia. The Malayan pangolin eats ants. "
            "Its body is about 65 centimetres long, with a 56 centimetre tail. The Malayan pangolin is endangered.")
    q = prepare_question("How long is the body of the Malayan pangolin?", flat_doc_freqs)
    best = select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0]
    assert best.text.startswith("Its body is about 65")


def test_irregular_past_forms_meet_their_base():
    from kb.evidence import stem

    assert stem("became") == stem("become") == stem("becoming")
    assert stem("won") == stem("win") and stem("written") == stem("writes") and stem("children") == stem("child")
    assert stem("found") != stem("find")  # "founded" is its own verb
    q = prepare_question("When did the colony become a dominion?", flat_doc_freqs)
    text = "The colony was becoming crowded. In 1907 the colony became a dominion of the Crown."
    assert select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("In 1907")


def test_reference_list_entries_are_weak_evidence(monkeypatch):
    """A reference list repeats the topic's words in its titles and states nothing: the sentence that answers
    wins over it, in a References section or as a Wikipedia "^" citation line anywhere."""
    import kb.evidence

    q = prepare_question("When did New Zealand become a dominion?", flat_doc_freqs)
    answer = Passage(n=1, text="The king proclaimed the islands a dominion in 1907.", heading="New Zealand > History")
    for heading, line in (("New Zealand > References", "How New Zealand became a dominion. Wellington: Ministry of Culture."),
                          ("New Zealand", '^ "How New Zealand became a dominion". Ministry of Culture.')):
        reference = Passage(n=2, text=line, heading=heading)
        best = select_evidence(assess(q, [reference, answer]).scored, 1)[0]
        assert best.n == 1, heading
        with monkeypatch.context() as m:
            m.setitem(kb.evidence.WEIGHTS, "reference", 0.0)
            assert select_evidence(assess(q, [reference, answer]).scored, 1)[0].n == 2  # what the rule prevents
    notes = Passage(n=2, text="How New Zealand became a dominion is told here.", heading="Story > Notes")
    assert select_evidence(assess(q, [notes, answer]).scored, 1)[0].n == 2  # an author's notes are text


def test_unanswerable_with_related_documents_scores_lower():
    related = Passage(n=1, text="The Broncos defeated the Panthers 24-10 in Super Bowl 50. Peyton Manning was the "
                                "Broncos quarterback. The game was played at Levi's Stadium.")
    answering = Passage(n=1, text="The Panthers defense gave up just 308 points during the regular season, ranking "
                                  "sixth in the league.")
    q = prepare_question("How many points did the Panthers defense surrender during the regular season?", flat_doc_freqs)
    assert assess(q, [answering]).answerability > assess(q, [related]).answerability


def test_a_number_the_question_names_must_be_in_the_evidence():
    q = prepare_question("谁赢得了第 49 届超级碗？", flat_doc_freqs)
    other = assess(q, [Passage(n=1, text="丹佛野马队赢得了第 50 届超级碗，以 24 比 10 击败卡罗莱纳黑豹队。")])
    answering = assess(q, [Passage(n=1, text="新英格兰爱国者队赢得了第 49 届超级碗，以 28 比 24 击败西雅图海鹰队。")])
    assert other.signals["number_missing"] == 1.0 and answering.signals["number_missing"] == 0.0
    assert answering.answerability > other.answerability
    # digit groups are compared whole: "49" is not in "1949"; "16,000" is "16000"
    q = prepare_question("What happened in 49?", flat_doc_freqs)
    assert assess(q, [Passage(n=1, text="What happened in 1949 was a war.")]).signals["number_missing"] == 1.0
    q = prepare_question("Which forest has 16,000 tree species?", flat_doc_freqs)
    assert assess(q, [Passage(n=1, text="The forest holds 16000 tree species.")]).signals["number_missing"] == 0.0
    q = prepare_question("Who won the Super Bowl?", flat_doc_freqs)
    assert assess(q, [Passage(n=1, text="The Broncos won it.")]).signals["number_missing"] == 0.0


def test_bad_questions_and_passages_never_crash():
    passage = Passage(n=1, text="Alpha is the first letter of the Greek alphabet.")
    for question in ("what is it?", "???", "Ποιο είναι το πρώτο γράμμα;", "اين المكتبة؟", ""):
        q = prepare_question(question, flat_doc_freqs)
        a = assess(q, [passage])
        assert 0.0 <= a.answerability <= 1.0 and select_evidence(a.scored) == []
    q = prepare_question("which words repeat here", flat_doc_freqs)
    giant = Passage(n=1, text=" ".join(["words repeat here and there"] * 500))
    evidence = select_evidence(assess(q, [giant]).scored, 3)
    assert evidence and all(len(e.text) <= 500 for e in evidence)
    assert assess(q, []).answerability < 0.5


def test_neighbouring_evidence_is_quoted_whole():
    text = "Leaves are arranged in a spiral. Young trees have needle leaves 3 to 8 mm long. Old trees have scales."
    q = prepare_question("What shape do the leaves of young and old trees have?", flat_doc_freqs)
    evidence = select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 3)
    quotes = join_adjacent(evidence, {1: text})
    assert len(quotes) < len(evidence)
    for quote in quotes:
        assert text[quote.start:quote.end] == quote.text
        assert all(quote.text[a:b].strip() for a, b in quote.matches)


# --- in the answer path, with fakes ---------------------------------------------------------------------


@pytest.fixture
def releases_kb(make_kb, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "quill-timeline.md").write_text("+++\ntitle = \"Quill 1.0: scheduling the trains\"\n+++\n\n" + RELEASES,
                                            encoding="utf-8")
    (docs / "tea.md").write_text("# Tea\n\nGreen tea is brewed at about eighty degrees for two minutes.\n", encoding="utf-8")
    (docs / "zh.md").write_text("# 阳台种番茄\n\n番茄是喜光植物，每天至少需要六到八个小时的直射阳光。朝南的阳台最适合。\n", encoding="utf-8")

    def make(**options):
        kb = make_kb(**options)
        kb.ingest([docs])
        return kb
    return make


class NoModel:
    """A generator that must not be used: extractive answers and refusals never load the chat model."""

    model_id = "never"

    @property
    def n_ctx(self):
        raise AssertionError("the chat model was loaded")

    def stream(self, *args, **kwargs):
        raise AssertionError("the chat model was used")

    format_chat = count_tokens = truncate = stream


def test_extractive_answer_quotes_the_evidence_without_the_model(releases_kb):
    kb = releases_kb(generator=NoModel())
    answer = kb.ask("On what date will Quill 1.0.0-alpha be released?", extractive=True)
    assert answer.extractive and not answer.refused
    assert "Jan 9, 2015" in answer.text and answer.text.rstrip().endswith("]")
    cited = [s for s in answer.sources if s.cited]
    assert cited and cited[0].path.endswith("quill-timeline.md")
    data = answer.to_dict()
    assert data["evidence"][0]["text"] == "* Quill 1.0.0-alpha -- Friday, Jan 9, 2015"
    by_n = {s["n"]: s for s in data["sources"]}
    for e in data["evidence"]:
        assert by_n[e["n"]]["text"][e["start"]:e["end"]] == e["text"]


def test_a_question_in_a_language_the_model_does_not_write_gets_evidence(releases_kb, tmp_path):
    english_only = write_gguf(tmp_path / "en-only.gguf", {"general.architecture": "llama", "general.languages": ["en"]})
    kb = releases_kb(model=str(english_only))
    answer = kb.ask("番茄每天需要多少小时的阳光？")
    assert answer.extractive and "六到八个小时" in answer.text and "does not write" in answer.notice
    # a model that declares Chinese, or declares nothing, or is declared by the user, is not forced
    for metadata, declared in (({"general.architecture": "qwen2", "general.languages": ["en", "zh"]}, ""),
                               ({"general.architecture": "llama"}, ""),
                               ({"general.architecture": "llama", "general.languages": ["en"]}, "en,zh")):
        model = write_gguf(tmp_path / "m.gguf", metadata)
        kb = releases_kb(model=str(model), generator=FakeGenerator(), model_languages=declared)
        kb.settings = kb.settings.replace(model=str(model))
        assert not kb.ask("番茄每天需要多少小时的阳光？").extractive, metadata


def test_an_unsupported_generated_answer_is_replaced_by_the_evidence(releases_kb):
    made_up = FakeGenerator(reply="Quill 1.0.0-alpha ships on Christmas Eve 2031 from the Mars office [1].")
    answer = releases_kb(generator=made_up).ask("On what date will Quill 1.0.0-alpha be released?")
    assert answer.generated.startswith("According to [1],") and "Mars" in answer.generated
    assert "Jan 9, 2015" in answer.text and "Mars" not in answer.text and answer.support < 0.75
    assert "not supported" in answer.notice
    faithful = FakeGenerator(reply="Quill 1.0.0-alpha is released on Friday, Jan 9, 2015 [1].")
    answer = releases_kb(generator=faithful).ask("On what date will Quill 1.0.0-alpha be released?")
    assert not answer.generated and "Friday, Jan 9, 2015" in answer.text and answer.support >= 0.75
    stream = releases_kb(generator=made_up).ask_stream("On what date will Quill 1.0.0-alpha be released?")
    streamed = "".join(stream)
    assert "Mars" in streamed and "not supported" in streamed and stream.answer.text in streamed


def test_an_answer_that_copies_a_passage_header_is_replaced_by_the_evidence(releases_kb):
    """Asked "How do I install Rust?", the bundled model wrote "the answer is:" and the header line of a passage
    as the prompt shows it: every word in the source, nothing said."""
    question = "What does reaching alpha mean?"
    header = FakeGenerator(reply=" the answer is:\n[1] Quill 1.0: scheduling the trains")
    answer = releases_kb(generator=header).ask(question)
    assert answer.generated and "not supported" in answer.notice and "feature-complete" in answer.text
    answer = releases_kb(generator=FakeGenerator(reply=" the answer is:\n[1] Quill 1.0: scheduling the trains — "
                                                        "What does reaching alpha mean?")).ask(question)
    assert "not supported" in answer.notice  # its title, then the question
    own = FakeGenerator(reply=" reaching alpha means the language is feature-complete [1].")
    assert not releases_kb(generator=own).ask(question).generated
    # an answer that opens with the title's words is no header ("According to [1], Quill 1.0: ...")
    own = FakeGenerator(reply=" Quill 1.0: scheduling the trains says reaching alpha means feature-complete [1].")
    assert not releases_kb(generator=own).ask(question).generated


def test_an_answer_that_takes_a_number_from_a_clause_about_something_else_is_replaced(make_kb, tmp_path):
    """Asked when New Zealand became a dominion, the bundled model answered 1947, a year of the same sentence
    that no word of the question is near; 1907 stands beside "became a dominion"."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "nz.md").write_text("# New Zealand\n\nIn 1841, New Zealand became a colony within the British Empire "
                                "and in 1907 it became a dominion; it gained full statutory independence in 1947 and "
                                "the British monarch remained the head of state.\n", encoding="utf-8")
    question = "When did New Zealand become a dominion?"
    wrong = make_kb(generator=FakeGenerator(reply=" New Zealand became a dominion in 1947 [1]."))
    wrong.ingest([docs])
    answer = wrong.ask(question)
    assert "not supported" in answer.notice and "1947" in answer.generated and "in 1907 it became" in answer.text
    right = make_kb(generator=FakeGenerator(reply=" New Zealand became a dominion in 1907 [1]."))
    assert not right.ask(question).generated


def test_an_answer_that_does_not_say_what_was_asked_is_replaced_by_the_evidence(releases_kb):
    """Every word of "... on Friday" is in the passage (the support check passes), but the clause about the alpha
    holds no date: the model restated the question and put its only date elsewhere."""
    question = "On what date will Quill 1.0.0-alpha be released?"
    vague = FakeGenerator(reply="Quill 1.0.0-alpha will be released as part of the release cycle, and the beta in the week of Feb 16, 2015 [1].")
    answer = releases_kb(generator=vague).ask(question)
    assert answer.support >= 0.75 and "did not say what was asked (a date or time)" in answer.notice
    assert "Jan 9, 2015" in answer.text and "the beta" in answer.generated
    for reply in ("Quill 1.0.0-alpha will be released on Friday, Jan 9, 2015 [1].",
                  "On Jan 9, 2015, Quill 1.0.0-alpha will be released [1]."):  # a short phrase beside it counts
        answer = releases_kb(generator=FakeGenerator(reply=reply)).ask(question)
        assert not answer.generated and not answer.notice and "Jan 9, 2015" in answer.text, reply


def test_an_answer_that_repeats_an_earlier_answer_of_the_conversation_is_replaced_by_the_evidence(releases_kb):
    question = "What does reaching alpha mean?"
    earlier = [{"role": "user", "content": "When is Quill 1.0.0-beta?"},
               {"role": "assistant", "content": "According to [1], Quill 1.0.0-beta comes in the week of Feb 16, 2015."}]
    echo = FakeGenerator(reply="Quill 1.0.0-beta comes in the week of Feb 16, 2015 [1]. The language is feature-complete.")
    answer = releases_kb(generator=echo).ask(question, history=earlier)
    assert "repeated an earlier answer" in answer.notice and "feature-complete" in answer.text
    assert "Feb 16" in answer.generated and "Feb 16" not in answer.text
    fresh = FakeGenerator(reply="Reaching alpha means the language is feature-complete [1].")
    answer = releases_kb(generator=fresh).ask(question, history=earlier)
    assert not answer.notice and not answer.generated and "feature-complete" in answer.text
    from kb.answer import repeats_earlier

    quoted = ["一线城市住宿标准为每晚不超过600元；其他城市每晚不超过400元。 [1]"]
    assert not repeats_earlier("根据[1]，其他城市每晚不超过400元。", quoted, "其他城市呢？")
    assert repeats_earlier("根据[1]，一线城市住宿标准为每晚不超过600元。", quoted, "交通费用呢？")


def test_an_answer_with_a_number_the_passages_do_not_hold_is_replaced_by_the_evidence(releases_kb):
    """Every word but one is in the passage, so the support share passes; the one is the number."""
    question = "When does Quill 1.0.0-beta come?"
    invented = FakeGenerator(reply="Quill 1.0.0-beta comes in the week of Feb 17, 2015 [1].")
    answer = releases_kb(generator=invented).ask(question)
    assert answer.support >= 0.75 and "not supported" in answer.notice
    assert "Feb 16, 2015" in answer.text and "17" in answer.generated
    faithful = FakeGenerator(reply="Quill 1.0.0-beta comes in the week of Feb 16, 2015 [1].")
    answer = releases_kb(generator=faithful).ask(question)
    assert not answer.notice and "Feb 16, 2015" in answer.text


def test_a_streamed_answer_ends_where_the_model_starts_a_new_turn(releases_kb):
    from kb.answer import TurnCut

    cut = TurnCut()
    pieces = ["Alpha is on", " Jan 9.", "\n", "Ques", "tion", ": And the beta?", " more"]
    out = "".join(cut.feed(p) for p in pieces) + cut.flush()
    assert out == "Alpha is on Jan 9." and cut.done
    cut = TurnCut()
    pieces = ["Two things:", "\n", "User", "s can", " upgrade.", "\nQuestions remain."]
    assert "".join(cut.feed(p) for p in pieces) + cut.flush() == "Two things:\nUsers can upgrade.\nQuestions remain."
    echo = FakeGenerator(reply="Quill 1.0.0-alpha is released on Friday, Jan 9, 2015 [1].\nQuestion: And the beta?")
    stream = releases_kb(generator=echo).ask_stream("On what date will Quill 1.0.0-alpha be released?")
    streamed = "".join(stream)
    assert "Question" not in streamed and "Question" not in stream.answer.text and "Jan 9, 2015" in stream.answer.text


def test_states_asked_type_reads_the_clause_about_the_question():
    from kb.answer import states_asked_type

    q = "How often should I feed a sourdough starter on the counter?"
    assert not states_asked_type("feeding a sourdough starter on the counter at room temperature, and once a week "
                                 "when it lives in the fridge.", q)
    assert states_asked_type("feed the starter once a day when it lives on the counter.", q)
    assert states_asked_type("Green tea is brewed at about eighty degrees.", "What does the recipe say about tea?")
    assert not states_asked_type("[1]，杜瓦成功制造出液氧。", "杜瓦在哪一年制造出液氧?")
    assert states_asked_type("[1]，1891年，杜瓦成功制造出液氧。", "杜瓦在哪一年制造出液氧?")  # "1891年": CJK beside digits
    assert states_asked_type("It is not clear.", q)  # nothing about the question: left to the support check


def test_the_model_sees_the_evidence_before_the_passages(releases_kb):
    generator = FakeGenerator()
    releases_kb(generator=generator, check_support=False).ask("On what date will Quill 1.0.0-alpha be released?")
    prompt = generator.prompts[-1]
    assert prompt.index("Quill 1.0.0-alpha -- Friday, Jan 9, 2015") < prompt.index("Documents:")
    assert prompt.rstrip().endswith("According to [1],")


def test_refusal_shows_the_closest_evidence(releases_kb):
    kb = releases_kb(generator=NoModel())
    answer = kb.ask("Which office does the Quill team work from?")
    assert answer.refused and answer.text == "The documents do not contain an answer to this question."
    assert answer.evidence and answer.answerability < 0.5
    answer = kb.ask("Which office does the Quill team work from in Berlin?")
    assert answer.refused and answer.text == ("The documents do not contain an answer to this question. "
                                              "None of them mentions “Berlin”.")


def test_names_in_a_question():
    from kb.evidence import question_names

    assert question_names("Who was the first European to sight New Zealand?") == [
        ("European", ["european"]), ("New Zealand", ["new", "zealand"])]
    assert question_names("Python 代码的缩进应该用几个空格？") == [("Python", ["python"])]
    assert question_names("64DD有哪些优点？") == [("64DD", ["64dd"])]  # the whole word, digits and all
    assert question_names("How Do I Reset My Password?") == []  # title case: capitals name nothing
    assert question_names("When was it released?") == [] and question_names("番茄需要多少阳光？") == []


def test_a_name_counts_as_mentioned_in_a_near_spelling_or_as_initials():
    from kb.evidence import Passage, _near, unmentioned

    assert _near("bedigo", "bendigo") and _near("californian", "california") and _near("beriods", "beroids")
    assert not _near("austria", "australia") and not _near("python", "java") and not _near("sweden", "swedish")
    passages = [Passage(n=1, text="The United Methodist Church met in Bendigo. The Super Bowl was played.")]

    def missing(question):
        return unmentioned(prepare_question(question, lambda terms: (1000, {t: 0 for t in terms})), passages)

    assert missing("What did the UMC decide in Bedigo at the Superbowl?") == []
    assert missing("What did the UMC decide in Kotlin?") == ["Kotlin"]
    assert missing("What did the BBC decide?") == ["BBC"]
    # a company's name may be only in the folder its policies are in; "Acme's" is the name Acme
    in_folder = [Passage(n=1, text="Refunds are paid within five days.", path="/home/me/acme-docs/refunds.md")]
    assert unmentioned(prepare_question("What is Acme's refund policy?", lambda terms: (1000, {t: 0 for t in terms})),
                       in_folder) == []
    assert unmentioned(prepare_question("What is Globex's refund policy?", lambda terms: (1000, {t: 0 for t in terms})),
                       in_folder) == ["Globex"]


def test_a_question_about_something_no_document_mentions_is_refused_saying_so(releases_kb):
    """"Kotlin 1.0.0-alpha" matches the Quill release line on every other word, and was answered with Quill's
    date; no document mentions Kotlin, and kb says that is why it refuses. A misspelt name still answers."""
    kb = releases_kb(generator=NoModel())
    answer = kb.ask("On what date will Kotlin 1.0.0-alpha be released?", extractive=True)
    assert answer.refused and answer.text.endswith("None of them mentions “Kotlin”.")
    assert answer.evidence and "Jan 9, 2015" in answer.evidence[0].text  # the closest evidence, to judge by
    assert not kb.ask("番茄每天需要多少小时的阳光？", extractive=True).refused
    answer = kb.ask("在 Minecraft 里番茄每天需要多少小时的阳光？", extractive=True)
    assert answer.refused and answer.text == "文档中没有这个问题的答案。文档中没有提到“Minecraft”。"
    answer = kb.ask("On what date will Qiull 1.0.0-alpha be released?", extractive=True)
    assert not answer.refused and "Jan 9, 2015" in answer.text
    assert not kb.ask("On what date will Quill 1.0.0-alpha be released?", extractive=True).refused


def test_cli_ask_shows_evidence_and_json(releases_kb, home, monkeypatch, fake_embedder):
    import kb.api
    from kb.cli import cli

    releases_kb()
    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    runner = CliRunner()
    out = runner.invoke(cli, ["ask", "On what date will Quill 1.0.0-alpha be released?", "--kb", str(home),
                              "--extractive"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("Quill 1.0.0-alpha -- Friday, Jan 9, 2015 [1]")
    assert "* Quill 1.0.0-alpha -- Friday, Jan 9, 2015" in out.output.split("Evidence:")[1].split("Sources:")[0]
    data = json.loads(runner.invoke(cli, ["ask", "番茄每天需要多少小时的阳光？", "--kb", str(home), "--json",
                                          "--extractive"]).output)
    assert data["extractive"] and data["evidence"] and {"n", "text", "start", "end", "score"} <= set(data["evidence"][0])


def test_a_passage_just_below_the_top_k_comes_in_for_its_evidence(make_kb, tmp_path):
    """The chunk that states the date ranks below one that only talks about the release: with k=1, kb still
    answers from the date line (the pool of 2k passages), and says in its timings that it swapped."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "announce.md").write_text(
        "# Quill 1.0.0-alpha\n\nQuill 1.0.0-alpha is a milestone: the alpha has every feature of the Quill alpha "
        "plan, and alpha users love Quill 1.0.0-alpha. Many were released by Quill before it.\n", encoding="utf-8")
    (docs / "timeline.md").write_text("# Trains\n\nWe release Quill 1.0.0 in stages:\n\n"
                                      "* Quill 1.0.0-alpha -- Friday, Jan 9, 2015\n* Quill 1.0.0-beta -- Feb 2015\n",
                                      encoding="utf-8")
    kb = make_kb()
    kb.ingest([docs])
    question = "On what date will Quill 1.0.0-alpha be released?"
    assert [h.path.rsplit("/", 1)[1] for h in kb.search(question, k=2)] == ["announce.md", "timeline.md"]
    answer = kb.ask(question, k=1, extractive=True)
    assert "Jan 9, 2015" in answer.text and answer.sources[0].path.endswith("timeline.md")
    assert answer.timings["evidence_swapped"] == 1
    assert kb.ask("Is Quill 1.0.0-alpha released?", k=1, extractive=True).sources[0].path.endswith("announce.md")


def test_a_model_refusal_is_overruled_only_by_strong_evidence(releases_kb):
    """The model says the documents lack the answer: kb answers with the evidence (saying so) when the
    answerability is at `overrule_refusal` or above; below it, or with 1, the model's refusal stands."""
    refuser = FakeGenerator(reply="The documents do not contain an answer to this question.")
    question = "On what date will Quill 1.0.0-alpha be released?"
    answer = releases_kb(generator=refuser, overrule_refusal=0.5).ask(question)
    strength = answer.answerability
    assert strength >= 0.5 and answer.refusal_overruled and not answer.refused
    assert "Jan 9, 2015" in answer.text and answer.text.endswith("[1]") and answer.sources[0].cited
    assert "do not contain" in answer.generated and "do not answer this" in answer.notice
    assert releases_kb(generator=refuser, overrule_refusal=strength).ask(question).refusal_overruled
    for threshold in (min(strength + 0.001, 1.0), 1.0):
        kept = releases_kb(generator=refuser, overrule_refusal=threshold).ask(question)
        assert kept.refused and not kept.refusal_overruled and kept.text.startswith("The documents do not contain")
    stream = releases_kb(generator=refuser, overrule_refusal=0.5).ask_stream(question)
    streamed = "".join(stream)
    assert "do not answer this" in streamed and stream.answer.text in streamed


def test_a_sentence_that_opens_with_a_pronoun_speaks_of_the_sentence_before(monkeypatch):
    """"它的根部 ..." (its roots) answers a question about 大果西番莲's roots although the name is in the sentence
    before; the same holds through a chain of pronouns ("Its scales ... It eats ...")."""
    import kb.evidence

    text = "大果西番莲是西番莲属的植物中果实最大的一种。大果西番莲有时候会在温室中种植。它的根部可用来当作催吐剂与麻醉药品。"
    q = prepare_question("大果西番莲的根部有什么作用？", flat_doc_freqs)
    assert select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("它的根部")
    monkeypatch.setattr(kb.evidence, "ANAPHORA", 0.0)
    assert not select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("它的根部")
    text = "The pangolin lives in Asia. Its scales are keratin. It eats ants and termites."
    q = prepare_question("What does the pangolin eat?", flat_doc_freqs)
    without = {e.text: e.score for e in assess(q, [Passage(n=1, text=text)]).scored}
    monkeypatch.undo()
    scored = {e.text: e.score for e in assess(q, [Passage(n=1, text=text)]).scored}
    assert scored["It eats ants and termites."] > without["It eats ants and termites."] + 0.1


def test_sentences_keep_initials_and_titles_whole_inside_chinese():
    assert sentences("伏尔泰的朋友们是霍尔以笔名S.G. Tallentyre写作的一部作品。下一句。") == [
        "伏尔泰的朋友们是霍尔以笔名S.G. Tallentyre写作的一部作品。", "下一句。"]
    assert sentences("两旁摆著圣若望．玛达（St. John of Matha）的雕像。完。")[0].endswith("的雕像。")
    # "！" inside a title 《...》 does not end the sentence; after the title it does
    assert sentences("《卡拉OK.LIVE！‧台北‧我》是第六张专辑。他说好！然后走了。") == [
        "《卡拉OK.LIVE！‧台北‧我》是第六张专辑。", "他说好！", "然后走了。"]
    assert sentences("他读了《书》！又读了一本。") == ["他读了《书》！", "又读了一本。"]


def test_a_chinese_name_counts_once_not_once_per_bigram(monkeypatch):
    """天门冬 is the bigrams 天门 and 门冬: summed, the name outweighed 治疗, the word that says what is asked, and a
    sentence naming the plant beat the one that answers (which, as Chinese does, leaves the subject out)."""
    import kb.evidence

    def doc_freqs(terms):  # the name is rare in the index, 治疗 less so
        return 1000, {t: 3 if t in ("天门", "门冬") else 20 if len(t) == 2 else 100 for t in terms}

    text = "天门冬为天门冬科多年生攀援草本植物。天门冬又称丝冬、天棘、明天冬。块根可入药，治疗虚劳、气喘、咳嗽等症。"
    q = prepare_question("天门冬能治疗哪些问题？", doc_freqs)
    assert "天门" in q.terms and "些问" not in q.terms  # 些 is grammar, like 什 and 几
    best = select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0]
    assert best.text.startswith("块根可入药")
    monkeypatch.setattr(kb.evidence, "TOPIC", 0.0)  # (the passage's topic carried to it would also rescue it)
    assert select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("块根可入药")
    monkeypatch.setattr(kb.evidence, "_phrases", lambda *a: [])  # every bigram counted on its own
    assert not select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("块根可入药")


def test_without_a_trusted_embedding_a_sentence_from_a_passage_about_the_question_wins():
    q = prepare_question("冷湖行政区的经济主要由什么支撑？", flat_doc_freqs)
    other = Passage(n=1, text="教堂的圆柱建在柱基上并支撑主要的结构。", rank=0)
    right = Passage(n=2, text="冷湖行政区是青海省的一个县级行政区。经济主要以矿业支撑，尤以石油开采为重要。", rank=1)
    best = select_evidence(assess(q, [other, right]).scored, 1)[0]
    assert best.n == 2 and "矿业" in best.text


def test_a_quote_is_completed_where_it_cannot_stand_alone():
    text = ("猴面包树的果实钙含量比菠菜高，维生素C含量是橙子的三倍。因此它有时也被称为笨蛋水果。它的叶子可以吃。\n"
            "印度野驴与非洲野驴有些分别。牠们的毛多呈沙色，背上有深褐色斑纹。")
    q = prepare_question("为什么猴面包树被称为笨蛋水果？", flat_doc_freqs)
    a = assess(q, [Passage(n=1, text=text)])
    best = a.evidence(3)[0]
    assert best.text == "猴面包树的果实钙含量比菠菜高，维生素C含量是橙子的三倍。因此它有时也被称为笨蛋水果。"
    assert text[best.start:best.end] == best.text and best.index == 0 and best.last == 1
    assert all("笨蛋" not in e.text for e in a.evidence(3)[1:])  # a sentence already quoted is not quoted again
    q = prepare_question("印度野驴与非洲野驴的分别是什么？", flat_doc_freqs)
    best = assess(q, [Passage(n=1, text=text)]).evidence(1)[0]
    assert best.text.startswith("印度野驴与非洲野驴有些分别。牠们的毛多呈沙色")  # says almost nothing alone
    text = "Quill has three parts:\nthe parser, the checker and the emitter.\n\nThe parser is fast. Therefore the compiler starts quickly."
    q = prepare_question("Why does the Quill compiler start quickly?", flat_doc_freqs)
    best = assess(q, [Passage(n=1, text=text)]).evidence(1)[0]
    assert best.text == "The parser is fast. Therefore the compiler starts quickly."


def test_a_labelled_line_of_a_form_stands_alone_and_weak_sentences_are_not_shown():
    invoice = "发票号码：NO.20261103\n购买方：上海明远科技有限公司\n金额合计：人民币3,260.00元\n开票日期：2026年11月3日"
    evidence = assess(prepare_question("发票号码是多少？", flat_doc_freqs), [Passage(n=1, text=invoice)]).evidence(3)
    assert evidence[0].text == "发票号码：NO.20261103"  # short, but a labelled value: not run into the buyer's line
    notes = ("孩子的钢琴课每周六上午上课，每节课 300 元。", "接口响应时间从 350 毫秒降到 120 毫秒。")
    a = assess(prepare_question("钢琴课什么时候上？", flat_doc_freqs), [Passage(n=i + 1, text=t) for i, t in enumerate(notes)])
    assert [e.n for e in a.scored if e.window_coverage > 0] == [1, 2]  # the second shares 时 with 什么时候 ...
    assert [e.text for e in a.evidence(3)] == [notes[0]]  # ... and is not shown as evidence


def test_a_row_of_a_small_table_is_quoted_with_the_whole_table():
    table = "| 工龄 | 年假天数 |\n| 1-5年 | 5天 |\n| 5-10年 | 10天 |\n| 10年以上 | 15天 |"
    text = "员工入职满一年后享有年假，具体天数见下表。\n\n" + table
    best = assess(prepare_question("工龄10年以上有几天年假？", flat_doc_freqs), [Passage(n=1, text=text)]).evidence(3)
    assert any(e.text == table for e in best)  # the row that answers "7 years" shares no word with the question
    big = "\n".join(f"| item {i} | {i * 3} kg |" for i in range(20))
    best = assess(prepare_question("How heavy is item 7?", flat_doc_freqs), [Passage(n=1, text=big)]).evidence(1)[0]
    assert best.text == "| item 7 | 21 kg |"  # a long table: the row alone


def test_a_table_row_holds_its_column_names():
    table = ("Our plans are billed monthly.\n\n| Plan | Price per month | Seats | Storage |\n|------|------|------|------|\n"
             "| Starter | $9 | 1 | 10 GB |\n| Team | $49 | 10 | 200 GB |\n| Business | $199 | 50 | 2 TB |")
    a = assess(prepare_question("How many seats come with the Business plan?", flat_doc_freqs), [Passage(n=1, text=table)])
    assert a.scored[0].text == "| Business | $199 | 50 | 2 TB |"  # "seats" and "plan" are its column names
    assert a.scored[0].window_coverage > 0.7 and a.signals["window_coverage"] > 0.7
    from kb.answer import extractive_text
    from kb.text import flatten
    assert extractive_text(a.evidence(3)).startswith("| Plan | Price per month | Seats | Storage |\n| Starter |")
    assert flatten(table, rows=True).splitlines()[:3] == [
        "Our plans are billed monthly.", "| Plan | Price per month | Seats | Storage |", "| Starter | $9 | 1 | 10 GB |"]
    assert "---" not in flatten(table) and "| Seats | Storage | | Starter |" in flatten(table)


def test_in_a_small_index_a_word_it_never_saw_weighs_as_its_rarest_word():
    q = prepare_question("How do I cancel my subscription?", lambda terms: (3, {"cancel": 1, "subscription": 0}))
    assert q.weights["cancel"] == q.weights["subscription"]  # an unseen word had weighed twice "cancel" here
    assert prepare_question("cancel subscription", lambda terms: (3, {"cancel": 2, "subscription": 0})).weights["cancel"] < \
        q.weights["cancel"]  # a word seen more often still weighs less


def test_a_line_that_only_repeats_the_question_is_not_evidence():
    toc = "Table of Contents\nA. PURPOSE1-1\nB. ROLE OF UNITED STATES TRUSTEE1-1\nC. STATUTORY DUTIES OF A STANDING TRUSTEE1-2"
    body = ("C. STATUTORY DUTIES OF A STANDING TRUSTEE\n\nThe standing trustee's primary statutory duties are set "
            "forth in 11 U.S.C. § 1302, which incorporates some duties of chapter 7 trustees.")
    q = prepare_question("What are the statutory duties of a standing trustee?", flat_doc_freqs)
    evidence = assess(q, [Passage(n=1, text=body), Passage(n=2, text=toc)]).evidence(3)
    assert evidence[0].text.startswith("The standing trustee's primary statutory duties are set forth in 11 U.S.C.")
    assert all("STATUTORY DUTIES OF A STANDING TRUSTEE" not in e.text for e in evidence)  # headings say nothing
    # a yes-no question is answered in its own words; a short line quoted with the next one says something
    q = prepare_question("丙烯颜料溶于汽油吗？", flat_doc_freqs)
    assert assess(q, [Passage(n=1, text="丙烯颜料溶于水。丙烯颜料溶于汽油。")]).evidence(1)[0].text == "丙烯颜料溶于汽油。"
    q = prepare_question("The Pleistocene epoch takes place during which period?", flat_doc_freqs)
    text = "The timeline shows eras. The Pleistocene (P) epoch. Q stands for the Quaternary period."
    assert "Quaternary" in assess(q, [Passage(n=1, text=text)]).evidence(1)[0].text


def test_a_number_that_labels_a_part_of_a_text_or_a_law_is_no_amount():
    from kb.evidence import type_candidates

    def numbers(text):
        return [text[a:b] for a, b in type_candidates(text, "number", "How much is the surety bond?")]

    assert numbers("11 U.S.C. § 322 Surety Bond") == []
    assert "".join(numbers("See chapter 13 and Figure 2: the bond is 5,000 dollars.")) == "5000"  # digit by digit
    q = prepare_question("How much is the surety bond?", flat_doc_freqs)
    text = "11 U.S.C. § 322 Surety Bond\n\nThe surety bond costs 2,500 dollars a year."
    assert assess(q, [Passage(n=1, text=text)]).evidence(1)[0].text == "The surety bond costs 2,500 dollars a year."


def test_a_heading_in_capitals_and_a_pointer_elsewhere_are_not_evidence():
    """Over the shared Word handbook "How is the percentage fee calculated?" was answered with the heading
    "D. CALCULATION AND COLLECTION OF PERCENTAGE FEE" (it holds "collection", which the question lacks) and the
    pointer "See also Chapter 2, section D, Calculation and Collection of Percentage Fee."."""
    heading = ("D. CALCULATION AND COLLECTION OF PERCENTAGE FEE\n\nThe standing trustee is authorized to collect "
               "the percentage fee upon receipt of the payment. The fee is calculated on all receipts.")
    pointer = "Disbursements are made monthly. See also Chapter 2, section D, Calculation and Collection of Percentage Fee."
    q = prepare_question("How is the percentage fee calculated?", flat_doc_freqs)
    evidence = assess(q, [Passage(n=1, text=pointer), Passage(n=2, text=heading)]).evidence(2)
    assert evidence[0].text in ("The standing trustee is authorized to collect the percentage fee upon receipt of "
                                "the payment.", "The fee is calculated on all receipts.")
    assert all("PERCENTAGE FEE" not in e.text and not e.text.startswith("See also") for e in evidence)
    # a Chinese sentence that names acronyms is no heading; "详见第三章" points elsewhere
    q = prepare_question("印度有哪些考试委员会？", flat_doc_freqs)
    text = "详见第三章：考试委员会。在多个州都有著名的考试委员会，分别是 CBSE 和CISCE，NENBSE"
    assert assess(q, [Passage(n=1, text=text)]).evidence(1)[0].text.startswith("在多个州都有著名的考试委员会")


def test_a_sentence_in_the_question_s_own_words_wins_a_tie(monkeypatch):
    import kb.evidence

    text = "Museum origins: world fair objects were shown here in 1857. The museum has its origins in the world fair of 1851."
    q = prepare_question("The museum has its origins in which world fair?", flat_doc_freqs)
    assert select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.endswith("of 1851.")
    monkeypatch.setitem(kb.evidence.WEIGHTS, "wording", 0.0)
    assert not select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.endswith("of 1851.")


def test_chinese_answer_types_are_not_fooled_by_topic_words():
    assert answer_type("杜瓦在哪一年开展液氧实验?") == "date"  # 在哪 opens 哪一年, not a place
    assert answer_type("什么用于计算物体的横截面积？") is None  # 面积 is the topic, not "how large"
    assert answer_type("他几乎每天做什么？") is None  # 几乎: almost
    assert answer_type("哪一位胡格诺派后裔成为了武器制造商?") == "person"
    assert answer_type("他在哪里出生？") == "place" and answer_type("人口占百分之几？") == "number"


def test_a_definition_question_prefers_the_sentence_that_defines_the_term(monkeypatch):
    import kb.evidence
    from kb.evidence import defines, definition_subject

    assert definition_subject("翼尖小翼是什么？") == "翼尖小翼" and definition_subject("什么是羊水栓塞？") == "羊水栓塞"
    assert definition_subject("What is a winglet?") == "winglet"
    assert definition_subject("那须盐原车站的原名是什么？") is None  # an attribute, not a definition
    assert definition_subject("What is the capital of Peru?") is None
    assert defines("<br>翼尖小翼（winglet），又称翼梢小翼。", "翼尖小翼") and defines("A winglet is a device.", "winglet")
    assert not defines("除了飞机以外，赛车也会装上翼尖小翼。", "翼尖小翼")
    text = ("除了飞机以外，现今大多数赛车也会在后扰流器两端装上翼尖小翼。军机亦无翼尖小翼的设计。"
            "翼尖小翼，又称作翼梢小翼，通常用于提高航空器机翼的效率。")
    q = prepare_question("翼尖小翼是什么？", flat_doc_freqs)
    assert select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("翼尖小翼，又称作")
    monkeypatch.setitem(kb.evidence.WEIGHTS, "defines", 0.0)
    assert not select_evidence(assess(q, [Passage(n=1, text=text)]).scored, 1)[0].text.startswith("翼尖小翼，又称作")


def test_an_extractive_answer_quotes_the_runner_up_only_when_it_scores_almost_as_well():
    from kb.answer import SECOND_QUOTE, extractive_text
    from kb.evidence import Evidence

    best = Evidence(n=1, text="体呈淡蓝红色。", start=0, end=7, score=1.0)
    close = Evidence(n=2, text="尾鳍外缘金黄色。", start=0, end=8, score=SECOND_QUOTE)
    far = Evidence(n=2, text="尾鳍外缘金黄色。", start=0, end=8, score=SECOND_QUOTE - 0.01)
    assert extractive_text([best, close]) == "体呈淡蓝红色。 [1] 尾鳍外缘金黄色。 [2]"
    assert extractive_text([best, far]) == "体呈淡蓝红色。 [1]"
    linked = Evidence(n=4, text="It is the anniversary of [Rust 1.0](https://blog.rust-lang.org/2015/05/15/Rust-1.0/)!",
                      start=5, end=90, score=1.0)
    assert extractive_text([linked]) == "It is the anniversary of Rust 1.0! [4]"
    english = [Evidence(n=1, text="- It eats **ants**.", start=0, end=19, score=0.9),
               Evidence(n=3, text="It eats termites.", start=0, end=17, score=0.8)]
    assert extractive_text(english) == "It eats ants. [1] It eats termites. [3]"
    # two sentences of one passage read in its order, cited once; left-out text between them is marked
    after = Evidence(n=1, text="头部有网状斑点。", start=7, end=15, score=1.0)
    before = Evidence(n=1, text="体呈淡蓝红色。", start=0, end=7, score=0.9)
    assert extractive_text([after, before]) == "体呈淡蓝红色。头部有网状斑点。 [1]"
    later = Evidence(n=3, text="It eats termites.", start=30, end=47, score=1.0)
    earlier = Evidence(n=3, text="It lives in Asia.", start=0, end=17, score=0.9)
    assert extractive_text([later, earlier]) == "It lives in Asia. … It eats termites. [3]"
    assert extractive_text([]) == ""
    # a passage that begins inside a sentence (neighbouring passages overlap) is shown with "…" before it
    fragment = Evidence(n=2, text="paid days off that an employee can carry over.", start=0, end=46, score=1.0)
    assert extractive_text([fragment]) == "…paid days off that an employee can carry over. [2]"
    fragment.start = 10
    assert extractive_text([fragment]) == "paid days off that an employee can carry over. [2]"
    # a PDF page that ended on "【强": the next page's passage opens with a bracket it never opened
    cut = Evidence(n=1, text="制】线程资源必须通过线程池提供。", start=0, end=16, score=1.0)
    assert extractive_text([cut]) == "…制】线程资源必须通过线程池提供。 [1]"
    whole = Evidence(n=1, text="【强制】线程资源必须通过线程池提供。", start=0, end=18, score=1.0)
    listed = Evidence(n=1, text="1) Install the package.", start=0, end=23, score=1.0)
    assert [extractive_text([e])[0] for e in (whole, listed)] == ["【", "1"]


def test_a_chinese_sentence_without_its_subject_speaks_of_the_passage_s_topic(monkeypatch):
    """Chinese drops the subject once the passage has named it: "经济以矿业为支柱" is about 冷湖行政区's economy
    although only the other sentences name the place (a rare name, which outweighs 经济 in them)."""
    import kb.evidence

    def doc_freqs(terms):
        return 1000, {t: 2 if t in ("冷湖", "湖行", "行政", "政区") else 100 if len(t) == 2 else 300 for t in terms}

    text = ("冷湖行政区是青海省海西州下辖的一个县级行政区，中国重要矿区之一。冷湖行政区气候恶劣，终年寒冷多风。"
            "经济以矿业为支柱，尤以石油开采为重要。冷湖行政区总面积1.8万平方公里。")
    q = prepare_question("冷湖行政区的经济主要是由什么支撑的？", doc_freqs)
    scored = {e.text: e.score for e in assess(q, [Passage(n=1, text=text)]).scored}
    monkeypatch.setattr(kb.evidence, "TOPIC", 0.0)
    without = {e.text: e.score for e in assess(q, [Passage(n=1, text=text)]).scored}
    aspect = "经济以矿业为支柱，尤以石油开采为重要。"
    assert max(scored, key=scored.get) == aspect and max(without, key=without.get) != aspect
    first = text[:text.index("。") + 1]  # it inherits nothing
    assert scored[first] == pytest.approx(without[first])


def test_a_question_about_another_name_finds_the_sentence_that_gives_it(monkeypatch):
    """"蓍的别名是什么？" is answered by "蓍，又名欧蓍、千叶蓍 ..." (又名, not 别名), not by another plant's 别名."""
    q = prepare_question("蓍的别名是什么？", lambda terms: (1000, {t: 2 if t == "蓍" else 50 for t in terms}))
    other = Passage(n=1, text="夜来香是萝藦科夜来香属的植物，别名“夜香花”、“夜兰香”。")
    right = Passage(n=2, text="蓍，又名欧蓍、千叶蓍、锯草，是菊科蓍属的植物。分布于北半球。")
    best = select_evidence(assess(q, [other, right]).scored, 1)[0]
    assert best.n == 2 and best.text.startswith("蓍，又名")
    assert any(best.text[a:b] == "又名" for a, b in best.matches)
    import kb.evidence

    # a highlighted alias is as wide as the question's term (see _match_spans): every alias is two characters
    assert {len(kb.evidence.term_units(a)) for a in kb.evidence._ALIASES} == {2}
    monkeypatch.setattr(kb.evidence, "_SAME_WORD", {})
    assert select_evidence(assess(q, [other, right]).scored, 1)[0].n == 1


def test_a_passage_that_starts_further_into_its_section_speaks_of_the_section_s_lead():
    """A later chunk of an article ("功能发汗退热、消肿解毒。") never names its subject; with its section's lead it
    answers a question about that subject ahead of a sentence about something else that shares the aspect's word."""
    q = prepare_question("短叶水蜈蚣有哪些功能？", flat_doc_freqs)
    later = "叶片呈线形，边缘平滑。功能发汗退热、消肿解毒。"
    other = Passage(n=1, text="这款手机的功能很多，可以拍照和导航。", rank=0)
    with_lead = Passage(n=2, text=later, rank=1, lead="短叶水蜈蚣是莎草科水蜈蚣属的植物。")
    scored = assess(q, [other, with_lead]).scored
    assert (scored[0].n, scored[0].text) == (2, "功能发汗退热、消肿解毒。")
    assert scored[0].score > 2 * next(e.score for e in scored if e.n == 1)
    without = assess(q, [other, Passage(n=2, text=later, rank=1)]).scored  # nothing ties it to 短叶水蜈蚣
    assert without[0].score < 0.5 * scored[0].score
