"""The `kb` command line: parses options, calls the library, prints. Errors become one line and exit 1."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from kb.dataset import LEAVE_OUT_SHARE
from kb.errors import KBError
from kb.options import ANSWER, EMBEDDING, INGEST, MODEL, RETRIEVAL, STORE, filter_options, settings_options
from kb.text import flatten

HOME_OPTION = click.option(
    "--kb", "home", envvar="KB_HOME", type=click.Path(file_okay=False),
    help="Knowledge base folder (default ~/.kb; env KB_HOME).",
)
DEBUG_ENV = "KB_DEBUG"


def _fail(message: str, hint: str = "") -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    sys.exit(1)


def describe_error(error: BaseException) -> tuple[str, str]:
    """(one-line message, hint) for any exception, naming the file involved where there is one."""
    import sqlite3

    if isinstance(error, KBError):
        return str(error), error.hint
    if isinstance(error, sqlite3.DatabaseError):
        return (f"the knowledge base database is damaged or unreadable ({error})",
                "run `kb doctor` to check the home and repair or rebuild it")
    if isinstance(error, MemoryError):
        return "kb ran out of memory", "close other programs, or ingest fewer or smaller files at once"
    if isinstance(error, OSError):
        where = f": {error.filename}" if getattr(error, "filename", None) else ""
        return f"{error.strerror or error}{where}", "check that the path exists and kb may read and write it"
    if isinstance(error, UnicodeError):
        return f"text in an encoding kb could not read ({error})", "save the file as UTF-8 and try again"
    return (f"unexpected {type(error).__name__}: {error}",
            f"rerun with {DEBUG_ENV}=1 to see where it failed, and report it")


def translate_errors(fn):
    """Turn every error, and Ctrl-C, into a one-line message on stderr instead of a traceback
    (KB_DEBUG=1 shows the traceback of unexpected ones)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # the reader went away (`kb status -d | head`): stop quietly, as a process killed by SIGPIPE would,
            # with stdout pointed at /dev/null so that flushing it on the way out fails no more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as e:
            if os.environ.get(DEBUG_ENV) and not isinstance(e, KBError):
                raise
            _fail(*describe_error(e))

    return wrapper


def _open(home, settings: dict | None = None, **options):
    """The knowledge base a command works on, closed when the command ends (its database connection too, which
    folds SQLite's write-ahead log into the database file, also when the command runs inside a longer process)."""
    from kb.api import KnowledgeBase

    kb = KnowledgeBase(home, **{**(settings or {}), **options})
    context = click.get_current_context(silent=True)
    if context is not None:
        context.call_on_close(kb.close)
    return kb


