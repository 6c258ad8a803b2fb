"""The model card (README.md) of a baked checkpoint: provenance, factors and how to load it, and every section a
later stage writes into it (continued training, validation, verification).  This module is the only writer of a
card: a stage hands it the facts and the card decides the text and where it goes."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from dprope import DPRoPEResult

from convert.evaluate.report import summary_lines
from convert.names import CARD_FILE


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("dprope", "torch", "transformers", "safetensors", "gguf", "lm-eval", "llama_cpp_python"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _form_text(config: dict | None) -> str:
    """Which form the RoPE extension takes in config.json, and what a GGUF of this arch carries."""
    own = (config or {}).get("dprope") or {}
    form = own.get("rope_form", "longrope")
    if form == "yarn-fit":
        f = own["yarn_fit"]
        return (f"- RoPE form: YaRN (factor {f['factor']:.4g}, original_max_position_embeddings {f['original_length']}), "
                f"the YaRN closest to the method's per-pair factors (rms log error {f['rms_log_error']:.3g}; "
                f"disturbance {f['fit_disturbance']:.4g} nats vs the exact method's {f['exact_disturbance']:.4g}), "
                "because llama.cpp's graph for this architecture reads no factor tensor: this checkpoint and its "
                "GGUF run the same model. Its temperature is YaRN's own (1 + 0.1 ln factor); the method's was "
                f"{f['method_temperature']:.6g}. `--hf-form exact` keeps the per-pair factors here instead.")
    text = "- RoPE form: per-pair factors (`longrope`), exactly the method's"
    if own.get("gguf_form"):
        g = own["gguf_form"]
        text += (f"; a GGUF of this architecture cannot carry them (llama.cpp's graph reads no factor tensor) and "
                 f"carries the closest YaRN instead (factor {g['factor']:.4g}, original {g['original_length']}, "
                 f"disturbance {g['fit_disturbance']:.4g} nats vs {g['exact_disturbance']:.4g}): it runs a "
                 "different model from this checkpoint")
    return text


def write_card(out: Path, src, plan, result: DPRoPEResult, long: np.ndarray, attn: float,
               has_plot: bool = False, config: dict | None = None) -> Path:
    spec = plan.spec_for(src.spec)
    s = plan.target_length / spec.original_length
    name = Path(src.given).name or src.given
    vers = "\n".join(f"- {k} {v}" for k, v in versions().items())
    from dprope.methods import get_method

    method_text = f"`{plan.method}`: {get_method(plan.method).summary}"
    opts = ", ".join(f"{k}={v}" for k, v in plan.options.items()) or "none"
    if abs(attn - 1.0) > 1e-9:
        temp_text = (f"- Attention temperature: {attn:.6g} on cos/sin (attention logits x {attn * attn:.4g}). Carried as "
                     "`attention_factor` (transformers) and `rope.scaling.attn_factor` in the GGUF (llama.cpp). "
                     "MLX-lm, ExLlamaV2, vLLM and SGLang read neither and apply Phi-3's default "
                     "sqrt(1 + ln s / ln L): where the temperature differs from it, load the `hf-portable/` copy "
                     "`dprope export` writes for them. "
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
        *([f"- Factors from: {result.params['provenance']}"] if result.params.get("provenance") else []),
        temp_text,
        f"- Window: {spec.original_length} -> {plan.target_length} tokens (scale {s:.4g})",
        f"- RoPE: theta {spec.rope_theta:g}, head_dim {spec.head_dim}, base rope type `{spec.rope_type}`, "
        f"attention factor {attn:g}",
        _form_text(config),
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
    path = out / CARD_FILE
    path.write_text("\n".join(lines))
    return path


def validation_section(sections: list[tuple[str, str]]) -> str:
    """The card's validation text from (title, report markdown) per validated output: one report as it is, several
    under a heading each (the checkpoint in transformers, each GGUF in llama.cpp)."""
    if len(sections) == 1:
        return sections[0][1]
    return "\n".join(f"### {title}\n\n{md}" for title, md in sections)


def set_section(directory: Path, title: str, body: str, drop: tuple[str, ...] = ()) -> bool:
    """Write section ``## {title}`` of the card in ``directory`` with ``body``: in place of the section of that
    title when there is one (later sections kept), else at the end; sections titled in ``drop`` are removed.
    Returns False (and writes nothing) when the directory has no card."""
    card = Path(directory) / CARD_FILE
    if not card.exists():
        return False
    head, *chunks = card.read_text().split("\n## ")
    sections = [(c.split("\n", 1)[0].strip(), "## " + c) for c in chunks]
    new = f"## {title}\n\n{body.rstrip()}\n"
    out, placed = [], False
    for name, text in sections:
        if name == title:
            out.append(new)
            placed = True
        elif name not in drop:
            out.append(text)
    if not placed:
        out.append(new)
    card.write_text(head.rstrip() + "\n" + "".join("\n" + t.rstrip("\n") + "\n" for t in out))
    return True


def link_validation(directory: Path, md: str) -> bool:
    """The validation report (``validation.md``'s text) as the card's Validation section: every cell with its 95%
    interval and sample count n, and the paired comparison with the base (``convert.evaluate.stats``)."""
    return set_section(directory, "Validation", "lm-eval and dprope tasks, base vs extended on the same samples; each "
                       "cell is value [95% interval] (n), the last column the paired difference (accuracy) or ratio "
                       "(perplexity) with its interval (`validation.json` has every interval and its method, "
                       "`validation.png` the error bars):\n\n" + md)


def training_section(directory: Path, s: dict) -> bool:
    """The continued-training summary; the baked model's validation and verification sections describe that model,
    not the trained one, so they go."""
    body = (f"{s['steps']} steps at {s['seq_len']} tokens, global batch {s['global_batch']}, lr {s['lr']:g}, data "
            f"`{s['data']}`, {s['world_size']} process(es) on {s['device']}{' (bf16)' if s['bf16'] else ''}. "
            f"Held-out loss {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}. The RoPE factors are the baked "
            "ones (config.json unchanged).")
    return set_section(directory, "Continued training", body, drop=("Validation", "Verification"))


def verification_section(directory: Path, ok: bool, table: str, control: str) -> bool:
    """`dprope verify`'s checks and its negative control."""
    body = (f"`dprope verify` ({'all checks pass' if ok else 'FAILED'}):\n\n{table}\n\n"
            f"Negative control, the model without its factors against the extended one: {control}.")
    return set_section(directory, "Verification", body)
