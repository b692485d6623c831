"""Find the files an ingest should take under the paths a user gave."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

FILE_TYPES = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".rst": "rst",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".tif": "image",
    ".tiff": "image",
    ".webp": "image",
    ".bmp": "image",
}


# Larger files are skipped with a reason: no real note, page or manual comes near these, and reading one
# whole (a log file named .txt, a disk image named .pdf) would stall an ingest.
MAX_BYTES = {"markdown": 64 << 20, "text": 64 << 20, "rst": 64 << 20, "html": 64 << 20,
             "pdf": 1 << 30, "docx": 512 << 20, "image": 256 << 20}


@dataclass
class Candidate:
    path: str  # absolute, symlinks kept as named so that a document stays under the folder it was found in
    root: str  # the folder the user named (or the file itself)
    file_type: str


@dataclass
class Discovery:
    files: list[Candidate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unsupported file types
    skipped_reasons: dict[str, str] = field(default_factory=dict)  # supported names that are not readable files
    failed: list[tuple[str, str]] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # folders walked completely: deletions are detected in these


def file_type_of(path: str) -> str | None:
    return FILE_TYPES.get(os.path.splitext(path)[1].lower())


def discover(paths: list[str]) -> Discovery:
    """Walk `paths` recursively. Unsupported files are skipped; hidden entries, .git and symlink loops are not followed."""
    found = Discovery()
    seen_files: set[str] = set()
    for given in paths:
        path = os.path.abspath(os.path.expanduser(given))
        if not os.path.lexists(path):
            found.failed.append((path, "no such file or directory"))
            continue
        if os.path.isdir(path):
            _walk(path, found, seen_files)
            found.roots.append(path)
        elif os.path.exists(path):
            _take(path, path, found, seen_files)
        else:
            found.failed.append((path, _why_unreadable(path)))
    return found


def _take(path: str, root: str, found: Discovery, seen: set[str]) -> None:
    ftype = file_type_of(path)
    if ftype is None:
        found.skipped.append(path)
        return
    try:
        real = os.path.realpath(path, strict=True)
        st = os.stat(real)
    except OSError as e:
        found.failed.append((path, _why_unreadable(path, e)))
        return
    if not stat.S_ISREG(st.st_mode):
        # a named pipe would block the ingest forever, /dev/zero or /dev/urandom never end
        found.skipped_reasons[path] = f"not a regular file ({_kind(st.st_mode)}{' via a symlink' if real != path else ''})"
        return
    if st.st_size > MAX_BYTES[ftype]:
        found.skipped_reasons[path] = (f"too large for a {ftype} file ({st.st_size / (1 << 20):.0f} MB, "
                                       f"the limit is {MAX_BYTES[ftype] >> 20} MB)")
        return
    if real in seen:
        return
    seen.add(real)
    found.files.append(Candidate(path=path, root=root, file_type=ftype))


def _walk(root: str, found: Discovery, seen_files: set[str]) -> None:
    visited_dirs: set[tuple[int, int]] = set()

    def on_error(err: OSError) -> None:
        found.failed.append((err.filename or root, f"cannot read folder: {err.strerror}"))

    for folder, dirs, files in os.walk(root, followlinks=True, onerror=on_error):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in visited_dirs:  # a symlink back into a folder already walked: a loop
            dirs[:] = []
            continue
        visited_dirs.add(key)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(folder, name)
            if name.startswith("."):
                found.skipped.append(full)
                continue
            _take(full, root, found, seen_files)


def _why_unreadable(path: str, err: OSError | None = None) -> str:
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == 40:
                return "symlink loop: the link points back to itself"
            return f"broken symlink to {os.readlink(path)}"
    if err is not None:
        return err.strerror or str(err)
    return "not a regular file"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


__all__ = ["Candidate", "Discovery", "discover", "file_type_of", "is_under", "FILE_TYPES"]