class _WarningLine(logging.Handler):
    """kb's library warnings as one line each on stderr."""

    def emit(self, record):
        click.secho(f"Warning: {record.getMessage()}", fg="yellow", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kb-assistant")
def cli():
    """kb: ask questions of your own documents, privately, on your own machine."""
    logger = logging.getLogger("kb")
    if not any(isinstance(h, _WarningLine) for h in logger.handlers):
        logger.addHandler(_WarningLine(logging.WARNING))
        logger.propagate = False


# --- ingest ------------------------------------------------------------------------------------


def status_line(line: str, tty: bool) -> None:
    """Progress on stderr: rewritten in place on a terminal, one line each time otherwise."""
    click.echo(("\r" + line + "\033[K") if tty else line, nl=not tty, err=True)


class ProgressPrinter:
    """Ingest progress on stderr: one updating line on a terminal, a line every few seconds otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, event: dict) -> None:
        if self.quiet:
            return
        kind = event["event"]
        if kind == "parsing":  # a long PDF: its pages, so that a big file never looks stuck
            now = time.monotonic()
            if self.tty or now - self.last >= 5 or event["page"] == event["pages"]:
                self.last = now
                ocr = f" ({event['ocr_pages']} by OCR)" if event["ocr_pages"] else ""
                status_line(f"{os.path.basename(event['path'])}: page {event['page']}/{event['pages']}{ocr}", self.tty)
            return
        if kind == "start":
            click.echo(
                f"{event['files']} files to index ({event['unchanged']} unchanged, {event['removed']} removed)",
                err=True,
            )
        elif kind == "progress":
            now = time.monotonic()
            if not self.tty and now - self.last < 5 and event["files_done"] < event["files"]:
                return
            self.last = now
            line = (
                f"files {event['files_done']}/{event['files']} · chunks {event['chunks']} · "
                f"{event['files_per_s']:.1f} files/s · {event['chunks_per_s']:.1f} chunks/s"
            )
            status_line(line, self.tty)
        elif kind == "done" and self.tty:
            click.echo("", err=True)


def print_report(report) -> None:
    """The summary on stdout; failures and notes, like all diagnostics, on stderr."""
    click.echo(
        f"added {len(report.added)}, updated {len(report.updated)}, unchanged {len(report.unchanged)}, "
        f"removed {len(report.removed)}, failed {len(report.failed)}, skipped {len(report.skipped)}; "
        f"{report.chunks} chunks in {report.seconds:.1f} s",
    )
    for failure in report.failed:
        click.echo(f"  failed: {failure.path}: {failure.reason}", err=True)
    for path, reason in report.skipped_reasons.items():
        click.echo(f"  skipped: {path}: {reason}", err=True)
    for warning in report.warnings:
        click.echo(f"  note: {warning}", err=True)


WAIT_OPTION = click.option("--wait", type=float, default=0.0, show_default=True,
                           help="Seconds to wait if another process is writing to the knowledge base.")


def waiting(pid) -> None:
    click.echo(f"Waiting for another kb process (pid {pid}) to finish writing...", err=True)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@HOME_OPTION
@settings_options(STORE, EMBEDDING, INGEST)
@WAIT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@translate_errors
def ingest(paths, home, settings, wait, as_json, quiet):
    """Index files and folders (md, txt, rst, html, pdf, docx, and images by OCR), incrementally.

    Unchanged files are skipped, changed files replaced, files deleted from an ingested folder removed.
    Exits non-zero only when nothing could be ingested.
    """
    kb = _open(home, settings)
    report = kb.ingest(list(paths), progress=ProgressPrinter(quiet or as_json), wait=wait, on_wait=waiting)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        print_report(report)
    if not report.ok:
        _fail("nothing could be ingested", "see the reasons above")


@cli.command()
@click.argument("path", type=click.Path())
@HOME_OPTION
@settings_options(STORE)
@WAIT_OPTION
@translate_errors
def forget(path, home, settings, wait):
    """Remove a document (or every document under a folder) from the index."""
    removed = _open(home, settings).forget(path, wait=wait, on_wait=waiting)
    if not removed:
        _fail(f"no ingested document at {path}", "`kb status` shows what is indexed")
    click.echo(f"removed {len(removed)} document(s)")


# --- search ------------------------------------------------------------------------------------


def hit_location(hit) -> str:
    where = flatten(hit.heading or "")  # a Word heading may hold a tab ("D.\tEVALUATION")
    if hit.page:
        where = f"p. {hit.page}" + (f", {where}" if where else "")
    return where


@cli.command()
@click.argument("query")
@HOME_OPTION
@settings_options(STORE, EMBEDDING, RETRIEVAL)
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON.")
@translate_errors
def search(query, home, settings, filters, as_json):
    """Find the passages that best match QUERY."""
    hits = _open(home, settings).search(query, filters=filters)
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        click.echo("No matching passages.")
    for n, hit in enumerate(hits, 1):
        where = hit_location(hit)
        click.secho(f"[{n}] {hit.score:.3f}  {hit.title}" + (f" — {where}" if where else ""), bold=True)
        click.secho(f"    {hit.path}", fg="cyan")
        text = flatten(hit.text, rows=True)
        text = text[:400] + ("…" if len(text) > 400 else "")
        click.echo("    " + text.replace("\n", "\n    "))


# --- ask and chat --------------------------------------------------------------------------------


def source_line(source, *, closest: bool = False) -> str:
    where = hit_location(source)
    label = f"[{source.n}] {source.title or source.path}" + (f" — {where}" if where else "")
    mark = f"  (relevance {source.relevance:.2f})" if closest else ("  ✓ cited" if source.cited else "")
    return f"{label}{mark}\n    {source.path}"


def highlighted(text: str, matches) -> str:
    """`text` with the question's words in bold yellow (click drops the styling when not on a terminal)."""
    out, last = [], 0
    for a, b in matches:
        out.append(text[last:a])
        out.append(click.style(text[a:b], fg="yellow", bold=True))
        last = b
    out.append(text[last:])
    return flatten("".join(out), rows=True)


def print_evidence(answer, *, heading: str) -> None:
    from kb.evidence import opens_mid_sentence

    quotes = answer.quotes()
    if not quotes:
        return
    click.secho(f"\n{heading}", bold=True)
    by_n = {s.n: s for s in answer.sources}
    for quote in quotes:
        source = by_n.get(quote.n)
        lead = "…" if opens_mid_sentence(quote) else ""  # the passage begins inside a sentence
        text = highlighted(quote.text, quote.matches).replace("\n", "\n" + " " * (len(f"  [{quote.n}] “")))
        click.echo(f"  [{quote.n}] “{lead}{text}”")  # a table's rows each on a line, under the first
        if source is not None:
            where = hit_location(source)
            click.secho(f"      {source.path}" + (f" — {where}" if where else ""), fg="cyan")


def print_answer_stream(stream, *, live: bool) -> None:
    """Print an answer as it is generated (live) or at the end, then its evidence and sources, to stdout."""
    if stream.notice:
        click.secho(stream.notice, fg="yellow", err=True)
    if live:
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
    else:
        answer = stream.result()
        if answer.generated:
            click.secho(answer.notice, fg="yellow", err=True)
        click.echo(answer.text)
    answer = stream.answer
    if answer.refused:
        print_evidence(answer, heading="Closest evidence found (not enough to answer from):")
        if answer.sources:
            click.secho("\nClosest passages found:", bold=True)
            for source in answer.sources[:3]:
                click.echo(source_line(source, closest=True))
        return
    print_evidence(answer, heading="Evidence:")
    click.secho("\nSources:", bold=True)
    for source in answer.sources:
        click.echo(source_line(source))


@cli.command()
@click.argument("question")
@HOME_OPTION
@settings_options(STORE, EMBEDDING, MODEL, ANSWER, RETRIEVAL)
@filter_options
@click.option("--no-stream", is_flag=True, help="Print the answer only when it is complete.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object {answer, refused, extractive, evidence, sources, model, timings}.")
@translate_errors
def ask(question, home, settings, filters, no_stream, as_json):
    """Answer QUESTION from your documents, citing the passages used; refuse when they lack the answer."""
    stream = _open(home, settings).ask_stream(question, filters=filters)
    if as_json:
        click.echo(json.dumps(stream.result().to_dict(), ensure_ascii=False, indent=2))
        return
    print_answer_stream(stream, live=not no_stream and sys.stdout.isatty())


CHAT_HELP = "Commands: /sources, /reset, /persona NAME, /exit (or Ctrl-D)."


def _chat_error(e: KBError) -> None:
    click.echo(f"Error: {e}" + (f"\nHint: {e.hint}" if e.hint else ""), err=True)


@cli.command()
@HOME_OPTION
@settings_options(STORE, EMBEDDING, MODEL, ANSWER, RETRIEVAL)
@filter_options
@click.option("--continue", "resume", is_flag=True, help="Resume the most recent conversation.")
@translate_errors
def chat(home, settings, filters, resume):
    """A conversation with your documents; follow-up questions understand what came before."""
    persona = settings.pop("persona", None)
    conversation = _open(home, settings).chat(persona=persona, resume=resume)
    click.echo(f"kb chat (conversation {conversation.id}, persona {conversation.persona}). {CHAT_HELP}", err=True)
    live = sys.stdout.isatty()
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                conversation.reset()
                click.echo(f"New conversation {conversation.id}.", err=True)
            elif command == "/sources":
                for source in conversation.sources:
                    click.echo(source_line(source))
                if not conversation.sources:
                    click.echo("No sources yet.", err=True)
            elif command == "/persona" and arg.strip():
                try:
                    conversation.set_persona(arg.strip())
                    click.echo(f"Persona: {conversation.persona}.", err=True)
                except KBError as e:
                    _chat_error(e)
            else:
                click.echo(CHAT_HELP, err=True)
            continue
        try:
            stream = conversation.stream(line, filters=filters)
            if stream.notice:
                click.secho(stream.notice, fg="yellow", err=True)
            if live:
                click.echo("kb> ", nl=False)
            for piece in stream if live else [stream.result().text]:
                click.echo(piece, nl=False)
            click.echo()
        except KeyboardInterrupt:
            click.echo("\n(stopped; this answer was not kept)", err=True)
        except KBError as e:
            _chat_error(e)


@cli.command(name="log")
@HOME_OPTION
@settings_options(STORE)
@click.option("-n", "limit", type=int, default=10, show_default=True, help="How many recent asks.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@translate_errors
def log_command(home, settings, limit, as_json):
    """Recent questions with their answers, sources, model and timings."""
    entries = _open(home, settings).log(limit)
    if as_json:
        click.echo(json.dumps(entries, ensure_ascii=False, indent=2))
        return
    if not entries:
        click.echo("No questions asked yet.")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["at"]))
        mark = " (refused)" if e["refused"] else ""
        click.secho(f"#{e['id']} {when} {e['model'] or '-'}{mark}  {e['timings'].get('total_ms', 0) / 1000:.1f} s", bold=True)
        click.echo(f"  Q: {e['question']}")
        answer = flatten(e["answer"])
        click.echo(f"  A: {answer[:300]}{'…' if len(answer) > 300 else ''}")
        cited = [s for s in e["sources"] if s.get("cited")] or ([] if e["refused"] else e["sources"])
        for s in cited:
            click.echo(f"     [{s['n']}] {s['path']}")


