"""Content digests: sha256 of file contents, the identity the run's stage fingerprints and the manifest use.

Hashing a 14 GB checkpoint on every plan would cost a minute, so a digest is remembered per file under a stat key
(size, mtime, ctime, inode, device).  The key is only a memo that is re-checked on every use, never the identity:
any change of the key re-hashes the file, and so does a file whose last change (ctime) is too close to the moment
it was hashed, since a write in the same timestamp tick would leave the key unchanged.  This is git's "racy clean"
rule (https://git-scm.com/docs/racy-git).  ctime cannot be set from user space, so a file rewritten with the same
size and its mtime put back (``touch -r``, ``cp -p``, ``os.utime``) is still re-hashed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

# a file changed less than this before it was hashed is hashed again next time (coarse filesystem clocks: ext4
# stamps with the kernel tick, FAT and some network filesystems with 2 s)
RACY_NS = 2_000_000_000
CHUNK = 1 << 22


def _key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes, always read (no memo)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def combine(entries) -> str:
    """One digest of a JSON-able value (a dict of digests, options)."""
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()


class Memo:
    """Digests remembered per real path under a re-checked stat key; optionally kept in a JSON file."""

    def __init__(self, file: Path | None = None, entries: dict | None = None):
        """``entries``: share another memo's entries (a run shares the process-wide one, so the manifest and the
        stage records hash a file once)."""
        self.file = Path(file) if file else None
        self.entries: dict[str, dict] = entries if entries is not None else {}
        self.used: set[str] = set()
        if self.file and self.file.exists():
            try:
                for k, v in json.loads(self.file.read_text()).items():
                    self.entries.setdefault(k, v)
            except (OSError, json.JSONDecodeError, AttributeError):
                log.info("ignoring unreadable digest memo %s", self.file)

    def file_digest(self, path: Path | str) -> str:
        real = os.path.realpath(path)
        st = os.stat(real)
        key = _key(st)
        e = self.entries.get(real)
        self.used.add(real)
        if e and e.get("key") == key and st.st_ctime_ns + RACY_NS <= e.get("hashed_at_ns", 0):
            return e["sha256"]
        started = time.time_ns()
        digest = sha256_file(real)
        st2 = os.stat(real)
        if _key(st2) == key:  # unchanged while it was read
            self.entries[real] = {"key": key, "hashed_at_ns": started, "sha256": digest}
        else:
            self.entries.pop(real, None)
        return digest

    def tree(self, root: Path, exclude: Iterable[str] = (), recursive: bool = True) -> dict[str, str]:
        """{path relative to root: sha256} for the regular files under root (symlinks followed), skipping names
        that start with "." (temporary and bookkeeping files) and the relative paths in ``exclude``."""
        root = Path(root)
        skip = set(exclude)
        out = {}
        if not root.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                rel = p.relative_to(root).as_posix()
                if rel in skip or not p.is_file():
                    continue
                out[rel] = self.file_digest(p)
        return out

    def save(self) -> None:
        """Write the entries used in this process (atomically); entries for files no longer read are dropped."""
        if not self.file:
            return
        keep = {k: v for k, v in self.entries.items() if k in self.used}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(keep, indent=0, sort_keys=True))
        os.replace(tmp, self.file)


PROCESS = Memo()  # process-wide, in memory


def file_digest(path: Path | str) -> str:
    return PROCESS.file_digest(path)


def run_memo(file: Path) -> Memo:
    """A memo kept in ``file`` that shares the process-wide entries."""
    return Memo(file, entries=PROCESS.entries)
