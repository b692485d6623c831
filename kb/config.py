"""Where kb keeps its data and how settings are resolved: defaults < home config.toml < KB_* env < flags.

Every setting is declared once here, with its type, its valid values and a one-line description; the
command line (kb.options), the config file and the environment all go through `Settings.load`, which
refuses an unknown key or a bad value with the key, where it came from and what is valid.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from kb.errors import KBError

HOME_ENV = "KB_HOME"
CONFIG_NAME = "config.toml"


def kb_home(path: str | os.PathLike | None = None) -> Path:
    """The knowledge base folder: `path` if given, else $KB_HOME, else ~/.kb."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".kb"


class BadSetting(KBError):
    """A setting with an unknown name or a value of the wrong type or range."""


def _choice(*values):
    def check(value):
        return None if value in values else f"one of {', '.join(values)}"
    return check


def _at_least(low):
    def check(value):
        return None if value >= low else f"a number >= {low}"
    return check


def _between(low, high):
    def check(value):
        return None if low <= value <= high else f"a number from {low} to {high}"
    return check


# name -> (description, check). The type is the dataclass field's.
SETTINGS_HELP: dict[str, tuple[str, object]] = {
    "store": ("where the index lives: empty for SQLite + FAISS in the home, or a postgresql://USER:PASSWORD@HOST/DB URL",
              None),
    "embedding_model": ("local sentence-transformers model folder (empty: the bundled all-MiniLM-L6-v2)", None),
    "embed_url": ("an OpenAI-compatible server that embeds instead (its /v1/embeddings), e.g. http://gpu-box:8080/v1", None),
    "embed_model": ("the model name to ask the embedding server for (empty: the first it lists)", None),
    "embed_api_key": ("the embedding server's API key (better set as KB_EMBED_API_KEY than in a file)", None),
    "chunk_overlap": ("tokens carried over between neighbouring chunks of one section", _at_least(0)),
    "embed_batch_size": ("texts per embedding batch", _at_least(1)),
    "embed_precision": ("bulk embedding precision: auto (bf16 where the CPU has it natively), fp32, bf16",
                        _choice("auto", "fp32", "bf16")),
    "ocr": ("read scanned PDF pages and image files with OCR", None),
    "parse_workers": ("processes that parse PDF, Word, HTML and image files (0: one per core but one)", _at_least(0)),
    "parse_timeout": ("seconds one file may take to parse before it is reported and skipped", _at_least(1.0)),
    "embed_device": ("where the embedding model runs: auto (a CUDA GPU when torch sees one), cpu, cuda",
                     _choice("auto", "cpu", "cuda")),
    "search_mode": ("retrieval mode", _choice("dense", "lexical", "hybrid")),
    "top_k": ("passages to retrieve", _at_least(1)),
    "reranker": ("local CrossEncoder model folder to rerank with (empty: none)", None),
    "model": ("chat model: a GGUF file or a name from `kb models` (empty: the bundled SmolLM2-135M-Instruct)", None),
    "model_paths": ("more folders where `kb models` looks for GGUF files, comma-separated", None),
    "llm_url": ("an OpenAI-compatible server that generates instead (its /v1/chat/completions), e.g. http://gpu-box:8080/v1",
                None),
    "llm_model": ("the model name to ask the server for (empty: the first it lists)", None),
    "llm_api_key": ("the model server's API key (better set as KB_LLM_API_KEY than in a file)", None),
    "llm_timeout": ("seconds to wait for the model server", _at_least(1.0)),
    "ctx": ("context window in tokens", _at_least(64)),
    "threads": ("CPU threads (0: all cores)", _at_least(0)),
    "gpu_layers": ("layers to offload to the GPU (needs a GPU build of llama-cpp-python)", _at_least(-1)),
    "temperature": ("sampling temperature", _between(0.0, 5.0)),
    "max_tokens": ("longest answer in tokens", _at_least(1)),
    "seed": ("sampling seed", None),
    "min_score": ("answerability below which kb refuses to answer (0: never refuses)", _between(0.0, 1.0)),
    "extractive": ("answer with the best evidence itself, quoted and cited, without the chat model", None),
    "check_support": ("replace a generated answer whose words or numbers are not in the passages it cites, that "
                      "does not state the date, number, name or place asked for, or that repeats an earlier answer "
                      "of the conversation, by the evidence", None),
    "overrule_refusal": ("answerability at which the evidence answers although the model refused (1: never)",
                         _between(0.0, 1.0)),
    "model_languages": ("languages the chat model writes, comma-separated (empty: what the GGUF declares)", None),
    "persona": ("system-prompt preset (`kb personas`)", None),
    "adapter": ("LoRA adapter from `kb adapters`, or a .gguf adapter path", None),
    "adapter_scale": ("strength of the adapter", _between(0.0, 10.0)),
    "verbose": ("show llama.cpp's own log", None),
}


