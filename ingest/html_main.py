"""A saved web page's own content, without its menus, sidebars, ads, share buttons and comment threads.

A news page or a wiki article saved from a browser is mostly something else: on the shared HTML corpus
(mozilla/readability's test pages) 23% of the words unstructured read from a page were not in the article
that Readability's tests expect, and on some pages (a news site's "MOST POPULAR" and "FROM THE HOMEPAGE"
lists, a health site's ads) over 60%. Those words answer questions they have nothing to do with and push the
article's own passages down. kb removes, before parsing, what Readability's rules say is not content:

- elements that are never content (scripts, styles, forms' controls, navigation, asides, footers) and
  hidden ones (`hidden`, `aria-hidden="true"`, `display: none`);
- landmarks that are not the main one (`role="navigation"`, `banner`, `contentinfo`, `complementary`, ...);
- blocks whose class or id names them as something else (menu, sidebar, comment, share, related, sponsor,
  ... Readability's "unlikely candidates"), unless it also says content (article, main, body, column);
- lists and blocks that are mostly links with little text of their own (link lists, tag clouds).

If what remains is a small part of the page (under `MIN_SHARE` of its text), the rules misjudged it and the
page is parsed whole. `benchmarks/html_extract.py` measures this against Readability's expected output.
"""

from __future__ import annotations

import re

# From Readability.js (Mozilla, Apache-2.0): class/id words of blocks that are not the article, and of ones
# that may be, which win over them.
_UNLIKELY = re.compile(r"-ad-|ai2html|banner|breadcrumbs|combx|comment|community|cover-wrap|disqus|extra|footer|gdpr|"
                       r"header|legends|menu|related|remark|replies|rss|shoutbox|sidebar|skyscraper|social|"
                       r"sponsor|supplemental|ad-break|agegate|pagination|pager|popup|yom-remote|share|newsletter|"
                       r"promo|cookie|subscribe|masthead|navbar|toolbar|outbrain|taboola", re.I)
_MAYBE = re.compile(r"and|article|body|column|content|main|mathjax|shadow", re.I)
_NEVER = ("script", "style", "noscript", "template", "iframe", "nav", "aside", "footer", "button", "select",
          "textarea", "input", "label", "svg", "canvas", "object", "embed", "dialog", "menu")
_NOT_MAIN_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar",
                   "dialog", "alertdialog", "toolbar", "tablist"}
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.I)
_BLOCKS = ("ul", "ol", "div", "section", "table", "dl")
MIN_SHARE = 0.2  # below this share of the page's text, the rules misjudged the page: it is parsed whole
_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w-]+)""", re.I)


def decode(raw: bytes) -> str:
    """The page's text: UTF-8 when its bytes are that; else the charset the page declares, when its bytes
    decode in it; else what kb's text reader makes of them (byte-order marks, GBK and others detected)."""
    from ingest.text_formats import _decode

    if not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            declared = _CHARSET.search(raw[:4096])
            if declared:
                try:
                    return raw.decode(declared.group(1).decode("ascii"))
                except (LookupError, UnicodeDecodeError):
                    pass
    return _decode(raw) or raw.decode("utf-8", errors="replace")


def _text_length(el) -> int:
    return len(" ".join(el.text_content().split()))


def _linked_length(el) -> int:
    """How much of its text is the text of links."""
    return sum(_text_length(a) for a in el.iter("a"))


def _drop(el) -> None:
    """Remove an element but keep the text that follows it inside its parent."""
    parent = el.getparent()
    if parent is None:
        return
    tail = el.tail
    previous = el.getprevious()
    if tail:
        if previous is not None:
            previous.tail = (previous.tail or "") + tail
        else:
            parent.text = (parent.text or "") + tail
    parent.remove(el)


def _hidden(el) -> bool:
    return (el.get("hidden") is not None or el.get("aria-hidden", "").lower() == "true"
            or bool(_HIDDEN_STYLE.search(el.get("style", ""))))


def _holds_title(el) -> bool:
    return el.tag == "h1" or next(el.iter("h1"), None) is not None


def _in_content(el) -> bool:
    """Inside the page's article or main element (where a header or footer belongs to the article)."""
    return any(a.tag in ("article", "main") or a.get("role") == "main" for a in el.iterancestors())


def _unlikely(el) -> bool:
    names = f"{el.get('class', '')} {el.get('id', '')}"
    if not names.strip() or el.tag in ("html", "body", "article", "main", "a", "table", "tbody", "tr", "td", "th",
                                       "pre", "code"):
        return False
    return bool(_UNLIKELY.search(names)) and not _MAYBE.search(names) and not _holds_title(el)


_ARTICLE = re.compile(r"(?:^|[\s_-])(?:article|post|entry|story)(?:$|[\s_-])|(?:^|[\s_-])(?:post|entry|article|story)-?(?:body|content|text)", re.I)


def _beside_prose(el) -> bool:
    """Whether it is part of the article: inside an element that says it is one (`<article>`, class "article",
    "post-body" ...), or next to a paragraph of prose (a list of links the article introduces)."""
    for a in el.iterancestors():
        if a.tag == "article" or _ARTICLE.search(f"{a.get('class', '')} {a.get('id', '')}"):
            return True
    for near in (el.getprevious(), el.getnext()):
        if near is not None and near.tag == "p" and _text_length(near) - _linked_length(near) > 100:
            return True
    return False


def _link_list(el) -> bool:
    """A block that is mostly links: its linked text is over half of its text, its own prose is short, and no
    paragraph of prose introduces it."""
    total = _text_length(el)
    if not total:
        return False
    linked = _linked_length(el)
    own = total - linked
    prose = max((_text_length(p) for p in el.iter("p")), default=0)
    return linked / total > 0.5 and own < 200 and prose < 100 and not _holds_title(el) and not _beside_prose(el)


def _not_content(el) -> bool:
    role = (el.get("role") or "").lower()
    return (_hidden(el) or role in _NOT_MAIN_ROLES and not _holds_title(el)
            or el.tag == "header" and not _in_content(el) and not _holds_title(el) or _unlikely(el))


def _prune(el) -> None:
    """Drop the descendants of `el` that are not content, without looking inside those already dropped."""
    for child in list(el):
        if not isinstance(child.tag, str):
            continue
        if _not_content(child):
            _drop(child)
        else:
            _prune(child)


def main_content(html: str) -> str | None:
    """The page as HTML with what is not its content removed, or None when the rules would keep too little
    (then the page is parsed whole)."""
    import lxml.etree
    import lxml.html

    try:
        doc = lxml.html.document_fromstring(html)
    except Exception:  # lxml refuses some damaged pages; unstructured then reads the file itself and says why
        return None
    body = doc.find("body")
    if body is None:
        return None
    lxml.etree.strip_elements(doc, lxml.etree.Comment, with_tail=False)
    for el in list(doc.iter("script", "style", "noscript", "template")):  # code, not text: out of the measure too
        _drop(el)
    before = _text_length(body)
    if not before:
        return None
    for el in list(doc.iter(*_NEVER)):
        if el.tag == "footer" and _in_content(el):
            continue
        _drop(el)
    _prune(body)
    # bottom up, so that a link list inside a block of prose goes and the prose stays
    for el in reversed([e for e in body.iter(*_BLOCKS)]):
        if el.getparent() is not None and _link_list(el):
            _drop(el)
    if _text_length(body) < MIN_SHARE * before:
        return None
    return lxml.html.tostring(doc, encoding="unicode")
