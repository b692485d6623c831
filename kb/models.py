"""GGUF chat models: the ones already on this machine, ones fetched on request, and picking one by name.

Discovery looks, without network, in: the bundled model; `<home>/models/`; Ollama's store (its manifests
name the blobs, which are GGUF files named by sha256: `$OLLAMA_MODELS`, default ~/.ollama/models); LM Studio
(`$LMSTUDIO_MODELS`, default ~/.lmstudio/models and ~/.cache/lm-studio/models); GPT4All (`$GPT4ALL_MODELS`,
default ~/.local/share/nomic.ai/GPT4All); the Hugging Face cache (`$HF_HUB_CACHE`, or `$HF_HOME`/hub, default
~/.cache/huggingface/hub); and any folder in the `model_paths` setting. None needs to exist. Only each file's
header is read (kb.gguf), and what was read is cached by path, size and modification time.

`pull` downloads into `<home>/models/` under a `.part` name, resuming with HTTP range requests, checks the
sha256 (given, or published by the server) and the GGUF header, and only then gives the file its name.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from kb.errors import KBError, ModelNotFound
from kb.gguf import NotGGUF, parameter_count, read_header

PULLED = "pulled.json"  # what kb downloaded into <home>/models (so `rm` never deletes anything else)
CACHE = ".index.json"
_SIZE_LABEL = re.compile(r"^(\d+(?:\.\d+)?)([KMBT])$", re.I)


@dataclass
class ModelInfo:
    name: str
    path: str
    source: str  # bundled, home, ollama, lmstudio, gpt4all, huggingface, folder
    size: int
    architecture: str = ""
    quantization: str = ""
    parameters: int | None = None
    context_length: int | None = None
    chat_template: bool = False
    languages: list[str] | None = None
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _env_dirs(variable: str, defaults: list[str]) -> list[Path]:
    value = os.environ.get(variable)
    return [Path(value).expanduser()] if value else [Path(d).expanduser() for d in defaults]


def locations(home: Path, extra: str = "") -> list[tuple[str, Path]]:
    """(source, folder) of every place kb looks for models."""
    hf = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
    places = [("home", Path(home) / "models")]
    places += [("ollama", p) for p in _env_dirs("OLLAMA_MODELS", ["~/.ollama/models"])]
    places += [("lmstudio", p) for p in _env_dirs("LMSTUDIO_MODELS", ["~/.lmstudio/models", "~/.cache/lm-studio/models"])]
    places += [("gpt4all", p) for p in _env_dirs("GPT4ALL_MODELS", ["~/.local/share/nomic.ai/GPT4All"])]
    places += [("huggingface", Path(hf).expanduser() if hf else Path("~/.cache/huggingface/hub").expanduser())]
    places += [("folder", Path(p.strip()).expanduser()) for p in extra.split(",") if p.strip()]
    return places


def _ollama(folder: Path) -> list[tuple[str, Path]]:
    """(name:tag, blob) for each Ollama manifest whose model layer is present."""
    out = []
    manifests = folder / "manifests"
    if not manifests.is_dir():
        return out
    for manifest in sorted(manifests.rglob("*")):
        if not manifest.is_file():
            continue
        try:
            layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
        except (OSError, ValueError, AttributeError):
            continue
        digest = next((layer.get("digest") for layer in layers if isinstance(layer, dict)
                       and layer.get("mediaType") == "application/vnd.ollama.image.model"), None)
        if not digest:
            continue
        blob = folder / "blobs" / digest.replace(":", "-")
        parts = manifest.relative_to(manifests).parts  # registry/namespace/model/tag
        model, tag = parts[-2], parts[-1]
        namespace = parts[-3] if len(parts) >= 3 else "library"
        name = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
        if blob.is_file():
            out.append((name, blob))
    return out


def _ggufs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.gguf") if p.is_file() and not p.name.startswith("."))


def _stem_name(path: Path, source: str) -> str:
    if source == "huggingface":  # hub/models--ORG--REPO/snapshots/REV/FILE.gguf
        repo = next((part for part in path.parts if part.startswith("models--")), "")
        if repo:
            return f"{repo[len('models--'):].replace('--', '/')}/{path.stem}"
    return path.stem


class _HeaderCache:
    def __init__(self, home: Path):
        self.path = Path(home) / "models" / CACHE
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}
        self.changed = False

    def describe(self, name: str, path: Path, source: str) -> ModelInfo:
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        cached = self.data.get(key)
        if cached is None:
            cached = _describe(path)
            self.data[key] = cached
            self.changed = True
        return ModelInfo(name=name, path=str(path), source=source, size=st.st_size, **cached)

    def save(self) -> None:
        if self.changed and self.path.parent.is_dir():
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data), encoding="utf-8")
            os.replace(tmp, self.path)


def _describe(path: Path) -> dict:
    try:
        header = read_header(path)
    except NotGGUF as e:
        return {"error": str(e)}
    params = parameter_count(header)
    if params is None:
        label = _SIZE_LABEL.match(str(header.get("general.size_label") or ""))
        if label:
            params = int(float(label.group(1)) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[label.group(2).upper()])
    return {"architecture": header.architecture, "quantization": header.quantization, "parameters": params,
            "context_length": header.context_length, "chat_template": header.has_chat_template,
            "languages": header.languages or None}


def discover(home: Path, extra: str = "") -> list[ModelInfo]:
    """Every GGUF model found (headers only), the bundled one first; unreadable files are listed with why."""
    from kb.generator import bundled_model_path

    cache = _HeaderCache(home)
    found: list[ModelInfo] = []
    seen: set[str] = set()

    def add(name: str, path: Path, source: str) -> None:
        real = str(path.resolve())
        if real in seen:
            return
        seen.add(real)
        found.append(cache.describe(name, path, source))

    try:
        add("bundled", bundled_model_path(), "bundled")
    except ModelNotFound:
        pass
    for source, folder in locations(home, extra):
        if source == "ollama":
            for name, blob in _ollama(folder):
                add(name, blob, source)
            continue
        for path in _ggufs(folder):
            add(_stem_name(path, source), path, source)
    cache.save()
    return found


def resolve_name(home: Path, name: str, extra: str = "") -> Path:
    """The file of the model called `name` in `discover`'s list; a clear error for an unknown or ambiguous one."""
    models = [m for m in discover(home, extra) if not m.error]
    exact = [m for m in models if m.name == name]
    if not exact and ":" not in name:  # "qwen2.5" means Ollama's "qwen2.5:latest"
        exact = [m for m in models if m.name == f"{name}:latest"]
    if len(exact) == 1:
        return Path(exact[0].path)
    if len(exact) > 1:
        raise ModelNotFound(f"{len(exact)} models are called {name!r}: "
                            + ", ".join(f"{m.path} ({m.source})" for m in exact),
                            hint="give the path of the one you mean to --model")
    close = difflib.get_close_matches(name, [m.name for m in models], n=4, cutoff=0.5)
    close += [m.name for m in models if name.lower() in m.name.lower() and m.name not in close][:4]
    raise ModelNotFound(f"no model file or model named {name!r}",
                        hint=(f"did you mean {', '.join(close)}? " if close else "") + "`kb models` lists the models found")


