"""Verification stamps: each bundle file's sha256 read once per file, not once per worker and start.

A file whose bytes once hashed to the sha256 the manifest expects gets a stamp: that sha256 and the file's key as
the filesystem reports it, ``[device, inode, size, mtime_ns, ctime_ns]``. A later load (a restart, another
worker, ``uembed publish``) that finds a stamp whose sha256 is the expected one and whose key is the file's key
now trusts the bytes without reading them. Any write through the filesystem moves mtime and ctime, a replaced
file has another inode, so a changed file is hashed again and refused. ctime cannot be set back by a user
(``os.utime`` sets mtime and moves ctime to now), so unlike make's and rsync's (size, mtime) rule, a writer that
restores a file's mtime is caught too.

What a stamp cannot see: bytes that change without the filesystem knowing (a failing disk, a block device
written under the filesystem, a clock set back by root). ``always`` (``UEMBED_VERIFY_ROWS=always``) hashes every
file at every load, as before stamps.

Where: ``<bundle>/.verified.json``, written atomically (a temporary file renamed over it); where the bundle's
folder is read-only, ``$XDG_CACHE_HOME/uembed/verified/<sha256 of the folder's path>.json``; where neither can
be written, nowhere (a debug log line): each load then hashes again, as before stamps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from uembed.bundle.format import sha256_file

log = logging.getLogger("uembed.bundle")

STAMP_FILE = ".verified.json"
VERIFY_MODES = ("once", "always")
STAMP_VERSION = 1


def file_key(path: Path) -> list[int]:
    """What the filesystem says of a file that any change to its bytes would change."""
    stat = os.stat(path)
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def cache_file(root: Path) -> Path:
    """Where a read-only bundle's stamps go: the user's cache, one file per bundle folder."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = hashlib.sha256(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return base / "uembed" / "verified" / f"{name}.json"


class Stamps:
    """A bundle's stamps: read at load, consulted before hashing a file, added to after a file passes.

    ``mode`` ``once`` trusts a valid stamp; ``always`` hashes every file (and still stamps it, for later loads).
    Thread-safe: the background row checks add stamps while the loader may still read them."""

    def __init__(self, root: Path, mode: str = "once") -> None:
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify mode {mode!r}: choose one of {', '.join(VERIFY_MODES)}")
        self.root, self.mode = Path(root), mode
        self.places = (self.root / STAMP_FILE, cache_file(self.root))
        self.lock = threading.Lock()
        self.files = self._read()

    def _read(self) -> dict[str, dict]:
        """Stamps from both places (the cache's first, the bundle's over them); unreadable ones are ignored."""
        files: dict[str, dict] = {}
        for place in reversed(self.places):
            try:
                data = json.loads(place.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and data.get("version") == STAMP_VERSION and isinstance(data.get("files"), dict):
                files.update({k: v for k, v in data.get("files", {}).items() if isinstance(v, dict)})
        return files

    def trusts(self, relative: str, sha256: str) -> bool:
        """Whether a stamp vouches that ``relative`` holds bytes hashing to ``sha256`` (never in mode ``always``)."""
        if self.mode != "once":
            return False
        with self.lock:
            stamp = self.files.get(relative)
        if stamp is None or stamp.get("sha256") != sha256:
            return False
        try:
            return stamp.get("key") == file_key(self.root / relative)
        except OSError:
            return False

    def verify(self, relative: str, sha256: str, chunk: int = 1 << 20, progress: Callable[[int], None] | None = None) -> bool:
        """Whether ``relative``'s bytes hash to ``sha256``: by its stamp, else by reading it (and stamping it when it
        passes and did not change while read). ``progress(bytes)`` counts a trusted file whole."""
        path = self.root / relative
        if self.trusts(relative, sha256):
            if progress is not None:
                progress(path.stat().st_size)
            return True
        before = file_key(path)
        if sha256_file(path, chunk, progress) != sha256:
            return False
        if file_key(path) == before:
            self.record(relative, sha256, before)
        return True

    def record(self, relative: str, sha256: str, key: list[int]) -> None:
        with self.lock:
            self.files[relative] = {"sha256": sha256, "key": key}
            self._save()

    def _save(self) -> None:
        """Write the stamps over the freshest file (another worker may have stamped other files meanwhile)."""
        for place in self.places:
            try:
                files = {**self._read(), **self.files}
                place.parent.mkdir(parents=True, exist_ok=True)
                handle, temporary = tempfile.mkstemp(prefix=f"{place.name}.", suffix=".tmp", dir=place.parent)
                try:
                    with os.fdopen(handle, "w", encoding="utf-8") as out:
                        json.dump({"version": STAMP_VERSION, "bundle": os.path.abspath(self.root), "files": files}, out)
                    os.replace(temporary, place)
                except BaseException:
                    Path(temporary).unlink(missing_ok=True)
                    raise
                return
            except OSError as exc:
                log.debug("bundle %s: verification stamps not written to %s: %s", self.root, place, exc)
