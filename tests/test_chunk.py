import pytest

from ingest.chunk import chunk_document, split_text
from kb.embedder import Tokenizer, bundled_embedder_path
from kb.types import ParsedDocument, Section


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(bundled_embedder_path())


def _doc(text, title="T", headings=()):
    return ParsedDocument(path="x", file_type="text", title=title, sections=[Section(text=text, headings=list(headings))])


def test_every_chunk_fits_the_model_with_its_prefix(tok):
    text = "\n\n".join(f"Paragraph {i}. " + "Some words that repeat in a sentence. " * (i % 17 + 1) for i in range(60))
    chunks = chunk_document(_doc(text, headings=["A heading"]), tok, 254, 32)
    assert len(chunks) > 5
    for c in chunks:
        assert tok.count(c.embed_text) <= 254
        assert c.embed_text.startswith("T > A heading\n")
        assert c.chunk.heading == "A heading"


def test_chunks_cover_all_text_in_order(tok):
    words = [f"w{i}" for i in range(3000)]
    text = " ".join(words)
    pieces = [t for t, _ in split_text(text, tok, 100, 0)]
    assert " ".join(pieces).split() == words


def test_overlap_repeats_a_little_of_the_previous_chunk(tok):
    text = ". ".join(f"Sentence number {i} is here" for i in range(200))
    pieces = [t for t, _ in split_text(text, tok, 60, 16)]
    for a, b in zip(pieces, pieces[1:]):
        assert b[:15] in a  # the next chunk begins inside the previous one
        assert tok.count(b) <= 60


def test_chinese_without_spaces_is_cut_within_limit_at_sentence_ends(tok):
    text = "番茄是喜光植物，每天至少需要六到八个小时的直射阳光。" * 200
    chunks = chunk_document(_doc(text, title="番茄"), tok, 254, 32)
    assert len(chunks) > 3
    for c in chunks:
        assert tok.count(c.embed_text) <= 254
    assert chunks[0].chunk.text.endswith("。")


def test_overlap_does_not_start_inside_a_wrapped_chinese_word(tok):
    """The next passage repeats the end of the last one from a word boundary, and a line break inside Chinese
    text (a PDF's wrapped line, "【强\n制】") is none: starting there quoted "制】线程资源..."."""
    rule = "【强\n制】线程资源必须通过线程池提供，不允许在应用中自行显\n式创建线程。"
    text = "".join(f"{i}.{rule}" for i in range(1, 40))
    pieces = [t for t, _ in split_text(text, tok, 80, 24)]
    assert len(pieces) > 5
    for piece in pieces[1:]:
        assert not piece.startswith(("制】", "式创建")), piece[:10]


def test_single_huge_line_without_punctuation(tok):
    text = "x" + "abc def " * 100_000
    pieces = split_text(text, tok, 254, 0)
    assert all(n <= 254 for _, n in pieces)
    assert sum(len(t.split()) for t, _ in pieces) == len(text.split())


def test_long_heading_prefix_is_capped(tok):
    chunks = chunk_document(_doc("body text", title="word " * 400), tok, 254, 32)
    assert tok.count(chunks[0].embed_text) <= 254
    assert "body text" in chunks[0].embed_text


def test_a_table_of_contents_is_not_indexed(tok):
    from ingest.chunk import without_contents

    toc = "\n".join(f"Chapter {i} .................... {i * 7}" for i in range(1, 8))
    text = f"My Guide\n\nTable of Contents\n{toc}\n\nChapter 1\nThe guide begins here. It explains everything."
    assert without_contents(text) == "My Guide\n\n\nChapter 1\nThe guide begins here. It explains everything."
    # Word drops the tab before the page ("A. PURPOSE1-1"); chapter titles sit between the entries
    word = ("Table of Contents\n\nCHAPTER 1 - INTRODUCTION\n\nA. PURPOSE1-1\n\nB. ROLE OF THE TRUSTEE1-1\n\n"
            "CHAPTER 2 – APPOINTMENT\n\nA. ELIGIBILITY2-1\n\nB. RECRUITMENT2-1\n\nCHAPTER 1\n\nINTRODUCTION")
    assert without_contents(word).split() == ["CHAPTER", "1", "INTRODUCTION"]
    zh = "目录\n一、编程规约 ........ 1\n(一) 命名风格 ........ 1\n(二) 常量定义 ........ 3\n正文从这里开始。"
    assert without_contents(zh) == "正文从这里开始。"
    # what only looks like one stays: prices that go down, three entries with no "Contents" above them
    prices = "Menu\nEspresso ........ 4\nLatte ........ 5\nMocha ........ 3\nTea ........ 2\nCake ........ 6\nJuice ........ 5"
    assert without_contents(prices) == prices
    short = "Steps\nInstall ..... 1\nConfigure ..... 2\nRun ..... 3"
    assert without_contents(short) == short
    figures = "Revenue\n" + "\n".join(f"{year}    {100 + 10 * i}" for i, year in enumerate(range(2015, 2024)))
    assert without_contents(figures) == figures  # figures that go up, in columns
    chunks = chunk_document(ParsedDocument(path="x", file_type="pdf", title="T", sections=[
        Section(text=f"Table of Contents\n{toc}", headings=["Table of Contents"], page=1),
        Section(text="The guide begins here.", headings=["Chapter 1"], page=2)]), tok, 254, 32)
    assert [c.chunk.text for c in chunks] == ["The guide begins here."]
    # a contents page's title is no heading of what follows it ("目录 > 一、编程规约")
    chunks = chunk_document(ParsedDocument(path="x", file_type="pdf", title="T", sections=[
        Section(text="线程资源必须通过线程池提供。", headings=["目录", "一、编程规约"], page=3)]), tok, 254, 32)
    assert chunks[0].chunk.heading == "一、编程规约"
