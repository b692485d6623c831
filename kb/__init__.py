"""kb: a private, local-first knowledge assistant. `from kb import KnowledgeBase`."""

from kb.errors import KBError, ModelMismatch, ModelNotFound, NotIngested

__version__ = "0.1.0"
__all__ = ["KnowledgeBase", "Filters", "KBError", "NotIngested", "ModelMismatch", "ModelNotFound"]


def __getattr__(name):
    # the API pulls in numpy and sqlite-utils; `kb --help` should not pay for them
    if name in ("KnowledgeBase", "Filters"):
        from kb import api

        return getattr(api, name)
    raise AttributeError(name)