@cli.command()
@HOME_OPTION
@translate_errors
def personas(home):
    """List the personas (system-prompt presets) for --persona and /persona."""
    from kb.config import kb_home
    from kb.prompting import personas as list_personas

    home_dir = kb_home(home)
    for name, (origin, text) in list_personas(home_dir).items():
        click.secho(name, bold=True, nl=False)
        click.echo(f"  ({origin})  {text}")
    click.echo(f"\nAdd your own as {home_dir / 'personas' / 'NAME.txt'}.", err=True)


@cli.command(name="config")
@HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@translate_errors
def config_command(home, as_json):
    """Show the effective settings and where each comes from (default, config.toml, KB_* variable)."""
    from kb.config import CONFIG_NAME, SETTINGS_HELP, Settings, kb_home

    home_dir = kb_home(home)
    settings = Settings.load(home_dir)
    rows = [{"name": name, "value": getattr(settings, name), "from": settings.origins[name],
             "help": SETTINGS_HELP[name][0]} for name in Settings.names()]
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    click.echo(f"Settings for {home_dir} (set them in {home_dir / CONFIG_NAME}, as KB_<NAME>, or by flag):")
    for row in rows:
        click.echo(f"  {row['name']:16} = {json.dumps(row['value'], ensure_ascii=False):24} ({row['from']})")


