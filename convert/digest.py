"""Content digests: kept in convert/files.py with the other file-system helpers; these names are imported from here
too."""

from .files import CHUNK, PROCESS, RACY_NS, Memo, combine, file_digest, run_memo, sha256_file  # noqa: F401
