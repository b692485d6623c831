"""Read a GGUF file's header (metadata key-values) without loading the model or importing llama.cpp.

Only the header is read: a 40 GB model is described in milliseconds. Large arrays (the tokenizer's
vocabulary and merges) are skipped, keeping only their length, unless asked for.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from kb.errors import KBError

MAGIC = b"GGUF"

# GGUF value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i", _FLOAT32: "<f",
    _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_SIZES = {t: struct.calcsize(f) for t, f in _SCALAR.items()}
# Arrays longer than this are not materialized (tokenizer vocabularies): only their length is kept.
_KEEP_ARRAY = 256
# A header cannot plausibly claim more key-values than this; more means a corrupt or hostile file.
_MAX_KV = 100_000

# llama.cpp's file types (general.file_type), the quantization a user recognizes in a model's name.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


class NotGGUF(KBError):
    """A file that is not a readable GGUF model (wrong magic, truncated or corrupt header)."""


@dataclass
class GGUFHeader:
    path: str
    version: int
    tensor_count: int
    metadata: dict = field(default_factory=dict)
    array_lengths: dict = field(default_factory=dict)  # key -> length, for arrays not materialized

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture") or "")

    @property
    def context_length(self) -> int | None:
        value = self.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def quantization(self) -> str:
        file_type = self.get("general.file_type")
        return FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else ""

    @property
    def has_chat_template(self) -> bool:
        return bool(self.get("tokenizer.chat_template"))

    @property
    def languages(self) -> list[str]:
        """Languages the file declares (`general.languages`), lower-cased; empty when it declares none."""
        value = self.get("general.languages")
        if isinstance(value, str):
            value = [value]
        return [str(v).strip().lower() for v in value or [] if str(v).strip()]


class _Reader:
    def __init__(self, buf, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise NotGGUF(f"{self.path}: the GGUF header is truncated or corrupt",
                          hint="the download may be incomplete; fetch the file again")

    def scalar(self, vtype: int):
        fmt = _SCALAR[vtype]
        size = _SIZES[vtype]
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, keep: bool = True) -> str | None:
        n = self.scalar(_UINT64)
        self.need(n)
        start = self.pos
        self.pos += n
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace") if keep else None

    def value(self, vtype: int, key: str, lengths: dict):
        if vtype in _SCALAR:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar(_UINT32)
            count = self.scalar(_UINT64)
            keep = count <= _KEEP_ARRAY
            if not keep:
                lengths[key] = count
            if etype in _SCALAR:
                size = _SIZES[etype] * count
                self.need(size)
                if keep:
                    values = list(struct.unpack_from(f"<{count}{_SCALAR[etype][1]}", self.buf, self.pos))
                self.pos += size
                return values if keep else None
            if etype == _STRING:
                out = [self.string(keep) for _ in range(count)]
                return out if keep else None
            if etype == _ARRAY:
                out = [self.value(_ARRAY, key, {}) for _ in range(count)]
                return out if keep else None
            raise NotGGUF(f"{self.path}: unknown GGUF array element type {etype} in {key}")
        raise NotGGUF(f"{self.path}: unknown GGUF value type {vtype} in {key}")


def read_header(path: str | os.PathLike, *, until: frozenset[str] | set[str] | None = None) -> GGUFHeader:
    """The metadata of a GGUF file; raises NotGGUF for anything else. Reads the header only (memory-mapped).

    With `until`, reading stops once all those keys are read, or, when none of them is a tokenizer key, at
    the tokenizer's keys (its vocabulary is the slow part to walk; writers put general.* keys first).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) != MAGIC:
                raise NotGGUF(f"{path} is not a GGUF model file",
                              hint="kb runs models in llama.cpp's GGUF format; convert it or download a .gguf build")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:  # non-empty: the magic was read
                return _parse(buf, str(path), until)
    except OSError as e:
        raise NotGGUF(f"cannot read {path}: {e.strerror or e}") from e


def _parse(buf, path: str, until) -> GGUFHeader:
    r = _Reader(buf, path)
    r.pos = 4
    version = r.scalar(_UINT32)
    if version == 1:
        tensor_count, kv_count = r.scalar(_UINT32), r.scalar(_UINT32)
    elif version in (2, 3):
        tensor_count, kv_count = r.scalar(_UINT64), r.scalar(_UINT64)
    else:
        raise NotGGUF(f"{path}: unsupported GGUF version {version}", hint="kb reads GGUF versions 1 to 3")
    if kv_count > _MAX_KV:
        raise NotGGUF(f"{path}: the GGUF header claims {kv_count} metadata entries; the file is corrupt")
    metadata: dict = {}
    lengths: dict = {}
    stop_at_tokenizer = until is not None and not any(k.startswith("tokenizer.") for k in until)
    for _ in range(kv_count):
        key = r.string()
        if stop_at_tokenizer and key.startswith("tokenizer."):
            break
        vtype = r.scalar(_UINT32)
        metadata[key] = r.value(vtype, key, lengths)
        if until is not None and until <= metadata.keys():
            break
    return GGUFHeader(path=path, version=version, tensor_count=tensor_count, metadata=metadata,
                      array_lengths=lengths)


def parameter_count(header: GGUFHeader) -> int | None:
    """The parameter count the file declares (general.parameter_count), or None."""
    value = header.get("general.parameter_count")
    return int(value) if isinstance(value, int) else None


__all__ = ["GGUFHeader", "NotGGUF", "read_header", "parameter_count", "FILE_TYPES"]