# --- eval ----------------------------------------------------------------------------------------


@cli.group(name="eval")
def eval_group():
    """Measure retrieval and answers on a question set (SQuAD JSON, or a BEIR folder for retrieval)."""


EVAL_KEEP = click.option("--keep", "keep", type=click.Path(file_okay=False),
                         help="Index the passages in this folder and keep it (reruns only re-ingest changes); default: a temporary folder.")
EVAL_HOME = click.option("--kb", "home", envvar="KB_HOME", type=click.Path(file_okay=False),
                         help="Knowledge base folder whose config.toml, prompts, personas and adapters apply (default ~/.kb).")


@eval_group.command(name="retrieval")
@click.argument("file", type=click.Path(exists=True))
@EVAL_HOME
@click.option("--mode", type=click.Choice(["dense", "lexical", "hybrid", "all"]), default="hybrid", show_default=True)
@click.option("--limit", type=int, help="Only the first N questions.")
@EVAL_KEEP
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list with --mode all).")
@translate_errors
def eval_retrieval_command(file, home, mode, limit, keep, as_json):
    """Recall@1/5/10, MRR@10, nDCG@10 and query latency, with each passage indexed as a document."""
    import tempfile

    from kb.config import kb_home
    from kb.evaluate import eval_retrieval

    modes = ("dense", "lexical", "hybrid") if mode == "all" else (mode,)
    with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
        results = eval_retrieval(file, modes=modes, limit=limit, home=keep or tmp,
                                 progress=ProgressPrinter(quiet=as_json), config_home=kb_home(home))
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    click.echo(f"{file}: {results[0]['documents']} documents, {results[0]['queries']} queries")
    click.echo(f"{'mode':8} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR@10':>7} {'nDCG@10':>8} {'p50 ms':>7} {'p95 ms':>7}")
    for r in results:
        click.echo(f"{r['mode']:8} {r['recall@1']:6.3f} {r['recall@5']:6.3f} {r['recall@10']:6.3f} {r['mrr@10']:7.3f} "
                   f"{r['ndcg@10']:8.3f} {r['latency_ms_p50']:7.1f} {r['latency_ms_p95']:7.1f}")


ANSWER_COLUMNS = [("exact_match", "EM"), ("f1", "F1"), ("answer_contains_gold", "ans⊇gold"),
                  ("generated_contains_gold", "gen⊇gold"), ("replaced_by_evidence", "replaced"),
                  ("refusal_overruled", "overruled"),
                  ("evidence_top1", "ev@1"), ("evidence_top3", "ev@3"), ("citation_accuracy", "cite"),
                  ("refused_answerable", "refused(ans)"), ("refused_unanswerable", "refused(unans)")]


@eval_group.command(name="answers")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@EVAL_HOME
@click.option("--limit", type=int, help="Only the first N answerable and N unanswerable questions of each file.")
@click.option("--split", type=click.Choice(["all", "train", "test"]), default="all", show_default=True,
              help="Only this part of the deterministic split (test: questions an adapter built with --split train never saw).")
