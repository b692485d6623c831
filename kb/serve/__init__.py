"""`kb serve`: an OpenAI-compatible API, kb's own API and a web page over one knowledge base.

`create_app(kb)` builds the application (kb/serve/app.py); `run(...)` checks the exposure rules and runs it
with uvicorn. The routes are a thin face over KnowledgeBase, as the command line is.
"""

from __future__ import annotations

import ipaddress

from kb.errors import KBError


class Exposed(KBError):
    """A non-loopback address without any API key."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys_enabled: bool) -> None:
    """Refuse to listen beyond this machine without keys: anyone on the network could read the documents."""
    if not is_loopback(host) and not keys_enabled:
        raise Exposed(
            f"refusing to listen on {host} without an API key: anyone who can reach it could read your documents",
            hint="create a key first (kb keys create NAME --role read), or listen on 127.0.0.1")


def run(kb, *, host: str = "127.0.0.1", port: int = 8000, queue: int = 8, max_upload_mb: int = 100,
        cors_origins: list[str] | None = None, log_level: str = "info") -> None:
    import uvicorn

    from kb.serve.app import create_app
    from kb.serve.keys import KeyRing

    check_exposure(host, KeyRing(kb.config_home).enabled)
    app = create_app(kb, queue=queue, max_upload_mb=max_upload_mb, cors_origins=cors_origins)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["run", "check_exposure", "is_loopback", "Exposed"]
