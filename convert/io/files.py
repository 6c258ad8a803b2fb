"""File-system helpers the pipeline shares: content digests, atomic writes (a folder or a file written beside its
destination and renamed into place only when complete), the cache root, and a full disk turned into one clear error
that names the folder and the space needed.

Atomic writes: a rename within one folder is atomic on POSIX filesystems (rename(2)), so a reader sees the old output
or the new one, never a part of it; a killed process leaves only hidden ``.NAME.partial-PID`` / ``.NAME.old-PID``
entries, which the next run removes (convert/pipeline/run.py).

Digests: sha256 of file contents, the identity the run's stage fingerprints, caches and the manifest use.
Hashing a 14 GB checkpoint on every plan would cost a minute, so a digest is remembered per file under a stat key
(size, mtime, ctime, inode, device).  The key is only a memo that is re-checked on every use, never the identity:
any change of the key re-hashes the file, and so does a file whose last change (ctime) is too close to the moment
it was hashed, since a write in the same timestamp tick would leave the key unchanged.  This is git's "racy clean"
rule (https://git-scm.com/docs/racy-git).  ctime cannot be set from user space, so a file rewritten with the same
size and its mtime put back (``touch -r``, ``cp -p``, ``os.utime``) is still re-hashed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

from convert.errors import ConvertError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- digests
# a file changed less than this before it was hashed is hashed again next time (coarse filesystem clocks: ext4
# stamps with the kernel tick, FAT and some network filesystems with 2 s)
RACY_NS = 2_000_000_000
CHUNK = 1 << 22


def _key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes, always read (no memo)."""
    import hashlib  # OpenSSL's library loads in ~10 ms: only where a hash is taken

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def combine(entries) -> str:
    """One digest of a JSON-able value (a dict of digests, options)."""
    import hashlib

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
        write_atomic(self.file, json.dumps(keep, indent=0, sort_keys=True))


PROCESS = Memo()  # process-wide, in memory


def file_digest(path: Path | str) -> str:
    return PROCESS.file_digest(path)


def run_memo(file: Path) -> Memo:
    """A memo kept in ``file`` that shares the process-wide entries."""
    return Memo(file, entries=PROCESS.entries)


# ------------------------------------------------------------------------------------------- atomic writes
# a full filesystem (ENOSPC), a full quota (EDQUOT), a file over the size limit (EFBIG: `ulimit -f`, FAT's 4 GiB)
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def cache_root() -> Path:
    """Where dequantised sources, validation results and logs are kept: $DPROPE_CACHE or ~/.cache/dprope."""
    return Path(os.environ.get("DPROPE_CACHE") or Path.home() / ".cache" / "dprope")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the filesystem that holds ``folder`` (or its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def no_space_error(e: OSError, folder: Path, what: str, need: int | None) -> ConvertError:
    """The one error a full disk (or a file size limit) gives: the folder, what was written, the space needed."""
    folder = Path(folder)
    needs = f"it needs about {human_bytes(need)}" if need else "it needs more space"
    if e.errno == errno.EFBIG:
        return ConvertError(
            f"{what} is larger than the biggest file allowed in {folder} ({os.strerror(e.errno)}: the process file "
            f"size limit `ulimit -f`, or the filesystem's own maximum); {needs}. Raise the limit or choose an output "
            "folder on another filesystem, then run again; nothing was left half-written")
    free = free_bytes(folder)
    has = f"{human_bytes(free)} is free" if free is not None else "the free space is unknown"
    return ConvertError(
        f"no space left in {folder} while writing {what} ({os.strerror(e.errno)}): {needs} and {has}. Free some "
        "space or choose another output folder, then run again; nothing was left half-written")


def is_no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


@contextlib.contextmanager
def _staged(tmp: Path, make, commit, remove, folder: Path, name: str, need_bytes: int | None) -> Iterator[Path]:
    """make() the staging path ``tmp``, yield it, commit() it on success, remove() it always; a full disk anywhere
    in between becomes one ConvertError naming ``folder`` and ``need_bytes``, raised after the partial output is
    gone, so the free space it reports is what the user has."""
    full: OSError | None = None
    try:
        make()
        yield tmp
        commit()
    except OSError as e:
        if not is_no_space(e):
            raise
        full = e
    finally:
        remove()
    if full is not None:
        raise no_space_error(full, folder, name, need_bytes) from None


@contextlib.contextmanager
def atomic_dir(dest: Path, force: bool = False, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest``, on failure it is removed.
    A full disk while the block writes becomes one ConvertError naming the folder and ``need_bytes``."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise ConvertError(f"{dest} already exists; pass --force to replace it or choose another output directory")
    if dest.exists() and not dest.is_dir():
        raise ConvertError(f"{dest} exists and is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def commit():
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)

    with _staged(tmp, tmp.mkdir, commit, lambda: shutil.rmtree(tmp, ignore_errors=True), dest.parent,
                 f"{dest.name}/", need_bytes) as staged:
        yield staged


@contextlib.contextmanager
def atomic_file(path: Path, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.
    A full disk while the block writes becomes one ConvertError naming the folder and ``need_bytes``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with _staged(tmp, lambda: None, lambda: os.replace(tmp, path), lambda: tmp.unlink(missing_ok=True), path.parent,
                 path.name, need_bytes) as staged:
        yield staged


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole small file so that readers see the old content or the new, never a part."""
    with atomic_file(path, need_bytes=len(data)) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
