from pathlib import Path

import pytest

from ingest.parse import parse_file
from ingest.text_formats import split_front_matter
from kb.errors import EmptyDocument, UnsupportedFile


def test_yaml_front_matter_becomes_metadata_not_text():
    meta, body, warnings = split_front_matter("---\ntitle: T\ndate: 2024-01-02\ntags: [a, b]\nauthor: Ann\n---\nBody\n")
    assert meta["title"] == "T" and meta["date"] == "2024-01-02"
    assert meta["tags"] == ["a", "b"] and meta["authors"] == ["Ann"]
    assert body.strip() == "Body" and not warnings


def test_toml_front_matter_with_nested_tables():
    meta, body, _ = split_front_matter('+++\ntitle = "T"\n[extra]\nauthors = ["X"]\n+++\nBody')
    assert meta["title"] == "T" and meta["authors"] == ["X"]
    assert "title" not in body


def test_broken_front_matter_is_a_warning_and_kept_out_of_text():
    meta, body, warnings = split_front_matter("---\ntitle: [unclosed\n---\nBody")
    assert "title" not in meta and body.strip() == "Body" and warnings


def test_markdown_sections_follow_headings_and_ignore_fenced_code(tmp_path):
    f = tmp_path / "a.md"
    f.write_text("# Title\n\nintro\n\n## One\n\ntext one\n\n```sh\n# not a heading\n```\n\n### Deep\n\ndeep text\n\n"
                 "Two\n---\n\nsetext text\n")
    doc = parse_file(f, "markdown")
    assert doc.title == "Title"
    by_text = {s.text.split("\n")[0]: s.headings for s in doc.sections}
    assert by_text["intro"] == []
    assert by_text["text one"] == ["One"]
    assert any("# not a heading" in s.text for s in doc.sections)
    assert by_text["deep text"] == ["One", "Deep"]
    assert by_text["setext text"] == ["Two"]


def test_rst_headings(tmp_path):
    f = tmp_path / "a.rst"
    f.write_text("=====\nGuide\n=====\n\nIntro.\n\nInstall\n-------\n\nRun it.\n")
    doc = parse_file(f, "rst")
    assert doc.title == "Guide"
    assert [s.headings for s in doc.sections] == [[], ["Install"]]


def test_plain_text_chapters_and_sections_are_headings(tmp_path):
    """A regulation or a manual saved as .txt marks its parts in words; those lines are headings, and a sentence
    that names a chapter is not one."""
    f = tmp_path / "手册.txt"
    f.write_text("员工手册\n\n第一章 总则\n\n第一条 为规范公司管理，制定本手册。\n\n第二章休假制度\n\n第一节 年假\n\n"
                 "第三条 员工工作满一年后享有五天带薪年假。\n\n第二节　病假\n\n第四条 病假须提供医院证明。\n第二章所述假期均须提前申请。\n\n"
                 "Chapter 3: Expenses\nHotels are reimbursed up to 500 yuan a night.\nSection 2 applies to all staff.\n",
                 encoding="utf-8")
    sections = [(s.headings, s.text) for s in parse_file(f, "text").sections]
    assert sections == [
        ([], "员工手册"),
        (["第一章 总则"], "第一条 为规范公司管理，制定本手册。"),
        (["第二章休假制度", "第一节 年假"], "第三条 员工工作满一年后享有五天带薪年假。"),
        (["第二章休假制度", "第二节 病假"], "第四条 病假须提供医院证明。\n第二章所述假期均须提前申请。"),
        (["Chapter 3: Expenses"], "Hotels are reimbursed up to 500 yuan a night.\nSection 2 applies to all staff."),
    ]


def test_gbk_chinese_text_is_decoded(tmp_path):
    f = tmp_path / "zh.txt"
    text = "这是一个用GBK编码保存的中文文件，kb 应该能够正确地读取它的内容，而不是乱码。" * 3
    f.write_bytes(text.encode("gbk"))
    doc = parse_file(f, "text")
    assert "GBK编码" in doc.sections[0].text


