"""The portable copy of an extended checkpoint, for runtimes that apply their own longrope temperature.

MLX-lm (mlx_lm/models/rope_utils.py) and ExLlamaV2 (exllamav2/rope.py) read no temperature key, and vLLM and SGLang
read only short_mscale / long_mscale (which transformers 5.x warns about, so no output carries them): for a longrope
config they all scale q and k by Phi-3's default d = sqrt(1 + ln s / ln L).  The HF directory carries the method's
own temperature t as attention_factor, which only transformers reads; for the default method t = d, for others (YaRN's
0.1 ln s + 1, PI's 1) those runtimes would run it with d instead.

The copy keeps every file of the HF directory but states d in config.json (attention_factor) and multiplies every
q_proj / k_proj weight and bias by t / d.  RoPE is linear in q and k, so each runtime computes d x (t / d) = t:
transformers from the key, the others from their default, llama.cpp from a GGUF exported from it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from convert.errors import ConvertError
from convert.arch import read_config
from convert.arch import config_temperature, longrope_default_scale, qk_fold
from convert.names import PORTABLE_DIR  # noqa: F401

log = logging.getLogger(__name__)

_SKIP = {"README.md", "verify.json"}


def portable_split(cfg: dict) -> dict | None:
    """{"temperature": t, "config_temperature": d, "qk_scale": t/d (on top of what q/k already carry)} for a
    longrope config whose temperature is not the default the runtimes compute; None when it already is."""
    rs = cfg.get("rope_scaling") or {}
    if (rs.get("type") or rs.get("rope_type")) != "longrope":
        return None
    orig = rs.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    if not orig or not cfg.get("max_position_embeddings"):
        raise ConvertError("the longrope config lacks original_max_position_embeddings or max_position_embeddings: "
                           "re-bake it with `dprope extend`")
    d = longrope_default_scale(int(cfg["max_position_embeddings"]), int(orig))
    c = config_temperature(cfg)
    if math.isclose(c, d, rel_tol=1e-7, abs_tol=1e-9):
        return None
    return {"temperature": c * qk_fold(cfg), "config_temperature": d, "qk_scale": c / d}


def write_portable(ckpt: Path, out: Path, force: bool = True) -> dict | None:
    """Write the portable copy of ``ckpt`` into ``out``; returns the split it applied, or None (and writes
    nothing) when ``ckpt`` already carries the default temperature."""
    from convert.formats.hf import fold_into_qk
    from convert.names import FACTORS_FILE
    from convert.io.files import atomic_dir

    ckpt, out = Path(ckpt), Path(out)
    cfg = read_config(ckpt)
    split = portable_split(cfg)
    if split is None:
        log.info("%s already carries the runtimes' default temperature: no portable copy needed", ckpt)
        if out.exists() and force:
            shutil.rmtree(out)
        return None
    if not any(ckpt.glob("*.safetensors")) or not [p for p in ckpt.glob("*.safetensors") if p.name != FACTORS_FILE]:
        raise ConvertError(f"{ckpt} has no safetensors weights to fold the temperature into; bake it with "
                           "`dprope extend` (it writes safetensors)")
    need = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    with atomic_dir(out, force=force, need_bytes=need) as tmp:
        for f in sorted(ckpt.iterdir()):
            if f.is_file() and f.name not in _SKIP and not f.name.startswith("."):
                shutil.copyfile(f, tmp / f.name)  # a copy, never a link: the weights are patched in place
        changed = fold_into_qk(tmp, split["qk_scale"])
        d = split["config_temperature"]
        new = dict(cfg)
        rs = dict(new["rope_scaling"])
        rs.update(attention_factor=d)
        new["rope_scaling"] = rs
        own = dict(new.get("dprope") or {})
        own.update(temperature=d, temperature_folded=qk_fold(cfg) * split["qk_scale"],
                   portable={**split, "from": ckpt.name, "qk_tensors": len(changed)})
        new["dprope"] = own
        (tmp / "config.json").write_text(json.dumps(new, indent=2) + "\n")
        (tmp / "README.md").write_text(
            f"# Portable copy of `{ckpt.name}`\n\n"
            f"The same model for runtimes that apply their own longrope temperature (MLX-lm, ExLlamaV2, vLLM, "
            f"SGLang): config.json states their default {d:.6g} (attention_factor) and the "
            f"q_proj / k_proj weights are multiplied by {split['qk_scale']:.6g}, so every runtime computes the "
            f"method's temperature {split['temperature']:.6g}. Everything else is `{ckpt.name}` unchanged.\n")
    log.info("portable copy %s: config temperature %.6g, q/k x %.6g (%d tensors)", out, d, split["qk_scale"],
             len(changed))
    return split