@click.option("--split-by", type=click.Choice(["question", "document"]), default="question", show_default=True)
@EVAL_KEEP
@settings_options(MODEL, ANSWER, RETRIEVAL)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file (a list for several).")
@translate_errors
def eval_answers_command(files, home, limit, split, split_by, keep, settings, as_json):
    """What users see, per file and language: exact match and F1 of the answer without kb's framing,
    answer-contains-gold, evidence-contains-gold (top 1, top 3), citation accuracy, answerable questions
    refused, and unanswerable questions (their passage held out, the related ones kept) refused."""
    import tempfile

    from kb.config import kb_home
    from kb.evaluate import eval_answers

    home_dir = kb_home(home)
    done = [0]

    def tick(question, answer, em, f1):
        done[0] += 1
        if not as_json and sys.stderr.isatty():
            click.echo(f"\r{done[0]} questions", nl=False, err=True)

    results = []
    for file in files:
        with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
            where = Path(keep) / Path(file).stem if keep and len(files) > 1 else keep or tmp
            results.append(eval_answers(file, limit=limit, home=where, progress=ProgressPrinter(quiet=as_json),
                                        on_question=tick, split=split, split_by=split_by, config_home=home_dir,
                                        **settings))
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, ensure_ascii=False, indent=2))
        return
    click.echo("")
    click.echo(f"{'file':24} {'lang':4} {'n':>5} " + " ".join(f"{label:>14}" for _, label in ANSWER_COLUMNS))
    for r in results:
        click.echo(f"{Path(r['file']).stem[:24]:24} {r['language']:4} {r['questions']:>5} "
                   + " ".join(f"{r[key]:14.3f}" for key, _ in ANSWER_COLUMNS))
    click.echo(f"(unanswerable questions: {', '.join(str(r['unanswerable_questions']) for r in results)}; "
               "ans⊇gold: a gold answer is in the answer; gen⊇gold: in the model's own text before any replacement)")


# --- fine-tuning -----------------------------------------------------------------------------------


@cli.group()
def dataset():
    """Training data for `kb finetune`: build it from your documents, check and clean a file."""


@dataset.command(name="build")
@HOME_OPTION
@click.option("--kind", type=click.Choice(["continuation", "qa", "both", "rag"]), default="both", show_default=True,
              help="rag: examples in kb's own answer prompt (evidence, retrieved passages, citation), for an "
                   "adapter that answers from your documents better.")
@click.option("--out", type=click.Path(dir_okay=False), help="Output JSONL (default: <kb home>/datasets/train.jsonl).")
@click.option("--teacher", help="GGUF model (or name from `kb models`) that writes questions and answers (default: the bundled one).")
@click.option("--teacher-url", help="An OpenAI-compatible server that writes them instead (its base URL).")
@click.option("--questions", "questions_file", type=click.Path(exists=True, dir_okay=False),
              help="With --kind rag: questions with answers (SQuAD JSON, or JSONL of question/answer/source) instead of a teacher.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", show_default=True,
              help="With --questions: which part of the deterministic split to use (keep test for kb eval answers --split test).")
@click.option("--split-by", type=click.Choice(["question", "document"]), default="question", show_default=True)
@click.option("--leave-out", type=float, default=LEAVE_OUT_SHARE, show_default=True,
              help="With --kind rag: share of examples whose answering passage is left out (target: kb's refusal).")
@click.option("--limit", type=int, help="Only the first N chunks (or questions).")
@translate_errors
def dataset_build(home, kind, out, teacher, teacher_url, questions_file, split, split_by, leave_out, limit):
    """Chat-format training examples from the ingested corpus (continuation, QA or RAG); resumes a stopped build."""
    kb = _open(home, {k: v for k, v in (("model", teacher), ("llm_url", teacher_url)) if v})
    out = out or str(kb.home / "datasets" / "train.jsonl")
    tty = sys.stderr.isatty()

    def progress(n, total, stats):
        if tty or n == total or n % 50 == 0:
            status_line(f"{n}/{total} · " + " · ".join(f"{k} {v}" for k, v in sorted(stats.items())), tty)

    if kind == "rag":
        from kb.dataset import read_questions, split_of

        questions = None
        if questions_file:
            questions = [q for q in read_questions(questions_file)
                         if split == "all" or split_of(q["id"] if split_by == "question" else q["document"]) == split]
        result = kb.build_rag_dataset(out, questions=questions, leave_out_share=leave_out, progress=progress,
                                      limit=limit)
    else:
        if questions_file:
            raise click.UsageError("--questions goes with --kind rag")
        result = kb.build_dataset(out, kind=kind, progress=progress, limit=limit)
    if tty:
        click.echo("", err=True)
    click.echo(json.dumps(result))