def test_zero_byte_file_is_empty(tmp_path):
    f = tmp_path / "empty.md"
    f.write_bytes(b"")
    with pytest.raises(EmptyDocument):
        parse_file(f, "markdown")


def test_binary_named_md_is_refused(tmp_path):
    f = tmp_path / "photo.md"
    f.write_bytes(bytes(range(256)) * 50)
    with pytest.raises(UnsupportedFile, match="binary"):
        parse_file(f, "markdown")


def test_front_matter_only_is_empty(tmp_path):
    f = tmp_path / "index.md"
    f.write_text("+++\ntitle = \"x\"\n+++\n")
    with pytest.raises(EmptyDocument):
        parse_file(f, "markdown")


def test_html_title_and_headings(tmp_path):
    f = tmp_path / "p.html"
    f.write_text("<html><head><title>Page T</title></head><body><h1>Top</h1><p>First paragraph here.</p>"
                 "<h2>Sub</h2><p>Second paragraph here.</p></body></html>")
    doc = parse_file(f, "html")
    assert doc.title == "Page T"
    texts = " ".join(s.text for s in doc.sections)
    assert "First paragraph" in texts and "Second paragraph" in texts
    assert any("Sub" in s.headings for s in doc.sections)


PAGE = """<html><head><meta charset="utf-8"><title>Harbour news</title><script>var ad = "BUY NOW";</script></head>
<body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/sport">Sport</a></li></ul></nav>
<header class="site-header"><a href="/">The Harbour Gazette</a> <a href="/login">Log in</a></header>
<div class="content">
  <article>
    <h1>Dredging finished</h1>
    <p>The channel was dredged to fourteen metres this year, so that larger ships can berth at the quay without
       waiting for the tide. The work took eleven months and cost less than planned.</p>
    <h2>Ships that called</h2>
    <ul><li><a href="/s/1">Aurora</a></li><li><a href="/s/2">Borealis</a></li></ul>
    <p hidden>Subscribe to our newsletter for more.</p>
  </article>
  <div class="sidebar"><h3>Most popular</h3><p>Celebrity chef opens a bakery in the old customs house.</p></div>
  <ul class="links"><li><a href="/a">Weather warning for the weekend</a></li>
      <li><a href="/b">Ferry timetable changes</a></li><li><a href="/c">Council votes on parking</a></li></ul>
  <div class="share-buttons"><a href="#">Share on social media</a></div>
  <section id="comments"><p>Great news, finally! posted by a reader</p></section>
</div>
<footer>Copyright 2026 The Harbour Gazette. All rights reserved.</footer>
</body></html>"""


def test_html_keeps_the_page_s_own_content_not_its_menus_ads_and_link_lists(tmp_path):
    f = tmp_path / "news.html"
    f.write_text(PAGE, encoding="utf-8")
    doc = parse_file(f, "html")
    text = " ".join(" ".join(s.headings) + " " + s.text for s in doc.sections)
    for kept in ("Dredging finished", "fourteen metres", "Aurora", "Borealis"):  # the article and its own list
        assert kept in text, kept
    for dropped in ("Sport", "Log in", "Celebrity chef", "Ferry timetable", "Share on social", "Great news",
                    "Copyright", "Subscribe", "BUY NOW"):
        assert dropped not in text, dropped


def test_html_and_word_tables_keep_their_rows(tmp_path):
    """A table is a line per row ("| Capital | Wellington |"), not one run of words: a row is a unit of evidence."""
    f = tmp_path / "infobox.html"
    f.write_text("<html><body><h1>New Zealand</h1><p>An island country in the south-western Pacific Ocean.</p>"
                 "<table><tr><th>Capital</th><td>Wellington</td></tr><tr><th>Largest city</th><td>Auckland</td></tr>"
                 "</table></body></html>", encoding="utf-8")
    text = "\n".join(s.text for s in parse_file(f, "html").sections)
    assert "| Capital | Wellington |\n| Largest city | Auckland |" in text
    from kb.evidence import split_sentences

    assert "| Largest city | Auckland |" in [text[a:b] for a, b in split_sentences(text)]


