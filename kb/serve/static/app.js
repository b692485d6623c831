// kb's web page: ask with streaming, evidence and sources, conversations, uploads, documents.
// Plain JavaScript served by kb itself: no build step, nothing loaded from elsewhere.
"use strict";

const TEXT = {
  en: {
    key: "API key", conversations: "Conversations", new: "New", documents: "Documents", add: "Add files",
    ask: "Ask", placeholder: "Ask your documents…", evidence: "Evidence", sources: "Sources", cited: "cited",
    refused: "Not in your documents", closest: "Closest evidence found", uploading: "Uploading",
    indexing: "Indexing", done: "Added", failed: "Failed", waiting: "Waiting for another ingest",
    delete: "Delete", confirmDelete: "Remove this document from the knowledge base?", documentsCount: "documents",
    chunks: "chunks", empty: "No documents yet: add some files.", needKey: "This server needs an API key.",
    thinking: "…", untitled: "(untitled)", page: "p.",
  },
  zh: {
    key: "API 密钥", conversations: "对话", new: "新对话", documents: "文档", add: "添加文件",
    ask: "提问", placeholder: "向你的文档提问…", evidence: "证据", sources: "来源", cited: "已引用",
    refused: "文档中没有答案", closest: "最接近的证据", uploading: "上传中", indexing: "索引中",
    done: "已添加", failed: "失败", waiting: "等待另一个导入完成", delete: "删除",
    confirmDelete: "从知识库中删除这个文档？", documentsCount: "个文档", chunks: "个片段",
    empty: "还没有文档：请添加文件。", needKey: "此服务器需要 API 密钥。", thinking: "…", untitled: "（无标题）",
    page: "第", 
  },
};
const LANG = (navigator.languages || [navigator.language || "en"]).some((l) => l.toLowerCase().startsWith("zh")) ? "zh" : "en";
const T = TEXT[LANG];
document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";