@dataset.command(name="check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@HOME_OPTION
@click.option("--fix", "fix_out", type=click.Path(dir_okay=False), help="Write a cleaned chat-format JSONL here.")
@click.option("--model", help="GGUF whose tokenizer and context count (default: the configured chat model).")
@click.option("--ctx", type=int, help="Context length examples must fit (default: the configured ctx).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@translate_errors
def dataset_check(file, home, fix_out, model, ctx, as_json):
    """Report missing fields, duplicates, too-long examples, inconsistent endings and token counts."""
    from kb.config import Settings, kb_home
    from kb.dataset import check_dataset, fix_dataset
    from kb.generator import LlamaGenerator, LlamaOptions

    home_dir = kb_home(home)
    settings = Settings.load(home_dir, model=model, ctx=ctx)
    from kb.generator import resolve_model

    generator = LlamaGenerator(resolve_model(settings.model or None, home_dir, settings.model_paths),
                               options=LlamaOptions(n_ctx=settings.ctx))
    report = check_dataset(file, generator.count_tokens, settings.ctx)
    if fix_out:
        report["fixed"] = fix_dataset(file, fix_out, generator.count_tokens, settings.ctx)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    click.echo(f"{file}: {report['examples']} usable examples ({report['format'] or 'unknown format'}), "
               f"{report['tokens']} tokens (longest {report['tokens_max']})")
    click.echo(f"  duplicates: {report['duplicates']}; longer than {settings.ctx} tokens: {report['too_long']}")
    for problem in report["problems"][:20]:
        click.echo(f"  problem: {problem}")
    if len(report["problems"]) > 20:
        click.echo(f"  ... and {len(report['problems']) - 20} more problems")
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    if fix_out:
        click.echo(f"wrote {report['fixed']['kept']} examples to {fix_out} ({report['fixed']['dropped']} dropped)")


TRAIN_FLAGS = ("base", "name", "steps", "epochs", "rank", "alpha", "lr", "batch", "max_len")


@cli.command()
@click.argument("data", required=False, type=click.Path(exists=True, dir_okay=False))
@HOME_OPTION
@click.option("--base", help="GGUF base model (default: the configured chat model, else the bundled SmolLM2-135M-Instruct).")
@click.option("--name", help="Adapter name (default: derived from the data file).")
@click.option("--steps", type=int, help="Optimizer steps (default: from --epochs).")
@click.option("--epochs", type=float, default=3.0, show_default=True)
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=16.0, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--max-len", type=int, help="Tokens per example, longer ones cut (default: 512; for a `--kind rag` "
                                          "dataset, the context its prompts were packed into).")
@click.option("--threads", type=int, help="CPU threads (default: the configured threads, else all cores).")
@click.option("--resume", "resume", help="Resume the stopped run NAME (with the settings it started with).")
@click.pass_context
@translate_errors
def finetune(ctx, data, home, base, name, steps, epochs, rank, alpha, lr, batch, max_len, threads, resume):
    """Train a LoRA adapter on DATA (chat JSONL) and save it as a llama.cpp adapter in the kb home."""
    from kb.config import Settings, kb_home
    from kb.finetune import TrainConfig, finetune as run_finetune

    if resume:
        given = [f"--{p.replace('_', '-')}" for p in TRAIN_FLAGS if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]
        if given or data:
            raise click.UsageError(
                f"--resume continues a run with the settings it started with; {', '.join(given) or 'DATA'} "
                "cannot change them (start a new run with another --name instead)")
    elif not data:
        raise click.UsageError("give DATA, or --resume NAME")
    home_dir = kb_home(home)
    settings = Settings.load(home_dir, threads=threads)
    config = TrainConfig(name=resume or name or Path(data).stem, base=base or settings.model, steps=steps or 0,
                         epochs=epochs, rank=rank, alpha=alpha, lr=lr, batch=batch, max_len=max_len or 0,
                         threads=settings.threads)
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def progress(step, total, loss):
        if tty or step == total or step % 10 == 0:
            rate = (time.monotonic() - started) / max(step, 1)
            status_line(f"step {step}/{total} · loss {loss:.3f} · {rate:.1f} s/step", tty)

    click.echo("Loading the base model (about 20 s)...", err=True)
    try:
        card = run_finetune(home_dir, data, config, resume=bool(resume), progress=progress)
    except KeyboardInterrupt:
        click.echo(f"\nStopped; resume with `kb finetune --resume {config.name}`.", err=True)
        sys.exit(130)
    if tty:
        click.echo("", err=True)
    click.echo(f"adapter {card['name']}: {card['steps']} steps, final loss {card['final_loss']}")
    click.echo(f"use it with: kb ask \"...\" --adapter {card['name']}")


@cli.group(invoke_without_command=True)
@HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
@translate_errors
def adapters(ctx, home, as_json):
    """List LoRA adapters with their cards, and stopped training runs; `kb adapters rm NAME` deletes one."""
    if ctx.invoked_subcommand:
        return
    from kb.adapters import list_adapters
    from kb.config import kb_home

    found = list_adapters(kb_home(home))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("No adapters yet. Train one with `kb finetune DATA.jsonl --name NAME`.")
    for card in found:
        click.secho(card["name"], bold=True, nl=False)
        if not card["finished"]:
            done = card.get("steps_done")
            click.echo(f"  stopped run{f' at step {done}' if done is not None else ''} · "
                       f"resume with `kb finetune --resume {card['name']}`")
            continue
        click.echo(f"  base {card.get('base_model_name')} · {card.get('steps')} steps · rank {card.get('rank')} · "
                   f"final loss {card.get('final_loss')} · {card.get('created_at')}")


@adapters.command(name="rm")
@click.argument("name")
@HOME_OPTION
@translate_errors
def adapters_rm(name, home):
    """Delete an adapter (its .gguf, card and any unfinished run)."""
    from kb.adapters import remove_adapter
    from kb.config import kb_home

    remove_adapter(kb_home(home), name)
    click.echo(f"removed adapter {name}")


# --- the server ------------------------------------------------------------------------------------


@cli.command()
@HOME_OPTION
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs an API key (kb keys create).")
@click.option("--port", type=int, default=8000, show_default=True)
@settings_options(STORE, EMBEDDING, MODEL, ANSWER, RETRIEVAL)
@click.option("--queue", type=int, default=8, show_default=True,
              help="Requests that may wait for the model; more are answered 429 with Retry-After.")
@click.option("--max-upload-mb", type=int, default=100, show_default=True, help="Largest file an upload may be.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser pages from this origin to call the API (repeatable; default: none).")
@translate_errors
def serve(home, host, port, settings, queue, max_upload_mb, cors_origins):
    """Serve the knowledge base: an OpenAI-compatible API at /v1, kb's API at /api, and a web page at /."""
    from kb.serve import run

    kb = _open(home, settings)
    click.echo(f"kb serve: {kb.home} on http://{host}:{port}/ (OpenAI base URL http://{host}:{port}/v1)", err=True)
    run(kb, host=host, port=port, queue=queue, max_upload_mb=max_upload_mb, cors_origins=list(cors_origins))


@cli.group()
def keys():
    """API keys for kb serve: kb keys create NAME [--role read|write], kb keys list, kb keys revoke NAME."""


@keys.command(name="create")
@click.argument("name")
@HOME_OPTION
@click.option("--role", type=click.Choice(["read", "write"]), default="read", show_default=True,
              help="read: ask and search; write: also add and delete documents.")
@translate_errors
def keys_create(name, home, role):
    """Create an API key; it is shown once and stored only as a hash."""
    from kb.config import kb_home
    from kb.serve.keys import create_key

    secret = create_key(kb_home(home), name, role)
    click.echo(secret)
    click.echo(f"Key {name!r} ({role}) created. It is shown only now: store it where the client can read it "
               "(the openai client's api_key, Open WebUI's connection, the web page's key field).", err=True)


@keys.command(name="list")
@HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@translate_errors
def keys_list(home, as_json):
    """List API keys (names and roles; the keys themselves are not stored)."""
    from kb.config import kb_home
    from kb.serve.keys import list_keys

    found = list_keys(kb_home(home))
    if as_json:
        click.echo(json.dumps([k.__dict__ for k in found], indent=2))
        return
    if not found:
        click.echo("No keys. kb serve answers only on this machine (127.0.0.1) until you create one.")
    for k in found:
        click.echo(f"{k.name:24} {k.role:6} created {time.strftime('%Y-%m-%d %H:%M', time.localtime(k.created_at))}")


@keys.command(name="revoke")
@click.argument("name")
@HOME_OPTION
@translate_errors
def keys_revoke(name, home):
    """Revoke an API key; a running server refuses it from the next request on."""
    from kb.config import kb_home
    from kb.serve.keys import revoke_key

    revoke_key(kb_home(home), name)
    click.echo(f"revoked key {name}")


# --- models ------------------------------------------------------------------------------------------


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


@cli.group(invoke_without_command=True)
@HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
@translate_errors
def models(ctx, home, as_json):
    """GGUF chat models on this machine (bundled, the kb home, Ollama, LM Studio, GPT4All, the Hugging Face
    cache); `kb models pull URL`, `kb models rm NAME`, `kb models default NAME`. A listed name works as --model."""
    if ctx.invoked_subcommand:
        return
    from kb.config import Settings, kb_home
    from kb.models import discover

    home_dir = kb_home(home)
    found = discover(home_dir, Settings.load(home_dir).model_paths)
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in found], ensure_ascii=False, indent=2))
        return
    click.echo(f"{'name':36} {'size':>8} {'arch':10} {'quant':8} {'params':>6} {'context':>7} {'template':8} "
               f"{'languages':12} source")
    for m in found:
        if m.error:
            click.echo(f"{m.name[:36]:36} {_size(m.size):>8} unreadable: {m.error}  ({m.path})")
            continue
        click.echo(f"{m.name[:36]:36} {_size(m.size):>8} {m.architecture[:10]:10} {m.quantization[:8]:8} "
                   f"{_params(m.parameters):>6} {m.context_length or '?':>7} {'yes' if m.chat_template else 'no':8} "
                   f"{','.join(m.languages or ['?'])[:12]:12} {m.source}")
    click.echo('Use one with: kb ask "..." --model NAME (or kb models default NAME).', err=True)


