"""Constants and file records shared by the bundle writer and the loader (no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path

FORMAT = "uembed-bundle"
FORMAT_VERSION = 1
ROW_DTYPES = ("float32", "float16", "int8")
NUMPY_ROW_DTYPE = {"float32": "float32", "float16": "float16", "int8": "uint8"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, relative: str) -> dict:
    """Manifest record of one bundle file: path relative to the bundle, size, sha256."""
    path = folder / relative
    return {"file": relative, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