const $ = (id) => document.getElementById(id);
let conversationId = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = localStorage.getItem("kb-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(!(options.body instanceof FormData)), ...(options.headers || {}) } });
  if (response.status === 401) { $("key-box").hidden = false; throw new Error(T.needKey); }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

// --- answers ----------------------------------------------------------------------------------------

// A line break between two CJK characters wraps a line of a PDF: dropped, as Chinese puts no space between words
// (the offsets of `matches` stay those of `text`). Between two lines of a form ("购买方：..." / "金额合计：...")
// or before a list item ("（二）", "三、") it is no wrap and stays (kb.text.flatten does the same).
const CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef";
const CJK_WRAP = new RegExp(`([${CJK}])[^\\S\\n]*\\n\\s*(?=[${CJK}])`, "g");
const LABEL = /^\s*[^\s:：]{1,30}[:：]\s?\S/;
const TABLE_ROW = /^\s*\|.*\|\s*$/;
const TABLE_RULE = /^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$/;
const LIST_ITEM = /^\s*(?:[（(][一二三四五六七八九十\d]{1,3}[)）]|[一二三四五六七八九十]{1,3}、)/;

function startsUnit(text, before, after) {
  const start = text.lastIndexOf("\n", before) + 1;
  const end = text.indexOf("\n", after);
  const previous = text.slice(start, before + 1);
  const following = end < 0 ? text.slice(after) : text.slice(after, end);
  return LIST_ITEM.test(following) || (LABEL.test(previous) && LABEL.test(following));
}

const OPENERS = { "】": "【", "」": "「", "』": "『", "”": "“", "》": "《" };

function openedBefore(text) {
  const head = [...text.trimStart()].slice(0, 4);
  return head.some((ch, i) => ch in OPENERS && !head.slice(0, i).includes(OPENERS[ch]));
}

function highlight(text, matches) {
  const drop = new Set();
  for (const m of text.matchAll(CJK_WRAP)) {
    if (startsUnit(text, m.index, m.index + m[0].length)) continue;
    for (let i = m.index + 1; i < m.index + m[0].length; i++) drop.add(i);
  }
  // a table's rows each on a line; its markdown rule line (|---|---|) is not shown
  const breaks = new Set();
  let pos = 0, before = "";
  for (const line of text.split("\n")) {
    if (pos > 0 && TABLE_RULE.test(line)) {
      for (let i = pos - 1; i < pos + line.length; i++) drop.add(i);
    } else if (pos > 0 && (TABLE_ROW.test(line) || TABLE_ROW.test(before))) {
      breaks.add(pos - 1);
    }
    if (!TABLE_RULE.test(line)) before = line;
    pos += line.length + 1;
  }
  const piece = (a, b) => {
    const parts = [];
    let s = "";
    for (let i = a; i < b; i++) {
      if (drop.has(i)) continue;
      if (breaks.has(i)) {
        parts.push(s, el("br"));
        s = "";
      } else s += text[i];
    }
    parts.push(s);
    return parts;
  };
  const out = el("span");
  let last = 0;
  for (const [a, b] of matches || []) {
    out.append(...piece(last, a), el("mark", {}, ...piece(a, b)));
    last = b;
  }
  out.append(...piece(last, text.length));
  return out;
}

function whereText(source) {
  const parts = [source.path];
  if (source.page) parts.push(`${T.page} ${source.page}`);
  if (source.heading) parts.push(source.heading);
  return parts.join(" — ");
}

function renderEvidence(box, answer) {
  box.querySelectorAll(".evidence, .sources, .evidence-title").forEach((n) => n.remove());
  const byN = Object.fromEntries((answer.sources || []).map((s) => [s.n, s]));
  if ((answer.evidence || []).length) {
    box.append(el("div", { class: "where evidence-title" }, answer.refused ? T.closest : T.evidence));
    const list = el("ul", { class: "evidence", "data-testid": "evidence" });
    for (const e of answer.evidence) {
      const source = byN[e.n];
      // a passage may begin inside a sentence (neighbours overlap, a PDF page ends mid-sentence): "…" says words
      // come before it (kb.evidence.opens_mid_sentence: lower case, or "制】" with its "【" on the page before)
      const lead = e.start === 0 && (/^[^\p{L}]*\p{Ll}/u.test(e.text) || openedBefore(e.text)) ? "…" : "";
      list.append(el("li", {}, el("span", {}, `[${e.n}] ${lead}`), highlight(e.text, e.matches),
                     source ? el("div", { class: "where" }, whereText(source)) : ""));
    }
    box.append(list);
  }
  if (!answer.refused && (answer.sources || []).length) {
    const list = el("ol", { class: "sources", "data-testid": "sources" });
    for (const s of answer.sources) {
      list.append(el("li", { value: s.n, class: s.cited ? "cited" : "" },
                     `${s.title || s.path}${s.cited ? " ✓ " + T.cited : ""}`, el("div", { class: "where" }, whereText(s))));
    }
    box.append(list);
  }
}

function addMessage(role, text) {
  const box = el("div", { class: `message ${role}` });
  if (role === "user") box.append(text);
  else box.append(el("div", { class: "answer-text", "data-testid": "answer" }, text || ""));
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

async function ask(question) {
  addMessage("user", question);
  const box = addMessage("assistant", T.thinking);
  const textNode = box.querySelector(".answer-text");
  let text = "";
  try {
    const response = await fetch("/api/ask", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ question, chat: true, conversation_id: conversationId, stream: true }),
    });
    if (response.status === 401) { $("key-box").hidden = false; throw new Error(T.needKey); }
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error((data.error && data.error.message) || response.statusText);
    }
    // Server-sent events over fetch (EventSource cannot POST): events end with a blank line.
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue;
        const payload = JSON.parse(data.join("\n"));
        if (event === "start") {
          if (payload.conversation_id) conversationId = payload.conversation_id;
          if (payload.notice) box.prepend(el("div", { class: "notice" }, payload.notice));
          textNode.textContent = "";
        } else if (event === "token") {
          text += payload;
          textNode.textContent = text;
        } else if (event === "done") {
          textNode.textContent = payload.answer;
          if (payload.refused) { box.classList.add("refused"); box.prepend(el("div", { class: "notice" }, T.refused)); }
          if (payload.generated && payload.notice && !box.querySelector(".notice")) box.prepend(el("div", { class: "notice" }, payload.notice));
          renderEvidence(box, payload);
        } else if (event === "error") {
          throw new Error(payload.message);
        }
      }
    }
  } catch (error) {
    textNode.textContent = "";
    textNode.append(el("span", { class: "error" }, String(error.message || error)));
  }
  loadConversations();
}

// --- conversations ----------------------------------------------------------------------------------

async function loadConversations() {
  try {
    const data = await api("/api/conversations");
    const list = $("conversations");
    list.replaceChildren();
    for (const c of data.conversations) {
      const item = el("li", { class: "conversation" + (c.id === conversationId ? " active" : ""), onclick: () => openConversation(c.id) },
                      c.title || T.untitled);
      list.append(item);
    }
  } catch (error) { /* shown by the status line */ }
}