# --- pulling -----------------------------------------------------------------------------------------


class PullError(KBError):
    """A download that failed, did not verify, or is not a GGUF model."""


def expand_url(url: str) -> str:
    """hf://OWNER/REPO/FILE.gguf (or hf://OWNER/REPO/REV/FILE.gguf) -> the Hugging Face download URL."""
    if url.startswith("hf://"):
        parts = url[5:].strip("/").split("/")
        if len(parts) < 3:
            raise PullError(f"{url} is not hf://OWNER/REPO/FILE.gguf")
        owner, repo, rest = parts[0], parts[1], parts[2:]
        return f"https://huggingface.co/{owner}/{repo}/resolve/main/{'/'.join(rest)}"
    if not url.startswith(("http://", "https://")):
        raise PullError(f"{url} is not an http(s):// or hf:// URL")
    return url


def _pulled(folder: Path) -> dict:
    try:
        return json.loads((folder / PULLED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _save_pulled(folder: Path, data: dict) -> None:
    tmp = folder / f".{PULLED}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, folder / PULLED)


def pull(home: Path, url: str, *, name: str | None = None, sha256: str | None = None, timeout: float = 30.0,
         progress: Callable[[int, int | None], None] | None = None) -> ModelInfo:
    """Download a GGUF model into `<home>/models/`; returns it as `kb models` lists it."""
    import httpx

    source = expand_url(url)
    file_name = re.sub(r"[^\w.+-]", "_", (name or Path(httpx.URL(source).path).name or "model").strip())
    if not file_name.endswith(".gguf"):
        file_name += ".gguf"
    folder = Path(home) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    target, part = folder / file_name, folder / f".{file_name}.part"
    if target.exists():
        raise PullError(f"{target} exists already", hint=f"remove it first: kb models rm {target.stem}")
    expected = sha256.lower() if sha256 else None
    if expected and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise PullError(f"{sha256} is not a sha256 (64 hexadecimal characters)")
    published = _download(source, part, timeout, progress)
    expected = expected or published
    digest = _sha256(part)
    if expected and digest != expected:
        part.unlink()
        raise PullError(f"the download from {url} has sha256 {digest}, not {expected}: it was deleted",
                        hint="check the URL and the checksum; the file may have been changed or damaged")
    try:
        header = read_header(part)
    except NotGGUF as e:
        part.unlink()
        raise PullError(f"{url} is not a GGUF model file ({e}): it was deleted",
                        hint="kb runs models in llama.cpp's GGUF format; look for a .gguf build of the model") from e
    del header
    os.replace(part, target)
    pulled = _pulled(folder)
    pulled[target.stem] = {"file": target.name, "url": url, "sha256": digest, "pulled_at": time.time()}
    _save_pulled(folder, pulled)
    return _HeaderCache(home).describe(target.stem, target, "home")


def _download(url: str, part: Path, timeout: float, progress) -> str | None:
    """Fetch `url` into `part`, resuming what an earlier attempt left; returns the sha256 the server
    publishes for it, if it does (Hugging Face's X-Linked-Etag, a sha256 ETag, a Digest header)."""
    import httpx

    done = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={done}-"} if done else {}
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True,
                          timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0))) as response:
            if response.status_code == 416 and done:  # already complete
                return _published(response)
            if response.status_code >= 400:
                raise PullError(f"{url} answered {response.status_code} {response.reason_phrase}",
                                hint="check the URL (and for a gated Hugging Face model, accept its licence first)")
            resumed = response.status_code == 206
            if not resumed:
                done = 0
            length = response.headers.get("content-length")
            total = done + int(length) if length and length.isdigit() else None
            with part.open("ab" if resumed else "wb") as out:
                for block in response.iter_bytes():  # as it arrives: a dropped connection keeps what came
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if total is not None and done < total:
                raise PullError(f"the download from {url} stopped at {done} of {total} bytes",
                                hint="run the same `kb models pull` again: it resumes where it stopped")
            return _published(response)
    except httpx.TimeoutException as e:
        raise PullError(f"{url} did not answer within {timeout:.0f} s ({type(e).__name__}); "
                        f"{done} bytes are kept to resume", hint="run the same `kb models pull` again later") from e
    except httpx.HTTPError as e:
        raise PullError(f"the download from {url} failed ({e}); {done} bytes are kept to resume",
                        hint="run the same `kb models pull` again: it resumes where it stopped") from e


