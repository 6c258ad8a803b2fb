"""manifest.json: the sha256 and size of every file of an export folder and of the checkpoint it was exported from.

Whatever rewrites one of those files afterwards refreshes its entry (`dprope verify` for README.md and verify.json,
when the manifest still matched before it wrote them; the run's verify stage rewrites the whole manifest once its
checks pass), and `dprope verify` fails its `manifest` check on any listed file that is missing or differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convert.io.files import file_digest as sha256
from convert.io.files import sha256_file, write_atomic
from convert.names import MANIFEST  # noqa: F401


def _entry(f: Path) -> dict:
    return {"sha256": sha256(f), "bytes": f.stat().st_size}


def _files(d: Path) -> dict:
    return {f.name: _entry(f) for f in sorted(d.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name != MANIFEST}


def write_manifest(out_dir: Path, ckpt: Path | None, ggufs: list[dict], portable: dict | None = None) -> dict:
    """(Re)write ``out_dir/manifest.json`` from the files as they are now: the checkpoint's files, the export
    folder's files, the GGUF list (``ggufs``: file, type, ... ; sha256 and bytes are filled in) and the portable
    copy's files (``portable``: its path and split, files filled in)."""
    out_dir = Path(out_dir)
    manifest = {
        # None: no checkpoint (a GGUF extended in place has only its source file)
        "checkpoint": None if ckpt is None else {"path": os.path.relpath(ckpt, out_dir), "files": _files(Path(ckpt))},
        "files": _files(out_dir),
        "gguf": [{**g, **_entry(out_dir / g["file"])} for g in ggufs],
        "portable": None if portable is None else {
            **{k: v for k, v in portable.items() if k != "files"},
            "files": _files(out_dir / portable["path"])},
    }
    _save(out_dir / MANIFEST, manifest)
    return manifest


def _save(path: Path, manifest: dict) -> None:
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")


def refresh_manifest(manifest_path: Path) -> dict:
    """Rewrite a manifest for the files as they are now (same checkpoint, same GGUF list)."""
    manifest_path = Path(manifest_path)
    m = json.loads(manifest_path.read_text())
    out_dir = manifest_path.parent
    ggufs = [{k: v for k, v in g.items() if k not in ("sha256", "bytes")} for g in m["gguf"]]
    return write_manifest(out_dir, out_dir / m["checkpoint"]["path"], ggufs, m.get("portable"))


def manifest_checkpoint(manifest_path: Path) -> Path:
    """The checkpoint directory a manifest describes."""
    manifest_path = Path(manifest_path)
    return (manifest_path.parent / json.loads(manifest_path.read_text())["checkpoint"]["path"]).resolve()


def manifest_entries(manifest_path: Path) -> dict[Path, dict]:
    """{file path: {"sha256", "bytes"}} for every file a manifest lists (checkpoint files, export files, GGUFs)."""
    manifest_path = Path(manifest_path)
    m = json.loads(manifest_path.read_text())
    out_dir = manifest_path.parent
    ck = out_dir / m["checkpoint"]["path"]
    entries = {}
    for name, e in m["checkpoint"].get("files", {}).items():
        entries[ck / name] = e
    for name, e in m.get("files", {}).items():
        entries[out_dir / name] = e
    for g in m.get("gguf", []):
        entries[out_dir / g["file"]] = {"sha256": g["sha256"], "bytes": g.get("bytes")}
    port = m.get("portable") or {}
    for name, e in port.get("files", {}).items():
        entries[out_dir / port["path"] / name] = e
    return entries


def manifest_problems(manifest_path: Path, only: set[Path] | None = None) -> list[str]:
    """Files the manifest lists that are missing or whose content differs, each named; the files are read in full
    (no memo), since this is the check.  ``only``: check just these paths."""
    problems = []
    base = Path(manifest_path).parent
    for path, e in manifest_entries(manifest_path).items():
        if only is not None and path.resolve() not in {p.resolve() for p in only}:
            continue
        name = os.path.relpath(path, base)
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != e["sha256"]:
            problems.append(f"{name} differs from the manifest (sha256 {e['sha256'][:12]}...)")
    return problems


def update_manifest_entries(manifest_path: Path, paths: list[Path]) -> None:
    """Set the manifest's entries of ``paths`` (checkpoint or export files this tool just rewrote) to their
    current digests; a checkpoint file the manifest does not list yet is added."""
    manifest_path = Path(manifest_path)
    m = json.loads(manifest_path.read_text())
    out_dir = manifest_path.parent
    ck = (out_dir / m["checkpoint"]["path"]).resolve()
    for p in map(Path, paths):
        if not p.is_file():
            continue
        rp = p.resolve()
        if rp.parent == ck:
            m["checkpoint"].setdefault("files", {})[p.name] = _entry(p)
        if rp.parent == out_dir.resolve() and p.name != MANIFEST:
            m.setdefault("files", {})[p.name] = _entry(p)
            for g in m.get("gguf", []):
                if g["file"] == p.name:
                    g.update(_entry(p))
    _save(manifest_path, m)
