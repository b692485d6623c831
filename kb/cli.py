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


# --- ask and chat --------------------------------------------------------------------------------


def model_options(fn):
    """Options of the chat model; each also reads config.toml and KB_<NAME> (see README)."""
    for option in reversed([
        click.option("--model", "model", help="A GGUF model file (default: the bundled SmolLM2-135M-Instruct)."),
        click.option("--ctx", type=int, help="Context window in tokens (default 2048)."),
        click.option("--threads", type=int, help="CPU threads (default: all cores)."),
        click.option("--gpu-layers", type=int, help="Layers to offload to the GPU (needs a GPU build of llama-cpp-python)."),
        click.option("--temperature", type=float, help="Sampling temperature (default 0.2)."),
        click.option("--max-tokens", type=int, help="Longest answer in tokens (default 256)."),
        click.option("--seed", type=int, help="Sampling seed (default 0)."),
        click.option("--persona", help="System-prompt preset; `kb personas` lists them."),
        click.option("--adapter", help="A LoRA adapter from `kb adapters` (or a .gguf adapter path)."),
        click.option("--adapter-scale", type=float, help="Strength of the adapter (default 1.0)."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's own log (e.g. layers offloaded to the GPU)."),
    ]):
        fn = option(fn)
    return fn


def retrieval_options(fn):
    for option in reversed([
        click.option("-k", "k", type=int, default=None, help="Passages to retrieve (default 5)."),
        click.option("--mode", type=click.Choice(["dense", "lexical", "hybrid"]), help="Retrieval mode (default hybrid)."),
        click.option("--min-score", type=float, help="Relevance below which kb refuses to answer (default 0.5; 0 never refuses)."),
        click.option("--reranker", type=click.Path(exists=True, file_okay=False), help="Local CrossEncoder model folder to rerank with."),
    ]):
        fn = option(fn)
    return filter_options(fn)


def open_for_answers(home, model, ctx, threads, gpu_layers, temperature, max_tokens, seed, persona, verbose,
                     min_score, reranker, adapter=None, adapter_scale=None):
    return _open(home, model=model, ctx=ctx, threads=threads, gpu_layers=gpu_layers, temperature=temperature,
                 max_tokens=max_tokens, seed=seed, persona=persona, min_score=min_score, reranker=reranker,
                 adapter=adapter, adapter_scale=adapter_scale, verbose=verbose or None)


def source_line(source, *, closest: bool = False) -> str:
    where = hit_location(source)
    label = f"[{source.n}] {source.title or source.path}" + (f" — {where}" if where else "")
    mark = f"  (relevance {source.relevance:.2f})" if closest else ("  ✓ cited" if source.cited else "")
    return f"{label}{mark}\n    {source.path}"


def print_answer_stream(stream, *, live: bool) -> None:
    """Print an answer as it is generated (live) or at the end, then its sources, to stdout."""
    if live:
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
    else:
        click.echo(stream.result().text)
    answer = stream.answer
    if answer.refused:
        if answer.sources:
            click.secho("\nClosest passages found (not relevant enough to answer from):", bold=True)
            for source in answer.sources[:3]:
                click.echo(source_line(source, closest=True))
        return
    click.secho("\nSources:", bold=True)
    for source in answer.sources:
        click.echo(source_line(source))


@cli.command()
@click.argument("question")
@HOME_OPTION
@model_options
@retrieval_options
@click.option("--no-stream", is_flag=True, help="Print the answer only when it is complete.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object {answer, refused, sources, model, timings}.")
@translate_errors
def ask(question, home, model, ctx, threads, gpu_layers, temperature, max_tokens, seed, persona, adapter,
        adapter_scale, verbose, k, mode, min_score, reranker, path_glob, tags, date_from, date_to, file_types, no_stream, as_json):
    """Answer QUESTION from your documents, citing the passages used; refuse when they lack the answer."""
    kb = open_for_answers(home, model, ctx, threads, gpu_layers, temperature, max_tokens, seed, persona, verbose,
                          min_score, reranker, adapter, adapter_scale)
    stream = kb.ask_stream(question, k=k, mode=mode,
                           filters=make_filters(path_glob, tags, date_from, date_to, file_types))
    if as_json:
        click.echo(json.dumps(stream.result().to_dict(), ensure_ascii=False, indent=2))
        return
    print_answer_stream(stream, live=not no_stream and sys.stdout.isatty())


CHAT_HELP = "Commands: /sources, /reset, /persona NAME, /exit (or Ctrl-D)."


@cli.command()
@HOME_OPTION
@model_options
@retrieval_options
@click.option("--continue", "resume", is_flag=True, help="Resume the most recent conversation.")
@translate_errors
def chat(home, model, ctx, threads, gpu_layers, temperature, max_tokens, seed, persona, adapter, adapter_scale,
         verbose, k, mode, min_score, reranker, path_glob, tags, date_from, date_to, file_types, resume):
    """A conversation with your documents; follow-up questions understand what came before."""
    kb = open_for_answers(home, model, ctx, threads, gpu_layers, temperature, max_tokens, seed, None, verbose,
                          min_score, reranker, adapter, adapter_scale)
    conversation = kb.chat(persona=persona, resume=resume)
    filters = make_filters(path_glob, tags, date_from, date_to, file_types)
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
                    click.echo(f"Error: {e}" + (f"\nHint: {e.hint}" if e.hint else ""), err=True)
            else:
                click.echo(CHAT_HELP, err=True)
            continue
        try:
            stream = conversation.stream(line, k=k, mode=mode, filters=filters)
            if live:
                click.echo("kb> ", nl=False)
            for piece in stream if live else [stream.result().text]:
                click.echo(piece, nl=False)
            click.echo()
        except KeyboardInterrupt:
            click.echo("\n(stopped; this answer was not kept)", err=True)
        except KBError as e:
            click.echo(f"Error: {e}" + (f"\nHint: {e.hint}" if e.hint else ""), err=True)


@cli.command(name="log")
@HOME_OPTION
@click.option("-n", "limit", type=int, default=10, show_default=True, help="How many recent asks.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@translate_errors
def log_command(home, limit, as_json):
    """Recent questions with their answers, sources, model and timings."""
    entries = _open(home).log(limit)
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
        answer = " ".join(e["answer"].split())
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


# --- eval ----------------------------------------------------------------------------------------


@cli.group(name="eval")
def eval_group():
    """Measure retrieval and answers on a question set (SQuAD JSON, or a BEIR folder for retrieval)."""


EVAL_HOME = click.option("--keep", "keep", type=click.Path(file_okay=False),
                         help="Index the passages in this folder and keep it (reruns only re-ingest changes); default: a temporary folder.")


@eval_group.command(name="retrieval")
@click.argument("file", type=click.Path(exists=True))
@click.option("--mode", type=click.Choice(["dense", "lexical", "hybrid", "all"]), default="hybrid", show_default=True)
@click.option("--limit", type=int, help="Only the first N questions.")
@EVAL_HOME
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list with --mode all).")
@translate_errors
def eval_retrieval_command(file, mode, limit, keep, as_json):
    """Recall@1/5/10, MRR@10, nDCG@10 and query latency, with each passage indexed as a document."""
    import tempfile

    from kb.evaluate import eval_retrieval

    modes = ("dense", "lexical", "hybrid") if mode == "all" else (mode,)
    with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
        results = eval_retrieval(file, modes=modes, limit=limit, home=keep or tmp,
                                 progress=ProgressPrinter(quiet=as_json))
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    click.echo(f"{file}: {results[0]['documents']} documents, {results[0]['queries']} queries")
    click.echo(f"{'mode':8} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR@10':>7} {'nDCG@10':>8} {'p50 ms':>7} {'p95 ms':>7}")
    for r in results:
        click.echo(f"{r['mode']:8} {r['recall@1']:6.3f} {r['recall@5']:6.3f} {r['recall@10']:6.3f} {r['mrr@10']:7.3f} "
                   f"{r['ndcg@10']:8.3f} {r['latency_ms_p50']:7.1f} {r['latency_ms_p95']:7.1f}")


@eval_group.command(name="answers")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--limit", type=int, help="Only the first N answerable questions (and N/5 unanswerable ones).")
@EVAL_HOME
@model_options
@click.option("-k", "k", type=int, default=None, help="Passages to retrieve (default 5).")
@click.option("--min-score", type=float, help="Refusal threshold (default 0.5).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@translate_errors
def eval_answers_command(file, limit, keep, model, ctx, threads, gpu_layers, temperature, max_tokens, seed,
                         persona, adapter, adapter_scale, verbose, k, min_score, as_json):
    """Exact match, F1, citation accuracy, and the refusal rate on questions whose passage is not indexed."""
    import tempfile

    from kb.evaluate import eval_answers

    done = [0]

    def tick(question, answer, em, f1):
        done[0] += 1
        if not as_json and sys.stderr.isatty():
            click.echo(f"\r{done[0]} questions", nl=False, err=True)

    options = dict(model=model, ctx=ctx, threads=threads, gpu_layers=gpu_layers, temperature=temperature,
                   max_tokens=max_tokens, seed=seed, persona=persona, min_score=min_score, verbose=verbose or None,
                   adapter=adapter, adapter_scale=adapter_scale)
    with tempfile.TemporaryDirectory(prefix="kb-eval-") as tmp:
        result = eval_answers(file, limit=limit, home=keep or tmp, progress=ProgressPrinter(quiet=as_json),
                              on_question=tick, ask_options={"k": k} if k else None,
                              **{k_: v for k_, v in options.items() if v is not None})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"\n{file}: {result['questions']} answerable questions, {result['unanswerable_questions']} unanswerable")
    for key in ("exact_match", "f1", "citation_accuracy", "refused_answerable", "refusal_rate"):
        click.echo(f"  {key:20} {result[key]:.3f}")


# --- fine-tuning -----------------------------------------------------------------------------------


@cli.group()
def dataset():
    """Training data for `kb finetune`: build it from your documents, check and clean a file."""


@dataset.command(name="build")
@HOME_OPTION
@click.option("--kind", type=click.Choice(["continuation", "qa", "both"]), default="both", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Output JSONL (default: <kb home>/datasets/train.jsonl).")
@click.option("--teacher", help="GGUF model that writes the question-answer pairs (default: the bundled one).")
@click.option("--limit", type=int, help="Only the first N chunks.")
@translate_errors
def dataset_build(home, kind, out, teacher, limit):
    """Chat-format examples from the ingested corpus; a stopped build resumes where it was."""
    from kb.dataset import build_dataset

    kb = _open(home, model=teacher)
    store = kb._open_store()
    if store.counts()[1] == 0:
        from kb.errors import NotIngested

        raise NotIngested(f"the knowledge base at {kb.home} has no documents yet")
    out = out or str(kb.home / "datasets" / "train.jsonl")
    from pathlib import Path

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()

    def progress(n, total, stats):
        if tty or n == total or n % 50 == 0:
            status_line(f"chunks {n}/{total} · " + " · ".join(f"{k} {v}" for k, v in sorted(stats.items())), tty)

    result = build_dataset(store, out, kind=kind, teacher=kb.generator if kind != "continuation" else None,
                           progress=progress, limit=limit)
    if tty:
        click.echo("", err=True)
    click.echo(json.dumps(result))


@dataset.command(name="check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--fix", "fix_out", type=click.Path(dir_okay=False), help="Write a cleaned chat-format JSONL here.")
@click.option("--model", help="GGUF whose tokenizer and context count (default: the bundled one).")
@click.option("--ctx", type=int, default=2048, show_default=True, help="Context length examples must fit.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@translate_errors
def dataset_check(file, fix_out, model, ctx, as_json):
    """Report missing fields, duplicates, too-long examples, inconsistent endings and token counts."""
    from kb.dataset import check_dataset, fix_dataset
    from kb.generator import LlamaGenerator, LlamaOptions

    generator = LlamaGenerator(model or None, options=LlamaOptions(n_ctx=ctx))
    report = check_dataset(file, generator.count_tokens, ctx)
    if fix_out:
        report["fixed"] = fix_dataset(file, fix_out, generator.count_tokens, ctx)
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False, indent=2))
        return
    click.echo(f"{file}: {report['examples']} usable examples ({report['format'] or 'unknown format'}), "
               f"{report['tokens']} tokens (longest {report['tokens_max']})")
    click.echo(f"  duplicates: {report['duplicates']}; longer than {ctx} tokens: {report['too_long']}")
    for problem in report["problems"][:20]:
        click.echo(f"  problem: {problem}")
    if len(report["problems"]) > 20:
        click.echo(f"  ... and {len(report['problems']) - 20} more problems")
    for note in report["notes"]:
        click.echo(f"  note: {note}")
    if fix_out:
        click.echo(f"wrote {report['fixed']['kept']} examples to {fix_out} ({report['fixed']['dropped']} dropped)")


@cli.command()
@click.argument("data", required=False, type=click.Path(exists=True, dir_okay=False))
@HOME_OPTION
@click.option("--base", help="GGUF base model (default: the bundled SmolLM2-135M-Instruct).")
@click.option("--name", help="Adapter name (default: derived from the data file).")
@click.option("--steps", type=int, help="Optimizer steps (default: from --epochs).")
@click.option("--epochs", type=float, default=3.0, show_default=True)
@click.option("--rank", type=int, default=8, show_default=True)
@click.option("--alpha", type=float, default=16.0, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--threads", type=int, default=0, help="CPU threads (default: all cores).")
@click.option("--resume", "resume", help="Resume the stopped run NAME.")
@translate_errors
def finetune(data, home, base, name, steps, epochs, rank, alpha, lr, batch, threads, resume):
    """Train a LoRA adapter on DATA (chat JSONL) and save it as a llama.cpp adapter in the kb home."""
    from pathlib import Path

    from kb.config import kb_home
    from kb.finetune import TrainConfig, finetune as run_finetune

    if not resume and not data:
        raise click.UsageError("give DATA, or --resume NAME")
    config = TrainConfig(name=resume or name or Path(data).stem, base=base or "", steps=steps or 0, epochs=epochs,
                         rank=rank, alpha=alpha, lr=lr, batch=batch, threads=threads)
    tty = sys.stderr.isatty()
    started = time.monotonic()

    def progress(step, total, loss):
        if tty or step == total or step % 10 == 0:
            rate = (time.monotonic() - started) / max(step, 1)
            status_line(f"step {step}/{total} · loss {loss:.3f} · {rate:.1f} s/step", tty)

    click.echo("Loading the base model (about 20 s)...", err=True)
    try:
        card = run_finetune(kb_home(home), data, config, resume=bool(resume), progress=progress)
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
    """List LoRA adapters with their cards; `kb adapters rm NAME` deletes one."""
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
