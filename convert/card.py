"""The model card (README.md) of a baked checkpoint: provenance, factors and how to load it."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch

from dprope import DPRoPEResult

from .report import summary_lines


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("dprope", "torch", "transformers", "safetensors", "gguf", "lm-eval", "llama_cpp_python"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_card(out: Path, src, plan, result: DPRoPEResult, long: torch.Tensor, attn: float,
               has_plot: bool = False) -> Path:
    spec = plan.spec_for(src.spec)
    s = plan.target_length / spec.original_length
    name = Path(src.given).name or src.given
    vers = "\n".join(f"- {k} {v}" for k, v in versions().items())
    from dprope.methods import get_method

    method_text = f"`{plan.method}`: {get_method(plan.method).summary}"
    opts = ", ".join(f"{k}={v}" for k, v in plan.options.items()) or "none"
    if abs(attn - 1.0) > 1e-9:
        temp_text = (f"- Attention temperature: {attn:.6g} on cos/sin (attention logits x {attn * attn:.4g}). Carried as "
                     "`attention_factor` (transformers), `short_mscale`/`long_mscale` (vLLM, SGLang) and "
                     "`rope.scaling.attn_factor` in the GGUF (llama.cpp). MLX-lm and ExLlamaV2 read none of these "
                     "and apply their own default: load the `hf-portable/` copy `dprope export` writes for them. "
                     "Ollama's Go engine and older llama.cpp "
                     "builds read no temperature key: for those, `dprope extend --fold-temperature` writes it into "
                     "the q/k projection weights instead.")
    else:
        temp_text = "- Attention temperature: none (1.0)"
    search = result.params.get("search")
    if search:
        temp_text += (f"\n- Search: `{search.get('fitness_spec')}` fitness, {search.get('evals')} evaluations "
                      f"(stopped: {search.get('stopped')}), best fitness {search.get('fitness'):.6g}; trace of the "
                      "best and median fitness per iteration: `search_trace.json`, `search_trace.png`")
    lines = [
        "---",
        f"base_model: {src.given}",
        "tags: [dprope, long-context, rope-scaling]",
        "---",
        f"# {name}, extended to {plan.target_length} tokens",
        "",
        f"- Base model: `{src.given}` ({spec.arch.hf_class}, source {src.kind})",
        f"- Method: {method_text}",
        f"- Method options: {opts}",
        temp_text,
        f"- Window: {spec.original_length} -> {plan.target_length} tokens (scale {s:.4g})",
        f"- RoPE: theta {spec.rope_theta:g}, head_dim {spec.head_dim}, base rope type `{spec.rope_type}`, "
        f"attention factor {attn:g}",
        f"- Short factor: `{plan.short_factor}` ({'the long factors at every length' if plan.short_factor == 'same' else 'the base RoPE inside the original window'})",
        "- Weights: unchanged from the base (byte-identical files); only the RoPE frequencies differ.",
        "",
        "## Factors",
        "",
        "```",
        *summary_lines(result),
        f"long_factor: {', '.join(f'{x:.4g}' for x in long.tolist())}",
        "```",
        "",
        "Per-pair disturbances: `dprope_factors.json`; the factor tensors: `rope_factors.safetensors`."
        + (" Plot: `dprope_factors.png`." if has_plot else ""),
        "",
        "## Load it",
        "",
        "transformers (4.57 or 5.x, no custom code; `config.json` carries `rope_scaling` of type `longrope`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('PATH_TO_THIS_DIR')",
        "tok = AutoTokenizer.from_pretrained('PATH_TO_THIS_DIR')",
        "```",
        "",
        "llama.cpp / llama-cpp-python / ollama: export a GGUF that carries the factors (llama.cpp's own converter",
        "drops them for Llama models), then run it with the full context:",
        "",
        "```sh",
        "dprope export-gguf PATH_TO_THIS_DIR model.gguf --outtype q8_0",
        f"llama-cli -m model.gguf -c {plan.target_length}",
        f"printf 'FROM ./model.gguf\\nPARAMETER num_ctx {plan.target_length}\\n' > Modelfile && "
        "ollama create this-model -f Modelfile",
        "```",
        "",
        "Check what a checkpoint carries: `dprope inspect PATH_TO_THIS_DIR`; check every output in its runtime: "
        "`dprope verify PATH`.",
        "",
        "## Versions",
        "",
        vers,
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def validation_section(sections: list[tuple[str, str]]) -> str:
    """The card's validation text from (title, report markdown) per validated output: one report as it is, several
    under a heading each (the checkpoint in transformers, each GGUF in llama.cpp)."""
    if len(sections) == 1:
        return sections[0][1]
    return "\n".join(f"### {title}\n\n{md}" for title, md in sections)
