"""The plain data that flows between ingest, the store, retrieval and generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Section:
    """A run of a document's text under one heading path (or on one PDF page)."""

    text: str
    headings: list[str] = field(default_factory=list)
    page: int | None = None


@dataclass
class ParsedDocument:
    """What a parser returns: metadata from the file plus its text in structural order."""

    path: str
    file_type: str
    title: str
    sections: list[Section]
    metadata: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # pages, ocr_pages, ocr_s (PDFs and images)


@dataclass
class Chunk:
    """One embeddable passage of a document."""

    text: str
    ord: int
    heading: str = ""
    page: int | None = None
    n_tokens: int = 0


@dataclass
class Hit:
    """One search result."""

    chunk_id: int
    score: float
    text: str
    path: str
    title: str
    heading: str = ""
    page: int | None = None
    file_type: str = ""
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FileFailure:
    path: str
    reason: str


@dataclass
class IngestReport:
    """The outcome of one `ingest`: what happened to each file, and how long each stage took."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[FileFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unsupported file types
    skipped_reasons: dict[str, str] = field(default_factory=dict)  # not regular files, too large
    warnings: list[str] = field(default_factory=list)
    chunks: int = 0
    reused_chunks: int = 0  # chunks whose vector was already in the index (renamed files, unchanged sections)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """False only when files were found and none of them could be taken."""
        taken = len(self.added) + len(self.updated) + len(self.unchanged) + len(self.removed)
        return taken > 0 or not self.failed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d