async function openConversation(id) {
  const data = await api(`/api/conversations/${id}`);
  conversationId = id;
  $("messages").replaceChildren();
  for (const m of data.messages) {
    const box = addMessage(m.role === "user" ? "user" : "assistant", m.content);
    if (m.role !== "user") renderEvidence(box, { sources: m.sources, evidence: [], refused: false });
  }
  loadConversations();
}

// --- documents and uploads --------------------------------------------------------------------------

async function loadDocuments() {
  const status = await api("/api/status");
  $("status").textContent = `${status.documents} ${T.documentsCount} · ${status.chunks} ${T.chunks}`;
  if (status.keys_required && !localStorage.getItem("kb-key")) $("key-box").hidden = false;
  const data = await api("/api/documents");
  const list = $("documents");
  list.replaceChildren();
  if (!data.documents.length) list.append(el("li", {}, T.empty));
  for (const d of data.documents) {
    list.append(el("li", { "data-path": d.path }, el("span", { title: d.path }, d.title || d.path.split("/").pop()),
      el("button", { class: "delete", title: T.delete, onclick: () => removeDocument(d.path) }, "×")));
  }
}

async function removeDocument(path) {
  if (!confirm(T.confirmDelete + "\n" + path)) return;
  try { await api(`/api/documents?path=${encodeURIComponent(path)}`, { method: "DELETE" }); }
  catch (error) { $("upload-status").textContent = error.message; }
  loadDocuments();
}

function upload(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const bar = $("upload-progress");
  const status = $("upload-status");
  bar.hidden = false;
  bar.value = 0;
  status.textContent = T.uploading;
  const request = new XMLHttpRequest();
  request.open("POST", "/api/documents");
  const auth = headers(false).Authorization;
  if (auth) request.setRequestHeader("Authorization", auth);
  request.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
  request.onload = () => {
    let data = {};
    try { data = JSON.parse(request.responseText); } catch (e) { /* not JSON */ }
    if (request.status !== 200) {
      bar.hidden = true;
      status.textContent = `${T.failed}: ${(data.error && data.error.message) || request.statusText}`;
      if (request.status === 401) $("key-box").hidden = false;
      return;
    }
    pollJob(data.job.id, data.problems || []);
  };
  request.onerror = () => { bar.hidden = true; status.textContent = T.failed; };
  request.send(form);
}

async function pollJob(id, problems) {
  const bar = $("upload-progress");
  const status = $("upload-status");
  const job = await api(`/api/jobs/${id}`);
  const p = job.progress || {};
  if (job.status === "done" || job.status === "failed") {
    bar.hidden = true;
    const report = job.report || {};
    const failed = (report.failed || []).map((f) => `${f.path.split("/").pop()}: ${f.reason}`);
    status.textContent = job.status === "failed" ? `${T.failed}: ${job.error}`
      : `${T.done}: ${(report.added || []).length + (report.updated || []).length}` +
        ([...problems, ...failed].length ? ` · ${T.failed}: ${[...problems, ...failed].join("; ")}` : "");
    loadDocuments();
    return;
  }
  if (job.status === "waiting") status.textContent = T.waiting;
  else if (p.files) {
    bar.value = (100 * (p.files_done || 0)) / p.files;
    status.textContent = `${T.indexing} ${p.files_done || 0}/${p.files} · ${p.chunks || 0} ${T.chunks}`;
  } else status.textContent = T.indexing;
  setTimeout(() => pollJob(id, problems), 400);
}

// --- start ----------------------------------------------------------------------------------------------

document.querySelectorAll("[data-i18n]").forEach((n) => { n.textContent = T[n.dataset.i18n]; });
document.querySelectorAll("[data-i18n-placeholder]").forEach((n) => { n.placeholder = T[n.dataset.i18nPlaceholder]; });
$("key").value = localStorage.getItem("kb-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("kb-key", $("key").value.trim()); loadDocuments(); loadConversations(); });
$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
});
$("new-chat").addEventListener("click", () => { conversationId = null; $("messages").replaceChildren(); loadConversations(); });
$("files").addEventListener("change", (e) => { if (e.target.files.length) upload(e.target.files); e.target.value = ""; });
loadDocuments().catch((error) => { $("status").textContent = error.message; });
loadConversations();