@dataclass(frozen=True)
class Settings:
    """Every tunable of kb in one place. Each field can be set in `config.toml` or as KB_<FIELD>."""

    store: str = ""  # empty: SQLite + FAISS in the home; or postgresql://...
    # embedding and chunking
    embedding_model: str = ""
    embed_url: str = ""
    embed_model: str = ""
    embed_api_key: str = ""
    chunk_overlap: int = 32
    embed_batch_size: int = 64
    embed_precision: str = "auto"
    embed_device: str = "auto"
    ocr: bool = True
    parse_workers: int = 0
    parse_timeout: float = 600.0
    # retrieval
    search_mode: str = "hybrid"
    top_k: int = 5
    reranker: str = ""
    # generation
    model: str = ""
    model_paths: str = ""
    llm_url: str = ""
    llm_model: str = ""
    llm_api_key: str = ""
    llm_timeout: float = 120.0
    ctx: int = 2048
    threads: int = 0
    gpu_layers: int = 0
    temperature: float = 0.2
    max_tokens: int = 256
    seed: int = 0
    # answers: refused without calling the model when the evidence's answerability is below min_score;
    # 0.5 is the calibrated point (kb/evidence.py, docs/answers.md)
    min_score: float = 0.5
    extractive: bool = False
    check_support: bool = True
    # a model's "the documents do not contain the answer" is overruled by the evidence at this answerability
    # or above (1 never: the model's refusal stands); 0.8 keeps 75% of answerable questions and 5% of
    # unanswerable ones on the calibration sets (docs/answers.md)
    overrule_refusal: float = 0.8
    model_languages: str = ""
    persona: str = ""
    adapter: str = ""
    adapter_scale: float = 1.0
    verbose: bool = False
    # where each value came from: "default", the config file's path, "env KB_X" or "flag"
    origins: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "origins"]

    @classmethod
    def load(cls, home: Path, **overrides) -> "Settings":
        """Settings for `home`: defaults < `<home>/config.toml` < KB_* variables < `overrides` (flags).

        Overrides that are None are not given. Raises BadSetting naming the key and its source."""
        names = cls.names()
        defaults = {f.name: f.default for f in fields(cls) if f.name != "origins"}
        values = dict(defaults)
        origins = {name: "default" for name in names}
        config_file = home / CONFIG_NAME
        if config_file.is_file():
            try:
                with config_file.open("rb") as f:
                    from_file = tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise BadSetting(f"{config_file} is not valid TOML: {e}", hint="fix or remove the file") from e
            except OSError as e:
                raise BadSetting(f"cannot read {config_file}: {e.strerror or e}") from e
            for key, value in from_file.items():
                _known(key, f"in {config_file}")
                values[key] = _typed(key, value, defaults, f"{key} in {config_file}")
                origins[key] = str(config_file)
        for name in names:
            variable = f"KB_{name.upper()}"
            if variable in os.environ:
                values[name] = _typed(name, os.environ[variable], defaults, variable)
                origins[name] = f"env {variable}"
        for key, value in overrides.items():
            if value is None:
                continue
            _known(key, "given to kb")
            values[key] = _typed(key, value, defaults, key)
            origins[key] = "flag"
        return cls(**values, origins=origins)

    def replace(self, **changes) -> "Settings":
        """A copy with `changes` (validated like flags)."""
        values = {name: getattr(self, name) for name in self.names()}
        origins = dict(self.origins)
        defaults = {f.name: f.default for f in fields(self) if f.name != "origins"}
        for key, value in changes.items():
            if value is not None:
                _known(key, "given to kb")
                values[key] = _typed(key, value, defaults, key)
                origins[key] = "flag"
        return Settings(**values, origins=origins)


def _known(key: str, where: str) -> str:
    if key in SETTINGS_HELP:
        return key
    close = difflib.get_close_matches(key, list(SETTINGS_HELP), n=3)
    raise BadSetting(f"unknown setting {key!r} {where}",
                     hint=(f"did you mean {' or '.join(close)}? " if close else "") + "`kb config` lists the settings")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _typed(name: str, value, defaults: dict, source: str):
    """`value` converted to the type of the setting's default, and checked; BadSetting names `source`."""
    kind = type(defaults[name])
    try:
        if kind is bool:
            if isinstance(value, bool):
                converted = value
            elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                converted = value.strip().lower() in _TRUE
            else:
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            converted = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            converted = float(value)
            if converted != converted:  # NaN
                raise ValueError
        else:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            converted = str(value)
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[kind]
        raise BadSetting(f"{source} = {value!r} is not valid: {name} must be {expected}",
                         hint=SETTINGS_HELP[name][0]) from None
    check = SETTINGS_HELP[name][1]
    problem = check(converted) if check else None
    if problem:
        raise BadSetting(f"{source} = {value!r} is not valid: {name} must be {problem}", hint=SETTINGS_HELP[name][0])
    return converted


__all__ = ["Settings", "BadSetting", "kb_home", "SETTINGS_HELP", "CONFIG_NAME"]
