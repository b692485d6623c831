"""The `kb` command line: parses options, calls the library, prints. Errors become one line and exit 1."""

from __future__ import annotations

import functools
import json
import sys
import time

import click

from kb.errors import KBError

HOME_OPTION = click.option(
    "--kb", "home", envvar="KB_HOME", type=click.Path(file_okay=False),
    help="Knowledge base folder (default ~/.kb; env KB_HOME).",
)


def _fail(message: str, hint: str = "") -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    sys.exit(1)


def translate_errors(fn):
    """Turn kb's typed errors, and Ctrl-C, into a one-line message instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KBError as e:
            _fail(str(e), e.hint)
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            sys.exit(130)

    return wrapper


def _open(home, **options):
    from kb.api import KnowledgeBase

    return KnowledgeBase(home, **options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kb-assistant")
def cli():
    """kb: ask questions of your own documents, privately, on your own machine."""


# --- ingest ------------------------------------------------------------------------------------


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
            click.echo(("\r" + line + "\033[K") if self.tty else line, nl=not self.tty, err=True)
        elif kind == "done" and self.tty:
            click.echo("", err=True)


def print_report(report) -> None:
    click.echo(
        f"added {len(report.added)}, updated {len(report.updated)}, unchanged {len(report.unchanged)}, "
        f"removed {len(report.removed)}, failed {len(report.failed)}, skipped {len(report.skipped)} "
        f"(unsupported type); {report.chunks} chunks in {report.seconds:.1f} s",
    )
    for failure in report.failed:
        click.echo(f"  failed: {failure.path}: {failure.reason}")
    for warning in report.warnings:
        click.echo(f"  note: {warning}", err=True)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@HOME_OPTION
@click.option("--embedding-model", envvar="KB_EMBEDDING_MODEL", help="Local sentence-transformers model folder (default: bundled all-MiniLM-L6-v2).")
@click.option("--wait", type=float, default=0.0, show_default=True, help="Seconds to wait if another ingest holds the lock.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@translate_errors
def ingest(paths, home, embedding_model, wait, as_json, quiet):
    """Index files and folders (md, txt, rst, html, pdf, docx), incrementally.

    Unchanged files are skipped, changed files replaced, files deleted from an ingested folder removed.
    Exits non-zero only when nothing could be ingested.
    """
    kb = _open(home, embedding_model=embedding_model)
    report = kb.ingest(
        list(paths), progress=ProgressPrinter(quiet or as_json), wait=wait,
        on_wait=lambda pid: click.echo(f"Waiting for another kb ingest (pid {pid}) to finish...", err=True),
    )
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        print_report(report)
    if not report.ok:
        _fail("nothing could be ingested", "see the reasons above")


@cli.command()
@click.argument("path", type=click.Path())
@HOME_OPTION
@translate_errors
def forget(path, home):
    """Remove a document (or every document under a folder) from the index."""
    removed = _open(home).forget(path)
    if not removed:
        _fail(f"no ingested document at {path}", "`kb status` shows what is indexed")
    click.echo(f"removed {len(removed)} document(s)")


# --- search ------------------------------------------------------------------------------------


def filter_options(fn):
    for option in reversed([
        click.option("--path", "path_glob", help="Only documents whose path matches this glob."),
        click.option("--tag", "tags", multiple=True, help="Only documents with this front-matter tag (repeatable)."),
        click.option("--since", "date_from", help="Only documents dated on or after this date (YYYY-MM-DD)."),
        click.option("--until", "date_to", help="Only documents dated on or before this date (YYYY-MM-DD)."),
        click.option("--type", "file_types", multiple=True, help="Only these file types: md, txt, rst, html, pdf, docx (repeatable)."),
    ]):
        fn = option(fn)
    return fn


def make_filters(path_glob, tags, date_from, date_to, file_types):
    from kb.retriever import Filters

    return Filters(path=path_glob, tags=tags, date_from=date_from, date_to=date_to, file_types=file_types)


def hit_location(hit) -> str:
    where = hit.heading or ""
    if hit.page:
        where = f"p. {hit.page}" + (f", {where}" if where else "")
    return where


@cli.command()
@click.argument("query")
@HOME_OPTION
@click.option("-k", "k", type=int, default=None, help="Number of passages (default 5).")
@click.option("--mode", type=click.Choice(["dense", "lexical", "hybrid"]), envvar="KB_SEARCH_MODE", help="Retrieval mode (default hybrid).")
@click.option("--reranker", type=click.Path(exists=True, file_okay=False), help="Local CrossEncoder model folder to rerank with.")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print hits as JSON.")
@translate_errors
def search(query, home, k, mode, reranker, path_glob, tags, date_from, date_to, file_types, as_json):
    """Find the passages that best match QUERY."""
    kb = _open(home, reranker=reranker)
    hits = kb.search(query, k, mode=mode, filters=make_filters(path_glob, tags, date_from, date_to, file_types))
    if as_json:
        click.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        click.echo("No matching passages.")
    for n, hit in enumerate(hits, 1):
        where = hit_location(hit)
        click.secho(f"[{n}] {hit.score:.3f}  {hit.title}" + (f" — {where}" if where else ""), bold=True)
        click.secho(f"    {hit.path}", fg="cyan")
        text = " ".join(hit.text.split())
        click.echo("    " + (text[:400] + ("…" if len(text) > 400 else "")))


@cli.command()
@HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@translate_errors
def status(home, as_json):
    """Documents, chunks, embedding model, index size, last ingest."""
    info = _open(home).status()
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


def main():
    cli(prog_name="kb")
