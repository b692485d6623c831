"""Typed errors raised by kb's library; only kb.cli turns them into messages for a person."""


class KBError(Exception):
    """Base of every error kb raises on purpose. `hint` says what the user can do about it."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class NotIngested(KBError):
    """The knowledge base has no documents yet."""

    hint = "run `kb ingest PATH` first"


class ModelMismatch(KBError):
    """The index was built with another embedding model than the one asked for."""


class ModelNotFound(KBError):
    """A model file or folder does not exist or cannot be loaded."""


class DamagedIndex(KBError):
    """The knowledge base's database is corrupt or not a database."""


class Locked(KBError):
    """Another process holds the write lock of this knowledge base."""


class UnsupportedFile(KBError):
    """A file kb cannot take: wrong type, binary content, encrypted, no text."""


class EmptyDocument(UnsupportedFile):
    """A file that parsed but yielded no text."""


class NothingIngested(KBError):
    """An ingest found files but could not take any of them."""


class BadQuestion(KBError):
    """An empty or unusable question or query."""


class TemplateError(KBError):
    """A prompt template is missing or a variable it needs was not given."""
