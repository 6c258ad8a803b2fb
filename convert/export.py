"""Export stage of the pipeline: GGUF files beside the baked HF directory, an ollama Modelfile for each, the portable
HF copy for runtimes that apply their own temperature (`convert.portable`; only when the temperature differs from
their default), and a manifest with sha256 sums of every output file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from .errors import ConvertError
from .gguf_export import OUTTYPES, export_gguf, reemit_gguf
from .modelinfo import read_config
from .source import file_digest as sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def modelfile_text(gguf_name: str, n_ctx: int) -> str:
    """ollama truncates prompts to its default context unless the Modelfile raises num_ctx."""
    return f"FROM ./{gguf_name}\nPARAMETER num_ctx {n_ctx}\n"


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
        p = out_dir / f"{name}-{t}.gguf"
        export_gguf(ckpt, p, t, rope_layout, force=force, progress=progress, name=name)
        ggufs.append((p, t))
    if base_gguf is not None:
        p = out_dir / f"{name}-base-quant.gguf"
        if p.exists() and force:
            p.unlink()
        reemit_gguf(Path(base_gguf), ckpt, p, rope_layout)
        ggufs.append((p, "base-quant"))
    for p, _ in ggufs:
        (out_dir / f"{p.stem}.Modelfile").write_text(modelfile_text(p.name, target))
    split = None
    if portable:
        from .portable import PORTABLE_DIR, write_portable

        split = write_portable(ckpt, out_dir / PORTABLE_DIR, force=force)
    manifest = {
        "checkpoint": {"path": os.path.relpath(ckpt, out_dir),
                       "files": {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}
                                 for f in sorted(ckpt.iterdir()) if f.is_file()}},
        "gguf": [{"file": p.name, "type": t, "rope_layout": rope_layout, "context_length": target,
                  "sha256": sha256(p), "bytes": p.stat().st_size, "modelfile": f"{p.stem}.Modelfile"}
                 for p, t in ggufs],
        "portable": None if split is None else {
            "path": PORTABLE_DIR, **split,
            "files": {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}
                      for f in sorted((out_dir / PORTABLE_DIR).iterdir()) if f.is_file()}},
    }
    tmp = out_dir / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    log.info("export: %s", ", ".join([p.name for p, _ in ggufs] + ([PORTABLE_DIR] if split else [])))
    return manifest
