"""Prompt templates and personas: files with named variables, overridable from the kb home."""

from __future__ import annotations

import string
from importlib import resources
from pathlib import Path

from kb.errors import TemplateError

TEMPLATES = ("answer", "answer_prefix", "answer_prefix_zh", "chat_system", "condense", "summarize")


def _bundled(subfolder: str = "") -> Path:
    base = Path(str(resources.files("kb.prompts")))
    return base / subfolder if subfolder else base


def template_text(name: str, home: Path | None = None) -> str:
    """The text of template `name`: `<home>/prompts/<name>.txt` if the user put one there, else the bundled one."""
    for folder in ([home / "prompts"] if home else []) + [_bundled()]:
        path = folder / f"{name}.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise TemplateError(f"no prompt template named {name!r}", hint=f"templates are: {', '.join(TEMPLATES)}")


def template_fields(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def render(text: str, *, name: str = "template", **values) -> str:
    """Fill `{variable}`s; a variable the template needs but was not given is an error, never a blank."""
    needed = template_fields(text)
    missing = sorted(needed - values.keys())
    if missing:
        raise TemplateError(
            f"prompt template {name!r} needs {', '.join(missing)}, which kb does not provide",
            hint="templates may use only the variables of the bundled template of the same name; "
                 "write a literal brace as {{ or }}",
        )
    try:
        return text.format_map({k: values[k] for k in needed})
    except (ValueError, IndexError, AttributeError, KeyError) as e:
        raise TemplateError(f"prompt template {name!r} cannot be rendered: {e}",
                            hint="write a literal brace as {{ or }}") from e


def render_template(name: str, home: Path | None = None, **values) -> str:
    return render(template_text(name, home), name=name, **values)


def personas(home: Path | None = None) -> dict[str, tuple[str, str]]:
    """name -> (where it comes from, its text). A persona in `<home>/personas/` hides a bundled one."""
    found: dict[str, tuple[str, str]] = {}
    folders = [("bundled", _bundled("personas"))] + ([("home", home / "personas")] if home else [])
    for origin, folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.txt")):
                found[path.stem] = (origin if origin == "bundled" else str(path), path.read_text(encoding="utf-8").strip())
    return dict(sorted(found.items()))


def persona_text(name: str, home: Path | None = None) -> str:
    known = personas(home)
    if not name:
        name = "default"
    if name not in known:
        raise TemplateError(
            f"no persona named {name!r}",
            hint=f"`kb personas` lists them ({', '.join(known)}); add your own as {home or '~/.kb'}/personas/{name}.txt",
        )
    return known[name][1]


__all__ = ["TEMPLATES", "template_text", "render", "render_template", "personas", "persona_text"]