def test_html_pages_in_other_encodings_are_decoded():
    """UTF-8 first; else the charset the page declares; else kb's detection (GBK without a declaration)."""
    from ingest.html_main import decode

    text = "<html><body><p>番茄是喜光植物，每天需要六到八个小时的直射阳光，夏天要多浇水。</p></body></html>"
    assert decode(text.encode("utf-8")) == text
    assert decode(text.encode("gb18030")) == text
    declared = "<html><head><meta charset='windows-1252'></head><body><p>Caf\u00e9 cr\u00e8me</p></body></html>"
    assert decode(declared.encode("cp1252")) == declared


def test_a_gbk_page_has_a_chinese_title_and_text(tmp_path):
    """The title comes from the decoded page: it read "��˾����" for a GB2312 page whose text was right."""
    f = tmp_path / "news.html"
    f.write_bytes('<html><head><meta http-equiv="Content-Type" content="text/html; charset=gb2312"><title>公司新闻'
                  '</title></head><body><h1>研发中心</h1><p>本公司于二零二三年三月在上海成立了新的研发中心，员工人数达到二百人。'
                  '</p></body></html>'.encode("gbk"))
    doc = parse_file(f, "html")
    assert doc.title == "公司新闻"
    assert "员工人数达到二百人" in doc.sections[0].text and doc.sections[0].headings == ["研发中心"]


def test_html_the_rules_never_empty_a_page(tmp_path):
    """A page whose every block has a class the rules distrust keeps its text (parsed whole)."""
    import ingest.html_main as html_main

    f = tmp_path / "odd.html"
    f.write_text("<html><body><div class='comment-wrapper'><p>" + "The only text of this page is here. " * 20
                 + "</p></div></body></html>", encoding="utf-8")
    assert html_main.main_content(f.read_text()) is None  # the rules would keep too little: whole page instead
    assert "The only text of this page" in " ".join(s.text for s in parse_file(f, "html").sections)


def test_shared_web_pages_lose_their_boilerplate_by_the_main_path():
    """On real pages (../shared): the main-content path ran (no fallback) and removed what is not the article."""
    html = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "html"
    if not html.is_dir():
        pytest.skip("needs ../shared/data")
    import ingest.html_main as html_main

    for name in ("breitbart.html", "wikipedia-2.html", "youth.html"):
        assert html_main.main_content(html_main.decode((html / name).read_bytes())) is not None, name
    text = " ".join(s.text for s in parse_file(html / "breitbart.html", "html").sections)
    assert "a writer for partisan" in text and "FROM THE HOMEPAGE" not in text and "MOST POPULAR" not in text
    wiki = parse_file(html / "wikipedia-2.html", "html")
    assert not any("Navigation menu" in " > ".join(s.headings) for s in wiki.sections)
    assert "Wellington" in " ".join(s.text for s in wiki.sections)


def test_pdf_without_text_layer_says_so(tmp_path):
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    doc.new_page(200, 200)
    f = tmp_path / "scan.pdf"
    doc.save(str(f))
    with pytest.raises(EmptyDocument, match="no text layer"):
        parse_file(f, "pdf")  # OCR ran and found nothing either
    with pytest.raises(EmptyDocument, match="no text layer"):
        parse_file(f, "pdf", ocr=False)


def test_corrupt_pdf_is_refused(tmp_path):
    f = tmp_path / "bad.pdf"
    f.write_bytes(b"%PDF-1.4\n" + b"garbage" * 100)
    with pytest.raises(UnsupportedFile):
        parse_file(f, "pdf")


def test_docx(tmp_path):
    docx = pytest.importorskip("docx")
    d = docx.Document()
    d.add_heading("Handbook", 1)
    d.add_paragraph("Employees receive twenty days of paid leave.")
    f = tmp_path / "h.docx"
    d.save(f)
    doc = parse_file(f, "docx")
    assert "twenty days" in " ".join(s.text for s in doc.sections)


