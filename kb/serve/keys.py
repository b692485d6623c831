"""API keys for `kb serve`: stored hashed in the home (`keys.json`), shown once, compared in constant time.

A key is `kb-` followed by 43 URL-safe characters (256 random bits). Only its SHA-256 is stored, so a copy
of the home does not leak usable keys. Roles: `read` may ask and search, `write` may also add and delete
documents.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from kb.errors import KBError

KEYS_NAME = "keys.json"
ROLES = ("read", "write")
_NAME = re.compile(r"^[\w.@-]{1,64}$")


class KeyError_(KBError):
    """A key name that is taken, unknown or malformed, or an unknown role."""


@dataclass
class Key:
    name: str
    role: str
    created_at: float


def _path(home: Path) -> Path:
    return Path(home) / KEYS_NAME


def _load(home: Path) -> dict:
    try:
        data = json.loads(_path(home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise KBError(f"{_path(home)} is unreadable ({e})", hint="fix it, or delete it and create keys again") from e
    return data if isinstance(data, dict) else {}


def _save(home: Path, data: dict) -> None:
    path = _path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(home: Path, name: str, role: str = "read") -> str:
    """Create key `name` with `role`; returns the secret, which is not stored and cannot be shown again."""
    if not _NAME.match(name):
        raise KeyError_(f"invalid key name {name!r}", hint="use letters, digits, '.', '_', '-' or '@' (64 at most)")
    if role not in ROLES:
        raise KeyError_(f"unknown role {role!r}", hint="use read or write")
    data = _load(home)
    if name in data:
        raise KeyError_(f"a key named {name!r} exists already", hint=f"revoke it first: kb keys revoke {name}")
    secret = "kb-" + secrets.token_urlsafe(32)
    data[name] = {"sha256": _digest(secret), "role": role, "created_at": time.time()}
    _save(home, data)
    return secret


def list_keys(home: Path) -> list[Key]:
    return [Key(name, v.get("role", "read"), v.get("created_at", 0.0)) for name, v in sorted(_load(home).items())]


def revoke_key(home: Path, name: str) -> None:
    data = _load(home)
    if name not in data:
        raise KeyError_(f"no key named {name!r}", hint="`kb keys list` shows them")
    del data[name]
    _save(home, data)


class KeyRing:
    """The keys of a running server, re-read when keys.json changes (a key revoked stops working at once)."""

    def __init__(self, home: Path):
        self.home = Path(home)
        self._stamp = None
        self._keys: list[tuple[str, str, str]] = []  # (digest, name, role)

    def _refresh(self) -> None:
        try:
            st = _path(self.home).stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._keys = [(v["sha256"], name, v.get("role", "read")) for name, v in _load(self.home).items()]
            self._stamp = stamp

    @property
    def enabled(self) -> bool:
        self._refresh()
        return bool(self._keys)

    def check(self, secret: str | None) -> tuple[str, str] | None:
        """(name, role) for a valid secret, else None. Every stored digest is compared, in constant time."""
        self._refresh()
        if not secret:
            return None
        digest = _digest(secret)
        found = None
        for stored, name, role in self._keys:
            if hmac.compare_digest(stored, digest):
                found = (name, role)
        return found


__all__ = ["create_key", "list_keys", "revoke_key", "KeyRing", "Key", "ROLES"]
