"""Where kb keeps its data and how settings are resolved: defaults < home config.toml < KB_* env < flags."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

HOME_ENV = "KB_HOME"


def kb_home(path: str | os.PathLike | None = None) -> Path:
    """The knowledge base folder: `path` if given, else $KB_HOME, else ~/.kb."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".kb"


@dataclass(frozen=True)
class Settings:
    """Every tunable of kb in one place. Each field can be set in `config.toml` or as KB_<FIELD>."""

    # embedding and chunking
    embedding_model: str = ""  # empty: the bundled all-MiniLM-L6-v2
    chunk_overlap: int = 32  # tokens carried over between neighbouring chunks of one section
    embed_batch_size: int = 64
    embed_precision: str = "auto"  # auto (bf16 where the CPU has it natively), fp32, bf16
    # retrieval
    search_mode: str = "hybrid"
    top_k: int = 5
    # generation
    model: str = ""  # empty: the bundled SmolLM2-135M-Instruct GGUF
    ctx: int = 2048
    threads: int = 0  # 0: all cores
    gpu_layers: int = 0
    temperature: float = 0.2
    max_tokens: int = 256
    seed: int = 0
    # answers are refused without calling the model when no passage's relevance reaches this;
    # 0.5 means "clears one calibrated signal" (kb/answer.py, docs/answers.md); 0 never refuses
    min_score: float = 0.5
    persona: str = ""
    # a LoRA adapter (a name from `kb adapters`, or a .gguf path) and its strength
    adapter: str = ""
    adapter_scale: float = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, home: Path, **overrides) -> "Settings":
        values: dict = {}
        config_file = home / "config.toml"
        if config_file.is_file():
            with config_file.open("rb") as f:
                values.update(tomllib.load(f))
        known = {f.name: f for f in fields(cls)}
        for name in known:
            env = os.environ.get(f"KB_{name.upper()}")
            if env is not None and name != "extra":
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        extra = {k: v for k, v in values.items() if k not in known}
        typed = {}
        for name, value in values.items():
            if name not in known or name == "extra":
                continue
            default = getattr(cls, name)
            typed[name] = type(default)(value) if not isinstance(value, type(default)) else value
        return cls(**typed, extra=extra)
