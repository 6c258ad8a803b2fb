"""`dprope inspect`: what a checkpoint carries, read from its files only (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convert.errors import ConvertError
from convert.arch import gguf_fields, read_config, rope_spec


def _factor_text(name: str, values) -> str:
    t = np.asarray(values, dtype=np.float32).ravel()
    uniq = sorted({round(float(x), 6) for x in t.tolist()})
    if len(uniq) <= 4:
        groups = ", ".join(f"{u:g} x{int((np.abs(t - u) < 1e-6).sum())}" for u in uniq)
    else:
        groups = f"min {float(t.min()):.4g}, max {float(t.max()):.4g}, mean {float(t.mean()):.4g}"
    return f"  {name}: {t.size} values ({groups})"


def describe(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    info = None
    if path.is_file() and path.suffix == ".gguf":
        from convert.io.gguf_meta import read_gguf

        info = read_gguf(path)  # the header once, for the spec and the listing
    spec = rope_spec(path, info)
    lines = [f"{path}"]
    if path.suffix == ".gguf":
        meta, reader = gguf_fields(path, info)
        arch = meta.get("general.architecture")
        lines.append(f"  format: GGUF v{meta.get('GGUF.version')}, architecture {arch}, name {meta.get('general.name')}")
        for key in ("context_length", "rope.freq_base", "rope.dimension_count", "rope.scaling.type",
                    "rope.scaling.original_context_length", "rope.scaling.attn_factor", "rope.scaling.factor"):
            if f"{arch}.{key}" in meta:
                lines.append(f"  {key}: {meta[f'{arch}.{key}']}")
        for t in reader.tensors:
            if t.name.startswith("rope_"):
                lines.append(f"  tensor {t.name} {t.type_name} shape {[int(x) for x in t.shape]}")
                lines.append(_factor_text(t.name, t.data))
        for key in ("general.base_model.0.name", "dprope.method", "dprope.target_length", "dprope.rope_form"):
            if key in meta:
                lines.append(f"  {key}: {meta[key]}")
    else:
        cfg = read_config(path)
        sc = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        lines.append(f"  format: Hugging Face, {spec.arch.hf_class} (model_type {spec.arch.model_type})")
        lines.append(f"  max_position_embeddings: {cfg.get('max_position_embeddings')}")
        orig = cfg.get("original_max_position_embeddings") or sc.get("original_max_position_embeddings")
        lines.append(f"  original_max_position_embeddings: {orig if orig else 'not set (not extended)'}")
        lines.append(f"  rope_theta: {spec.rope_theta:g}, head_dim: {spec.head_dim}, rope type: {spec.rope_type}")
        for k in ("factor", "attention_factor"):
            if k in sc:
                lines.append(f"  {k}: {sc[k]}")
        for k in ("long_factor", "short_factor"):
            if k in sc:
                lines.append(_factor_text(k, sc[k]))
        own = cfg.get("dprope") or {}
        if own.get("rope_form"):
            fit = own.get("yarn_fit") or {}
            lines.append(f"  rope form: {own['rope_form']}" + (
                f" (YaRN closest to {own['method']}: rms log error {fit['rms_log_error']:.3g}, disturbance "
                f"{fit['fit_disturbance']:.4g} vs the exact method's {fit['exact_disturbance']:.4g})" if fit else ""))
        if own.get("gguf_form"):
            g = own["gguf_form"]
            lines.append(f"  a GGUF of this arch carries the YaRN fit instead: factor {g['factor']:.4g}, original "
                         f"{g['original_length']}, disturbance {g['fit_disturbance']:.4g} vs {g['exact_disturbance']:.4g}")
        if own:
            lines.append(f"  dprope: {own}")
        if (path / "rope_factors.safetensors").exists():
            lines.append("  rope_factors.safetensors: present")
    return "\n".join(lines)