def test_word_and_html_are_read_without_guessing_from_words(tmp_path, monkeypatch):
    """Headings come from Word's styles and HTML's heading tags, tables row by row; unstructured's guess of
    whether an unstyled paragraph is narrative text (spaCy's tagger and parser: 85% of the time of reading a
    Word file or a web page, and an outcome kb reads alike) is not run."""
    docx = pytest.importorskip("docx")
    d = docx.Document()
    d.core_properties.title = "Staff  handbook"
    d.add_heading("Leave", 1)
    d.add_paragraph("Employees receive twenty days of paid leave. Unused days expire in March.")
    d.add_paragraph("hr@example.com")
    d.add_heading("Equipment", 1)
    d.add_paragraph("Laptops are replaced every three years.")
    table = d.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, (("Item", "Budget"), ("Monitor", "300 EUR"))):
        for cell, text in zip(row.cells, cells):
            cell.text = text
    word = tmp_path / "handbook.docx"
    d.save(word)
    page = tmp_path / "leave.html"
    page.write_text("<html><head><title>Leave policy</title></head><body><main><h1>Leave</h1>"
                    "<p>Employees receive twenty days of paid leave. Unused days expire in March.</p>"
                    "<h2>Sick days</h2><div>Sick days need a doctor's note after three days.</div>"
                    "<table><tr><th>Item</th><th>Budget</th></tr><tr><td>Monitor</td><td>300 EUR</td></tr></table>"
                    "</main></body></html>", encoding="utf-8")
    from ingest.rich_formats import unstructured_ready

    unstructured_ready()
    from unstructured.nlp import tokenize

    def no_spacy():
        raise AssertionError("spaCy ran while a Word file or a web page was read")

    monkeypatch.setattr(tokenize, "_get_nlp", no_spacy)
    doc = parse_file(word, "docx")
    assert doc.title == "Staff handbook"
    by_heading = {tuple(s.headings): s.text for s in doc.sections}
    assert "twenty days" in by_heading[("Leave",)] and "hr@example.com" in by_heading[("Leave",)]
    assert "| Monitor | 300 EUR |" in by_heading[("Equipment",)]
    doc = parse_file(page, "html")
    assert doc.title == "Leave policy"
    by_heading = {tuple(s.headings): s.text for s in doc.sections}
    assert "twenty days" in by_heading[("Leave",)]
    assert "doctor's note" in by_heading[("Leave", "Sick days")]
    assert "| Monitor | 300 EUR |" in by_heading[("Leave", "Sick days")]


def test_word_headings_by_outline_level_and_custom_heading_styles(tmp_path):
    """A template's own heading styles ("标题 1" based on Heading 1, "章节标题" with an outline level) and a
    paragraph given an outline level directly are headings; outline level 9 is body text."""
    docx = pytest.importorskip("docx")
    from docx.enum.style import WD_STYLE_TYPE
    from docx.oxml import OxmlElement
    from docx.oxml.ns import qn

    def outline(element, level: int) -> None:
        node = OxmlElement("w:outlineLvl")
        node.set(qn("w:val"), str(level))
        element.get_or_add_pPr().append(node)

    d = docx.Document()
    d.styles.add_style("标题 1", WD_STYLE_TYPE.PARAGRAPH).base_style = d.styles["Heading 1"]
    outline(d.styles.add_style("小节标题", WD_STYLE_TYPE.PARAGRAPH).element, 1)
    d.add_paragraph("第一章 考勤制度", style="标题 1")
    d.add_paragraph("每天工作八小时，上午九点上班。")
    d.add_paragraph("迟到", style="小节标题")
    d.add_paragraph("迟到超过三十分钟按旷工半天处理。")
    outline(d.add_paragraph("第二章 休假制度")._p, 0)
    outline(d.add_paragraph("员工每年享有五天带薪年假。")._p, 9)
    f = tmp_path / "手册.docx"
    d.save(f)
    by_heading = {tuple(s.headings): s.text for s in parse_file(f, "docx").sections}
    assert by_heading == {("第一章 考勤制度",): "每天工作八小时，上午九点上班。",
                          ("第一章 考勤制度", "迟到"): "迟到超过三十分钟按旷工半天处理。",
                          ("第二章 休假制度",): "员工每年享有五天带薪年假。"}
