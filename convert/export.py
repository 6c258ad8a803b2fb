"""Export stage of the pipeline: GGUF files beside the baked HF directory, an ollama Modelfile for each, the
portable HF copy for runtimes that apply their own temperature (`convert.portable`; only when the temperature
differs from their default), and a manifest with sha256 sums of every output file.

manifest.json lists every file of the export folder and of the checkpoint it was exported from (the model card
README.md and verify.json included) with its sha256 and size.  Whatever rewrites one of those files afterwards
refreshes its entry (`dprope verify` for README.md and verify.json, when the manifest still matched before it
wrote them; the run's verify stage rewrites the whole manifest once its checks pass), and `dprope verify` fails
its `manifest` check on any listed file that is missing or differs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from .errors import ConvertError
from .gguf_export import OUTTYPES, export_gguf, reemit_gguf
from .modelinfo import read_config
from .files import file_digest as sha256
from .files import sha256_file, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def modelfile_text(gguf_name: str, n_ctx: int) -> str:
    """ollama truncates prompts to its default context unless the Modelfile raises num_ctx."""
    return f"FROM ./{gguf_name}\nPARAMETER num_ctx {n_ctx}\n"


def gguf_file_name(name: str, kind: str) -> str:
    """The file ``export_outputs`` writes for a GGUF type, or for ``base-quant``."""
    return f"{name}-{kind}.gguf"


def export_outputs(ckpt: Path, out_dir: Path, outtypes: Sequence[str] = ("f16", "q8_0"), rope_layout: str = "freqs",
                   base_gguf: Path | None = None, name: str | None = None, force: bool = True,
                   progress: bool = True, portable: bool = True) -> dict:
    """Write ``out_dir/<name>-<type>.gguf`` for each outtype (and ``<name>-base-quant.gguf`` re-emitted from
    ``base_gguf`` when given), a Modelfile per GGUF, ``out_dir/hf-portable/`` when MLX-lm and ExLlamaV2 would
    misread the temperature (``portable``), and ``out_dir/manifest.json``; returns the manifest."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    bad = [t for t in outtypes if t not in OUTTYPES]
    if bad:
        raise ConvertError(f"unknown GGUF type(s) {', '.join(bad)}; choose from {', '.join(OUTTYPES)}")
    cfg = read_config(ckpt)
    target = int(cfg["max_position_embeddings"])
    name = name or ckpt.name
    out_dir.mkdir(parents=True, exist_ok=True)
    ggufs = []
    for t in outtypes:
        p = out_dir / gguf_file_name(name, t)
        export_gguf(ckpt, p, t, rope_layout, force=force, progress=progress, name=name)
        ggufs.append((p, t))
    if base_gguf is not None:
        p = out_dir / gguf_file_name(name, "base-quant")
        if p.exists() and force:
            p.unlink()
        reemit_gguf(Path(base_gguf), ckpt, p, rope_layout)
        ggufs.append((p, "base-quant"))
    for p, _ in ggufs:
        write_atomic(out_dir / f"{p.stem}.Modelfile", modelfile_text(p.name, target))
    split = None
    if portable:
        from .portable import PORTABLE_DIR, write_portable

        split = write_portable(ckpt, out_dir / PORTABLE_DIR, force=force)
    manifest = write_manifest(out_dir, ckpt, [
        {"file": p.name, "type": t, "rope_layout": rope_layout, "context_length": target,
         "modelfile": f"{p.stem}.Modelfile"} for p, t in ggufs],
        portable=None if split is None else {"path": PORTABLE_DIR, **split})
    log.info("export: %s", ", ".join([p.name for p, _ in ggufs] + ([PORTABLE_DIR] if split else [])))
    return manifest


def _entry(f: Path) -> dict:
    return {"sha256": sha256(f), "bytes": f.stat().st_size}


def _files(d: Path) -> dict:
    return {f.name: _entry(f) for f in sorted(d.iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name != MANIFEST}


def write_manifest(out_dir: Path, ckpt: Path, ggufs: list[dict], portable: dict | None = None) -> dict:
    """(Re)write ``out_dir/manifest.json`` from the files as they are now: the checkpoint's files, the export
    folder's files, the GGUF list (``ggufs``: file, type, ... ; sha256 and bytes are filled in) and the portable
    copy's files (``portable``: its path and split, files filled in)."""
    out_dir, ckpt = Path(out_dir), Path(ckpt)
    manifest = {
        "checkpoint": {"path": os.path.relpath(ckpt, out_dir), "files": _files(ckpt)},
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