@models.command(name="pull")
@click.argument("url")
@HOME_OPTION
@click.option("--name", help="Name to save it under (default: the file name in the URL).")
@click.option("--sha256", help="Expected sha256; the download is refused if it differs.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds without data before giving up.")
@translate_errors
def models_pull(url, home, name, sha256, timeout):
    """Download a GGUF model (https:// or hf://OWNER/REPO/FILE.gguf) into the kb home; resumes a stopped download."""
    from kb.config import kb_home
    from kb.models import pull

    tty = sys.stderr.isatty()
    last = [0.0]

    def progress(done, total):
        now = time.monotonic()
        if tty or now - last[0] > 5 or done == total:
            last[0] = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            status_line(f"downloaded {_size(done)}{f' of {_size(total)}' if total else ''}{share}", tty)

    info = pull(kb_home(home), url, name=name, sha256=sha256, timeout=timeout, progress=progress)
    if tty:
        click.echo("", err=True)
    click.echo(f"pulled {info.name}: {_size(info.size)}, {info.architecture} {info.quantization}, "
               f"context {info.context_length}; use it with --model {info.name}")


@models.command(name="rm")
@click.argument("name")
@HOME_OPTION
@translate_errors
def models_rm(name, home):
    """Delete a model that `kb models pull` downloaded (never any other file)."""
    from kb.config import kb_home
    from kb.models import remove

    click.echo(f"removed {remove(kb_home(home), name)}")


