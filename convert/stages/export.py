"""Export stage of the pipeline: GGUF files beside the baked HF directory, an ollama Modelfile for each, the
portable HF copy for runtimes that apply their own temperature (`convert.formats.portable`; only when the temperature
differs from their default), and a manifest with sha256 sums of every output file.

manifest.json lists every file of the export folder and of the checkpoint it was exported from (the model card
README.md and verify.json included) with its sha256 and size.  Whatever rewrites one of those files afterwards
refreshes its entry (`dprope verify` for README.md and verify.json, when the manifest still matched before it
wrote them; the run's verify stage rewrites the whole manifest once its checks pass), and `dprope verify` fails
its `manifest` check on any listed file that is missing or differs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from convert.errors import ConvertError
from convert.formats.gguf_export import OUTTYPES, export_gguf, reemit_gguf
from convert.arch import read_config
from convert.io.files import write_atomic
from convert.io.manifest import (  # noqa: F401  (the manifest is part of the export's API)
    manifest_checkpoint, manifest_entries, manifest_problems, refresh_manifest, update_manifest_entries,
    write_manifest)
from convert.names import MANIFEST, gguf_file_name  # noqa: F401

log = logging.getLogger(__name__)



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
        from convert.formats.portable import PORTABLE_DIR, write_portable

        split = write_portable(ckpt, out_dir / PORTABLE_DIR, force=force)
    manifest = write_manifest(out_dir, ckpt, [
        {"file": p.name, "type": t, "rope_layout": rope_layout, "context_length": target,
         "modelfile": f"{p.stem}.Modelfile"} for p, t in ggufs],
        portable=None if split is None else {"path": PORTABLE_DIR, **split})
    log.info("export: %s", ", ".join([p.name for p, _ in ggufs] + ([PORTABLE_DIR] if split else [])))
    return manifest


def export_in_place(src_gguf: Path, out_dir: Path, plan: Any, result, name: str, progress: bool = True) -> dict:
    """The export of a GGUF extended in place: ``out_dir/<name>-in-place.gguf`` (the source's tensors as they are),
    its ollama Modelfile and manifest.json; returns the manifest."""
    from convert.arch import rope_spec_from_gguf
    from convert.formats.gguf_extend import extend_gguf_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = plan.spec_for(rope_spec_from_gguf(src_gguf))
    p = out_dir / gguf_file_name(name, "in-place")
    s = extend_gguf_file(Path(src_gguf), p, spec, plan, result, force=True, progress=progress)
    mf = out_dir / f"{p.stem}.Modelfile"
    write_atomic(mf, modelfile_text(p.name, plan.target_length))
    entry = {"file": p.name, "type": "in-place", "rope_form": s["form"], "source": str(src_gguf),
             "modelfile": mf.name}
    return write_manifest(out_dir, None, [entry])
