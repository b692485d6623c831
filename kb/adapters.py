"""LoRA adapters in the kb home: listing, removing, and resolving one for a base model (no torch here)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from kb.errors import KBError, ModelNotFound


class AdapterMismatch(KBError):
    """An adapter trained on another base model than the one asked for."""


class UnsupportedModel(KBError):
    """A base model kb cannot train or convert adapters for yet."""


SUPPORTED_ARCHITECTURES = ("llama",)


def adapters_dir(home: Path) -> Path:
    return Path(home) / "adapters"


def file_sha256(path: Path, home: Path | None = None) -> str:
    """sha256 of a (large) file, cached in the home by path, size and mtime so asks do not rehash 100 MB."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = adapters_dir(home) / ".hashes.json" if home else None
    cache: dict = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except ValueError:
            cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache[key] = digest
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    return digest


def list_adapters(home: Path) -> list[dict]:
    """Every finished adapter (NAME.gguf with NAME.json card), plus unfinished runs that can be resumed."""
    folder = adapters_dir(home)
    out = []
    if not folder.is_dir():
        return out
    for card_path in sorted(folder.glob("*.json")):
        if card_path.name.startswith("."):
            continue
        try:
            card = json.loads(card_path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        gguf = folder / f"{card_path.stem}.gguf"
        card["name"] = card_path.stem
        card["path"] = str(gguf)
        card["finished"] = gguf.is_file()
        out.append(card)
    named = {card["name"] for card in out}
    for run in sorted(folder.glob("*.run")):
        if run.stem in named or not (run / "config.json").is_file():
            continue
        progress = run / "checkpoint" / "progress.json"
        try:
            steps_done = json.loads(progress.read_text())["step"] if progress.is_file() else 0
        except (ValueError, KeyError):
            steps_done = None
        out.append({"name": run.stem, "path": str(run), "finished": False, "steps_done": steps_done})
    return sorted(out, key=lambda card: card["name"])


def remove_adapter(home: Path, name: str) -> None:
    folder = adapters_dir(home)
    paths = [folder / f"{name}.gguf", folder / f"{name}.json", folder / f"{name}.run"]
    if not any(p.exists() for p in paths):
        raise ModelNotFound(f"no adapter named {name!r}", hint="`kb adapters` lists them")
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def resolve_adapter(home: Path, name: str, base_model: Path) -> Path:
    """The adapter file for `name` (a name in the home, or a path), checked against the base model's hash."""
    folder = adapters_dir(home)
    candidate = Path(name).expanduser()
    if candidate.suffix == ".gguf" and candidate.is_file():
        gguf, card_path = candidate, candidate.with_suffix(".json")
    else:
        gguf, card_path = folder / f"{name}.gguf", folder / f"{name}.json"
    if not gguf.is_file():
        raise ModelNotFound(f"no adapter named {name!r}" + (" (its training has not finished)" if card_path.is_file() else ""),
                            hint="`kb adapters` lists them; `kb finetune --resume NAME` finishes a stopped run")
    if card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        expected = card.get("base_sha256")
        if expected and expected != file_sha256(base_model, home):
            raise AdapterMismatch(
                f"adapter {name!r} was trained on {card.get('base_model_name', 'another model')}, "
                f"not on {base_model.name}",
                hint=f"use --model {card.get('base_model', 'PATH')} with this adapter, or train one for this model",
            )
    return gguf


_WARNED: set[str] = set()


def warn_if_prompt_changed(home: Path, name: str) -> None:
    """A `rag` adapter learned kb's answer prompt as it was: say so (once) if the templates changed since."""
    import logging

    candidate = Path(name).expanduser()
    card_path = candidate.with_suffix(".json") if candidate.suffix == ".gguf" else adapters_dir(home) / f"{name}.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if card.get("kind") != "rag" or not card.get("prompt_template_sha256") or name in _WARNED:
        return
    from kb.dataset import prompt_template_hash

    if card["prompt_template_sha256"] != prompt_template_hash(home):
        _WARNED.add(name)
        logging.getLogger("kb").warning(
            "adapter %s was trained on kb's answer prompt as it was; the prompt templates changed since, so it may "
            "answer worse: train it again (kb dataset build --kind rag, then kb finetune)", name)


__all__ = ["AdapterMismatch", "UnsupportedModel", "adapters_dir", "file_sha256", "list_adapters", "remove_adapter",
           "resolve_adapter", "warn_if_prompt_changed", "SUPPORTED_ARCHITECTURES"]