@models.command(name="default")
@click.argument("name")
@HOME_OPTION
@translate_errors
def models_default(name, home):
    """Make NAME (from `kb models`, or a GGUF path) the chat model in the home's config.toml."""
    from kb.config import Settings, kb_home
    from kb.models import set_default

    home_dir = kb_home(home)
    path = set_default(home_dir, name, Settings.load(home_dir).model_paths)
    click.echo(f"model = {name} ({path}) in {home_dir / 'config.toml'}")


# --- the home --------------------------------------------------------------------------------------


@cli.command()
@HOME_OPTION
@settings_options(STORE)
@click.option("--documents", "-d", "list_documents", is_flag=True,
              help="Also list every indexed document: when it was ingested, its type, chunks and path.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@translate_errors
def status(home, settings, list_documents, as_json):
    """Documents, chunks, embedding model, index size, last ingest."""
    kb = _open(home, settings)
    info = kb.status()
    if list_documents:
        info["document_list"] = kb.documents()
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False, indent=2))
        return
    if not info["ingested"]:
        click.echo(f"{info['home']}: empty. Run `kb ingest PATH` to add documents.")
        return
    types = ", ".join(f"{n} {t}" for t, n in sorted(info["documents_by_type"].items()))
    click.echo(f"home:            {info['home']}")
    click.echo(f"documents:       {info['documents']} ({types})")
    click.echo(f"chunks:          {info['chunks']}")
    click.echo(f"embedding model: {info['embedding_model']} (dim {info['dim']}, {info['max_tokens']} tokens a chunk)")
    click.echo(f"size on disk:    {info['size_bytes'] / 1e6:.1f} MB")
    click.echo(f"last ingest:     {info['last_ingest']}")
    if list_documents:
        click.echo("")
        click.echo(f"{'ingested':16}  {'type':8} {'chunks':>6}  path")
        for d in info["document_list"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d["ingested_at"])) if d["ingested_at"] else "?"
            title = f"  ({d['title']})" if d["title"] and d["title"] != Path(d["path"]).stem else ""
            click.echo(f"{when:16}  {d['file_type']:8} {d['chunks']:>6}  {d['path']}{title}")


@cli.command()
@HOME_OPTION
@click.option("--repair", is_flag=True, help="Move a damaged database aside and rebuild the index from the source files.")
@WAIT_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@translate_errors
def doctor(home, repair, wait, as_json):
    """Check the knowledge base home (database, vector cache, lock, sources) and repair what can be repaired."""
    from kb.config import kb_home
    from kb.doctor import check_home

    report = check_home(kb_home(home), repair=repair, wait=wait, progress=ProgressPrinter(quiet=as_json))
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for finding in report["findings"]:
            mark = {"ok": "ok  ", "fixed": "fixed", "problem": "PROBLEM"}[finding["status"]]
            click.echo(f"{mark:7} {finding['what']}: {finding['detail']}")
        if report["problems"] and not repair:
            click.echo("Run `kb doctor --repair` to repair what can be repaired.", err=True)
    if report["problems"] and not repair:
        sys.exit(1)


def main():
    cli(prog_name="kb")