def _published(response) -> str | None:
    for header in ("x-linked-etag", "etag"):
        value = response.headers.get(header, "").strip('"W/ ').lower()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    digest = response.headers.get("digest", "")
    match = re.search(r"sha-256=([0-9a-f]{64})", digest.lower())
    return match.group(1) if match else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove(home: Path, name: str) -> Path:
    """Delete a model kb pulled; any other file is refused."""
    folder = Path(home) / "models"
    pulled = _pulled(folder)
    if name not in pulled:
        raise ModelNotFound(f"kb did not pull a model named {name!r}, so it will not delete it",
                            hint="`kb models` lists models; kb removes only those `kb models pull` downloaded")
    path = folder / pulled.pop(name)["file"]
    path.unlink(missing_ok=True)
    _save_pulled(folder, pulled)
    return path


def set_default(home: Path, name: str, extra: str = "") -> Path:
    """Make `name` (a model from `discover`, or a GGUF path) the home's `model` setting in config.toml."""
    from kb.config import CONFIG_NAME

    candidate = Path(name).expanduser()
    path = candidate if candidate.is_file() else resolve_name(home, name, extra)
    read_header(path)  # a GGUF, or a clear error
    config = Path(home) / CONFIG_NAME
    lines = config.read_text(encoding="utf-8").splitlines() if config.is_file() else []
    value = json.dumps(name if not candidate.is_file() else str(path.resolve()), ensure_ascii=False)
    setting = f"model = {value}"
    replaced = [setting if re.match(r"^\s*model\s*=", line) else line for line in lines]
    if replaced == lines:
        replaced = lines + [setting]
    config.parent.mkdir(parents=True, exist_ok=True)
    tmp = config.with_name(f".{config.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(replaced) + "\n", encoding="utf-8")
    os.replace(tmp, config)
    return path


__all__ = ["ModelInfo", "discover", "resolve_name", "pull", "remove", "set_default", "expand_url", "PullError",
           "locations"]
