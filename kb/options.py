"""The model and retrieval options, defined once: the CLI's flags and `kb serve`'s request fields come from here.

Each option is a setting of kb.config.Settings; a flag given on the command line overrides config.toml and
KB_* variables (defaults < file < env < flag). Commands receive the given ones as one `settings` dict.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import click


@dataclass(frozen=True)
class Option:
    setting: str  # the Settings field it sets
    flags: tuple[str, ...]
    type: object
    help: str
    is_flag: bool = False


STORE = (
    Option("store", ("--store",), str, "Where the index lives: a postgresql://... URL (default: SQLite in the home)."),
)
EMBEDDING = (
    Option("embedding_model", ("--embedding-model",), str, "Local sentence-transformers model folder (default: bundled all-MiniLM-L6-v2)."),
    Option("embed_url", ("--embed-url",), str, "Embed with an OpenAI-compatible server instead (its base URL, e.g. http://host:8080/v1)."),
    Option("embed_model", ("--embed-model",), str, "Model name to ask the embedding server for (default: the first it lists)."),
)
INGEST = (
    Option("ocr", ("--ocr",), bool, "Read scanned PDF pages and images with OCR (default: on).", True),
    Option("parse_workers", ("--workers",), int, "Processes that parse PDF, Word, HTML and image files (default: one per core but one)."),
)
MODEL = (
    Option("model", ("--model",), str, "Chat model: a GGUF file (default: the bundled SmolLM2-135M-Instruct)."),
    Option("llm_url", ("--llm-url",), str, "Generate with an OpenAI-compatible server instead (its base URL, e.g. http://host:8080/v1; key from KB_LLM_API_KEY)."),
    Option("llm_model", ("--llm-model",), str, "Model name to ask the server for (default: the first it lists)."),
    Option("ctx", ("--ctx",), int, "Context window in tokens (default 2048)."),
    Option("threads", ("--threads",), int, "CPU threads (default: all cores)."),
    Option("gpu_layers", ("--gpu-layers",), int, "Layers to offload to the GPU (needs a GPU build of llama-cpp-python)."),
    Option("temperature", ("--temperature",), float, "Sampling temperature (default 0.2)."),
    Option("max_tokens", ("--max-tokens",), int, "Longest answer in tokens (default 256)."),
    Option("seed", ("--seed",), int, "Sampling seed (default 0)."),
    Option("persona", ("--persona",), str, "System-prompt preset; `kb personas` lists them."),
    Option("adapter", ("--adapter",), str, "A LoRA adapter from `kb adapters` (or a .gguf adapter path)."),
    Option("adapter_scale", ("--adapter-scale",), float, "Strength of the adapter (default 1.0)."),
    Option("verbose", ("--verbose",), bool, "Show llama.cpp's own log (e.g. layers offloaded to the GPU).", True),
)
ANSWER = (
    Option("min_score", ("--min-score",), float, "Answerability below which kb refuses to answer (default 0.5; 0 never refuses)."),
    Option("extractive", ("--extractive",), bool, "Answer with the best evidence itself, quoted and cited, without the chat model.", True),
    Option("overrule_refusal", ("--overrule-refusal",), float,
           "Answerability at which the evidence answers although the model refused (default 0.8; 1 never)."),
)
RETRIEVAL = (
    Option("top_k", ("-k",), int, "Passages to retrieve (default 5)."),
    Option("search_mode", ("--mode",), click.Choice(["dense", "lexical", "hybrid"]), "Retrieval mode (default hybrid)."),
    Option("reranker", ("--reranker",), click.Path(exists=True, file_okay=False), "Local CrossEncoder model folder to rerank with."),
)
ALL = STORE + EMBEDDING + INGEST + MODEL + ANSWER + RETRIEVAL


def settings_options(*groups: tuple[Option, ...]):
    """A decorator adding `groups` of options to a command, which then receives `settings`: {setting: value}
    for the options given (those left out keep their configured values)."""
    options = [o for group in groups for o in group]

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            given = {o.setting: kwargs.pop(o.setting) for o in options}
            settings = {name: value for name, value in given.items() if value is not None}
            return fn(*args, settings=settings, **kwargs)

        for o in reversed(options):
            if o.is_flag:  # --x / --no-x, so that a flag can also undo what config.toml turned on
                flag = o.flags[0]
                wrapper = click.option(f"{flag}/--no-{flag[2:]}", o.setting, default=None, help=o.help)(wrapper)
            else:
                wrapper = click.option(*o.flags, o.setting, type=o.type, default=None, help=o.help)(wrapper)
        return wrapper

    return decorate





FILTERS = (
    Option("path", ("--path",), str, "Only documents whose path matches this glob."),
    Option("tags", ("--tag",), str, "Only documents with this front-matter tag (repeatable)."),
    Option("date_from", ("--since",), str, "Only documents dated on or after this date (YYYY-MM-DD)."),
    Option("date_to", ("--until",), str, "Only documents dated on or before this date (YYYY-MM-DD)."),
    Option("file_types", ("--type",), str, "Only these file types: md, txt, rst, html, pdf, docx (repeatable)."),
)
_REPEATABLE = {"tags", "file_types"}


def filter_options(fn):
    """A decorator adding the document filters to a command, which then receives `filters` (kb.retriever.Filters)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kb.retriever import Filters

        values = {o.setting: kwargs.pop("filter_" + o.setting) for o in FILTERS}
        return fn(*args, filters=Filters(**values), **kwargs)

    for o in reversed(FILTERS):
        wrapper = click.option(*o.flags, "filter_" + o.setting, multiple=o.setting in _REPEATABLE,
                               help=o.help)(wrapper)
    return wrapper
__all__ = ["Option", "STORE", "EMBEDDING", "INGEST", "MODEL", "ANSWER", "RETRIEVAL", "FILTERS", "ALL", "settings_options",
           "filter_options"]
