"""The `dprope` command line: thin Click commands over library calls."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import click

import dprope
from dprope.errors import DPRoPEError

from convert.errors import ConvertError
from convert.names import OUTTYPES, ROPE_LAYOUTS, STAGES

log = logging.getLogger("convert")


def _factor_options(fn):
    """Options shared by every command that computes factors (one definition, many commands)."""
    from dprope.methods import DEFAULT_METHOD, available_methods

    opts = [
        click.option("--method", default=DEFAULT_METHOD, show_default=True,
                     type=click.Choice(available_methods(), case_sensitive=False),
                     help="Extension method (`dprope methods` lists them with their options)."),
        click.option("--opt", "method_opts", multiple=True, metavar="KEY=VALUE",
                     help="A method option, e.g. --opt temperature=yarn --opt guard=32; repeatable."),
        click.option("--bins", type=int, help="Angle histogram bins (the method option 'bins'; default 360)."),
        click.option("--candidates",
                     help=f"Comma-separated candidates in tie-break order (DPRoPE methods); built in: "
                          f"{', '.join(dprope.BUILTIN_CANDIDATES)} (or any registered with dprope.register_candidate)."),
        click.option("--select", "selection",
                     help="argmin | threshold:T | top-n:N (the paper's n-hat interpolated pairs) | tolerance:T "
                          "(DPRoPE methods)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _search_options(fn):
    """Options of search methods (longrope-search, dprope-fit): the budget, the fitness and the seed."""
    opts = [
        click.option("--budget", type=click.IntRange(min=1), help="Search methods: stop after N fitness evaluations "
                     "(LongRoPE's full search is about 1,300), or N steps of dprope-fit. A search needs --budget "
                     "and/or --time-budget."),
        click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                     help="Search methods: stop after this many seconds of searching (summed over resumed runs)."),
        click.option("--fitness", metavar="KIND[:KEY=VALUE...]",
                     help="Search methods: what scores a factor set: ppl (default; perplexity at the target length, a "
                          "GPU's work) or proxy (sparse positions, ~4x cheaper; ranks sets only partly like ppl: "
                          "Spearman 0.60), e.g. proxy:samples=8."),
        click.option("--seed", type=int, help="Search methods: random seed (the same seed gives the same result)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _method_options(pairs) -> dict:
    """KEY=VALUE strings -> options; values are read as YAML scalars or lists (numbers, none, [a, b])."""
    from convert.options import parse_key_values

    return parse_key_values(pairs, "--opt", "--opt temperature=yarn", none_words=True)


def _candidates(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


class _Group(click.Group):
    """Turns the project's own errors into one clear line and exit status 2, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConvertError, DPRoPEError) as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(dprope.__version__, prog_name="dprope")
def main(verbose: int) -> None:
    """Extend the context window of RoPE models with DPRoPE and emit checkpoints that run anywhere."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="Read rope_theta, head_dim and the original length from a config.json, checkpoint dir or GGUF.")
@click.option("--rope-theta", type=float, help="RoPE base b (without --model).")
@click.option("--head-dim", type=int, help="Attention head dimension (without --model).")
@click.option("--original-length", type=int, help="Pre-training window L (default: the model's).")
@click.option("--target-length", type=int, required=True, help="Target window L'.")
@_factor_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), help="Write a PNG: per-pair disturbance and two pairs' "
              "angle histograms.")
def factors(model_path, rope_theta, head_dim, original_length, target_length, method, method_opts, bins, candidates,
            selection, as_json, plot):
    """Compute a method's per-pair factors and temperature, and show why each pair got its choice."""
    inv_freq = None
    if model_path is not None:
        if rope_theta is not None or head_dim is not None:
            raise ConvertError("give --model or --rope-theta/--head-dim, not both")
        from convert.arch import rope_spec

        spec = rope_spec(model_path)
        inv_freq, rope_theta, head_dim = spec.inv_freq, spec.rope_theta, spec.head_dim
        original_length = original_length or spec.original_length
    elif rope_theta is None or head_dim is None:
        raise ConvertError("give --rope-theta and --head-dim, or --model PATH to read them from a checkpoint")
    if original_length is None:
        raise ConvertError("give --original-length (the model's pre-training window)")
    from dprope.freqs import RopeContext, check_inv_freq, check_target_length
    from dprope.methods import run_method

    from convert.stages.bake import make_plan

    from convert.stages.search import is_search

    if is_search(method):
        raise ConvertError(f"{method} measures the model, which `dprope factors` does not load: run `dprope extend "
                           f"MODEL OUT --target-length {target_length} --method {method} --budget N`")
    plan = make_plan(method, target_length, _candidates(candidates) if candidates else None, selection, bins,
                     options=_method_options(method_opts))
    check_target_length(target_length, original_length, ConvertError)
    inv = check_inv_freq(inv_freq) if inv_freq is not None else dprope.base_inv_freq(rope_theta, head_dim)
    r = run_method(plan.method, RopeContext(inv, rope_theta, original_length, target_length), **plan.options)
    if plot:
        from convert.evaluate.report import plot_result

        plot_result(r, plot)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=1))
    else:
        from convert.evaluate.report import render_table

        render_table(r)
        if plot:
            click.echo(f"plot: {plot}")


@main.command()
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--target-length", type=int, required=True, help="Target window in tokens.")
@_factor_options
@click.option("--short-factor", type=click.Choice(["same", "original"]), default="same", show_default=True,
              help="Factors used inside the original window: the long ones, or the base RoPE.")
@click.option("--original-length", type=int, help="The pre-training window, when the config's "
              "max_position_embeddings overstates it (default: read from the checkpoint).")
@click.option("--hf-form", type=click.Choice(["auto", "exact"]), default="auto", show_default=True,
              help="auto: for an arch whose GGUF can carry only YaRN (qwen3, gemma3), write the closest YaRN to the "
              "HF output too, so every runtime runs the same model; exact: the per-pair factors in the HF output.")
@click.option("--plot", is_flag=True, help="Also write dprope_factors.png.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--link", is_flag=True, help="Hard-link weight files instead of copying (same filesystem only; "
              "editing either copy in place then changes both).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle (*.bin) weights, loaded with weights_only=True "
              "and baked as safetensors.")
@click.option("--fold-temperature", is_flag=True, help="Write the method's attention temperature into the q/k "
              "projection weights (for runtimes that read no temperature key, e.g. ollama's Go engine) instead of "
              "the config; the weight files are then rewritten, not copied.")
@_search_options
def extend(source, out, target_length, method, method_opts, bins, candidates, selection, short_factor,
           original_length, hf_form, plot, force, link, allow_pickle, fold_temperature, budget, time_budget, fitness, seed):
    """Extend SOURCE (HF dir, .gguf, pkg://PACKAGE/FILE or cached hub id) to --target-length and write the
    checkpoint to OUT."""
    from convert.stages.bake import bake, make_plan
    from convert.formats.checkpoint import resolve_source
    from convert.stages.search import is_search, run_search, work_dir_for
    from convert.formats.checkpoint import open_source

    options = _method_options(method_opts)
    from convert.stages.search import search_flag_options

    given = search_flag_options(method, budget=budget, time_budget=time_budget, fitness=fitness, seed=seed)
    plan = make_plan(method, target_length, _candidates(candidates) if candidates else None, selection, bins,
                     short_factor, original_length, options={**options, **given}, hf_form=hf_form)
    given_src = resolve_source(source)
    if Path(given_src).suffix == ".gguf" and Path(out).suffix == ".gguf":  # GGUF in, GGUF out: nothing dequantised
        from convert.arch import gguf_fields
        from convert.stages.bake import bake_gguf

        meta, info = gguf_fields(Path(given_src))
        if meta.get("dprope.method"):  # an extended output given back as a source: its factors are the base's
            first = int(meta.get("dprope.original_length") or 0)
            done = int(meta.get("dprope.target_length") or 0)
            click.echo(f"{Path(given_src).name} is already extended ({meta['dprope.method']}, {first or '?'} -> {done} "
                       f"tokens): composing" + (f", {first} -> {target_length} in total "
                                                f"({target_length / first:.3g}x)" if first else ""), err=True)
        s = bake_gguf(Path(given_src), Path(out), plan, force=force, info=info)
        click.echo(f"extended {out} in place ({s['form']}): {s['tensors_kept']} tensors copied as they are, "
                   f"{s['bytes_written'] / 1e6:.1f} MB in {s['seconds']:.2f} s")
        if s.get("yarn_fit"):
            f = s["yarn_fit"]
            click.echo(f"  YaRN fit (llama.cpp's {s['arch']} graph reads no factor tensor): factor {f['factor']:.4g}, "
                       f"original_context_length {f['original_length']}, rms log error {f['rms_log_error']:.3g}")
        from convert.stages.inspect import describe

        click.echo(describe(Path(out)))
        return
    if Path(given_src).suffix == ".gguf":
        from convert.formats.checkpoint import dequantised_bytes

        click.echo(f"{Path(given_src).name} is dequantised to float32 once for a Hugging Face output: about "
                   f"{dequantised_bytes(Path(given_src)) / 1e9:.2f} GB in the cache and as much again in {out}; "
                   "to keep it quantised, extend it in place (an OUT ending in .gguf)", err=True)
    src = open_source(given_src, allow_pickle=allow_pickle)
    own = src.config.get("dprope") or {}
    if own.get("method"):  # an extended checkpoint given back as a source: its factors are the base's
        first = int(own.get("original_length") or 0)
        click.echo(f"{src.path.name} is already extended ({own['method']}, {first or '?'} -> "
                   f"{own.get('target_length')} tokens): composing" + (
                       f", {first} -> {target_length} in total ({target_length / first:.3g}x)" if first else ""),
                   err=True)
    result = None
    if is_search(plan.method):
        if Path(out).exists() and not force:  # before hours of search, not after
            raise ConvertError(f"{out} already exists; pass --force to replace it or choose another output directory")
        work = work_dir_for(out)
        click.echo(f"search state: {work}/ (Ctrl-C stops; the same command resumes)", err=True)
        try:
            result = run_search(src, plan, work, progress=True)
        except KeyboardInterrupt:
            click.secho(f"interrupted: the search state is saved in {work}/; run the same command again to resume",
                        fg="yellow", err=True)
            sys.exit(130)
    bake(src, out, plan, force=force, plot=plot, link=link, fold_temperature=fold_temperature, result=result)
    from convert.stages.inspect import describe

    click.echo(describe(out))
    click.echo(f"extended checkpoint: {out}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print names, families, summaries and option defaults as JSON.")
def methods(as_json):
    """List the extension methods: name, family, what it does, and its options."""
    from dprope.methods import DEFAULT_METHOD, available_methods, get_method

    rows = [get_method(n) for n in available_methods()]
    if as_json:
        click.echo(json.dumps([{"name": m.name, "family": m.family, "summary": m.summary,
                                "options": dict(m.defaults), "default": m.name == DEFAULT_METHOD} for m in rows],
                              indent=1, default=str))
        return
    width = max(len(m.name) for m in rows)
    for m in rows:
        mark = " (default)" if m.name == DEFAULT_METHOD else ""
        click.echo(f"{m.name:<{width}}  {m.family:<7}  {m.summary}{mark}")
        if m.defaults:
            click.echo(f"{'':<{width}}           options: " + ", ".join(f"{k}={v}" for k, v in m.defaults.items()))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
def inspect(path):
    """Show what a checkpoint (HF dir or GGUF) carries: architecture, lengths, rope type and factors."""
    from convert.stages.inspect import describe

    click.echo(describe(path))


@main.command("export-gguf")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="Weight type of 2-D tensors (norms and biases stay F32; q8_0 rows not a multiple of 32 use F16).")
@click.option("--rope-layout", type=click.Choice(ROPE_LAYOUTS), default="freqs", show_default=True,
              help="freqs: factors as rope_freqs.weight, read by every llama.cpp since mid-2024 (default). "
                   "longrope: rope_factors_long/short.weight + rope.scaling.type=longrope + attn_factor; only "
                   "llama.cpp from April 2026 (llama-cpp-python >= 0.3.21) loads it, older runtimes refuse the file.")
@click.option("--base-gguf", type=click.Path(path_type=Path, exists=True),
              help="GGUF in, GGUF out: keep every tensor of this base GGUF byte for byte in its own quantisation and "
                   "add the checkpoint's factors and RoPE metadata (--outtype is then ignored).")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def export_gguf_cmd(checkpoint, out, outtype, rope_layout, base_gguf, force):
    """Write a GGUF of a baked CHECKPOINT that llama.cpp runtimes run with its RoPE factors."""
    from convert.formats.gguf_export import export_gguf, reemit_gguf

    if base_gguf:
        reemit_gguf(base_gguf, checkpoint, out, rope_layout, force=force)
    else:
        export_gguf(checkpoint, out, outtype, rope_layout, force=force)
    from convert.stages.inspect import describe

    click.echo(describe(out))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--gguf", "outtypes", default="f16,q8_0", show_default=True,
              help="Comma-separated GGUF types to write (f32, f16, bf16, q8_0); empty for none.")
@click.option("--rope-layout", type=click.Choice(ROPE_LAYOUTS), default="freqs", show_default=True,
              help="See `dprope export-gguf --help`.")
@click.option("--base-gguf", type=click.Path(path_type=Path, exists=True),
              help="Also re-emit this base GGUF with its own quantisation plus the factors.")
@click.option("--name", help="File name stem (default: the checkpoint directory's name).")
@click.option("--portable/--no-portable", default=True, show_default=True,
              help="Write hf-portable/, the copy MLX-lm and ExLlamaV2 run with the right temperature (only when the "
                   "temperature differs from their default).")
def export(checkpoint, out_dir, outtypes, rope_layout, base_gguf, name, portable):
    """Export stage: GGUF files, ollama Modelfiles, the portable HF copy and a sha256 manifest for a baked
    CHECKPOINT."""
    from convert.stages.export import export_outputs

    m = export_outputs(checkpoint, out_dir, _candidates(outtypes), rope_layout, base_gguf, name, portable=portable)
    for g in m["gguf"]:
        click.echo(f"{out_dir / g['file']}  {g['type']}  sha256 {g['sha256'][:16]}...")
    if m.get("portable"):
        p = m["portable"]
        click.echo(f"{out_dir / p['path']}/  config temperature {p['config_temperature']:.6g}, q/k x "
                   f"{p['qk_scale']:.6g} (for MLX-lm, ExLlamaV2)")
    click.echo(f"manifest: {out_dir / 'manifest.json'}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True),
              help="The baked HF directory a lone .gguf was exported from.")
@click.option("--base", type=click.Path(path_type=Path, exists=True),
              help="The base model, for the negative control (default: the extended model with plain RoPE); for a "
                   "GGUF extended in place, its source GGUF.")
def verify(path, checkpoint, base):
    """Prove that every output runs with the baked factors: HF reload, GGUF metadata and factor tensors,
    llama.cpp vs transformers logits inside and past the original window.  Exits 1 naming failed checks."""
    from convert.stages.verify import control_text
    from convert.stages.verify import verify as run_verify

    if path.suffix == ".gguf" and checkpoint is None and base is not None and base.suffix == ".gguf":
        from convert.stages.verify import verify_gguf  # a GGUF extended in place, against its source GGUF

        report = verify_gguf(path, base)
        click.echo(report.table())
        if not report.ok:
            click.secho(f"error: verify failed: {'; '.join(sorted(c.name for c in report.failed()))}", fg="red",
                        err=True)
            sys.exit(1)
        return
    report = run_verify(path, checkpoint, base=base)
    click.echo(report.table())
    click.echo("negative control (no factors): " + control_text(getattr(report, "control", {})))
    if not report.ok:
        names = sorted({f"{c.name} [{c.target}]" for c in report.failed()})
        click.secho(f"error: verify failed: {'; '.join(names)}", fg="red", err=True)
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.option("--base", type=click.Path(path_type=Path, exists=True), help="The base model, scored on the same samples.")
@click.option("--lengths", default="4096,8192,16384", show_default=True, help="Comma-separated prompt lengths (tokens).")
@click.option("--tasks", default="passkey,ppl", show_default=True,
              help="passkey, ppl, and offline RULER tasks (niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, "
                   "ruler_cwe, ruler_fwe; essay ones with a local haystack: niah_single_2, niah_single_3, "
                   "niah_multikey_1, niah_multivalue, niah_multiquery).")
@click.option("--limit", type=int, default=5, show_default=True, help="Samples per task and length.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Report folder (default: the checkpoint; for "
              "a .gguf, NAME-validation/ beside it).")
@click.option("--corpus", type=click.Path(exists=True), help="Text file for perplexity and the RULER essay haystack "
              "(default: Python's own documentation, pydoc_data).")
@click.option("--gate", "gates", multiple=True, help="Release gate, e.g. 'passkey@16384 >= 0.9' or "
              "'ppl@0-8192 <= 1.05x base'; repeatable.  A failed gate exits 1.")
@click.option("--kv-cache", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="GGUF checkpoints: llama.cpp's KV cache type (f16 is llama-cpp-python's default; f32 is exact).")
@click.option("--backend", type=click.Choice(["hf", "dpe"]), default="hf", show_default=True,
              help="hf: transformers as the checkpoint loads.  dpe: DPE's attention (local window with normal RoPE, "
                   "per-group Self-Extend positions beyond it), evaluation only: no runtime users deploy runs it.  "
                   "Give it the base checkpoint and --dpe-scales.")
@click.option("--dpe-scales", help="DPE's group scales: comma-separated numbers (one per group of pairs, the groups "
              "split evenly), or a directory baked with --method dpe (its detected scales).")
@click.option("--dpe-window", type=int, help="DPE's local window in tokens (default: the detection's, else 1024, at "
              "most an eighth of the original window).")
@click.option("--dpe-groups", type=int, help="With a single --dpe-scales number: the number of groups it applies to.")
@click.option("--split-at", default="", help="Comma-separated positions where the perplexity buckets also split, "
              "e.g. the original window when --base is itself an extended model.")
def validate(checkpoint, base, lengths, tasks, limit, out_dir, corpus, gates, kv_cache, backend, dpe_scales,
             dpe_window, dpe_groups, split_at):
    """lm-eval long-context tasks on CHECKPOINT (and --base), side by side: validation.json/.md/.png.  A .gguf
    CHECKPOINT runs in llama.cpp (llama-cpp-python, in process), and so does a .gguf --base beside it."""
    from convert.runtimes.llamacpp import LlamaCppOptions
    from convert.stages.validate import validate as run_validate

    dpe = None
    if backend == "dpe":
        if not dpe_scales:
            raise ConvertError("--backend dpe needs --dpe-scales: the group scales (e.g. 2,8,2,8) or a directory "
                               "baked with --method dpe")
        from convert.runtimes.dpe import backend_from
        from convert.formats.checkpoint import open_source

        spec = open_source(checkpoint).spec
        dpe = backend_from(dpe_scales, spec.head_dim // 2, spec.original_length, dpe_window, dpe_groups)
    elif dpe_scales or dpe_window or dpe_groups:
        raise ConvertError("--dpe-scales, --dpe-window and --dpe-groups need --backend dpe")
    cmd = "dprope " + shlex.join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("dprope") else ""
    v = run_validate(checkpoint, base, [int(x) for x in lengths.split(",") if x.strip()], _candidates(tasks), limit,
                     out_dir, corpus, gates, command=cmd, gguf_options=LlamaCppOptions(kv_cache=kv_cache),
                     backend=dpe, split_at=[int(x) for x in split_at.split(",") if x.strip()])
    click.echo(v.markdown)
    click.echo(f"reports: {v.out_dir / 'validation.md'}, validation.json, validation.png")
    if v.failed:
        click.secho("error: gate(s) failed: " + "; ".join(f"{g.text} ({why})" for g, why in v.failed), fg="red",
                    err=True)
        sys.exit(1)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--from", "start", type=click.Choice(STAGES), help="First stage to consider.")
@click.option("--to", "stop", type=click.Choice(STAGES), help="Last stage to consider.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Run directory (default: runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Print the plan (which stages run and why, which are done) and stop.")
@click.option("--release", is_flag=True, help="Full validation (the recipe's validate.release) with its gates; "
              "a failed gate exits non-zero.")
@click.option("--force-cpu", is_flag=True, help="Run the train stage on the CPU (smoke runs), whatever train.device "
              "says.")
@click.option("--source", help="Use this checkpoint instead of the recipe's source (a path or cached hub id).")
def run(recipe, start, stop, run_dir, dry_run, release, force_cpu, source):
    """Run a RECIPE end to end: source, factors, bake, [train], validate, export, verify; a finished stage is
    skipped while the files it read and wrote are unchanged (by content).  One run per directory at a time."""
    from convert.pipeline.run import run_recipe

    summary = run_recipe(recipe, run_dir, start, stop, dry_run, release, force_cpu, source, echo=click.echo)
    if not dry_run:
        click.echo(f"outputs: {summary['run_dir']} (checkpoint {summary['model_dir']})")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path, exists=True))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--data", required=True, help="Text file, folder of .txt/.jsonl files, JSONL with a 'text' field, or "
              "'pydoc:' (Python's own docs, for smoke runs).")
@click.option("--seq-len", type=int, required=True, help="Tokens per packed block (the target length).")
@click.option("--steps", type=int, required=True, help="Optimizer steps.")
@click.option("--global-batch", type=int, default=64, show_default=True, help="Sequences per optimizer step.")
@click.option("--micro-batch", type=int, default=1, show_default=True, help="Sequences per device per forward.")
@click.option("--lr", type=float, default=2e-5, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--save-steps", type=int, default=100, show_default=True, help="Checkpoint every N steps (resumable).")
@click.option("--eval-fraction", type=float, default=0.01, show_default=True, help="Share of blocks held out.")
@click.option("--force-cpu", is_flag=True, help="Train on the CPU (smoke runs only).")
@click.option("--pure-bf16", is_flag=True, help="bf16 weights and AdamW states (fits a 7B model on one 80 GB GPU).")
@click.option("--loss-chunk", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Positions per output-head chunk of the loss, so the full-vocabulary logits never exist at once "
              "(one process); 0: transformers' own loss.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--write-launch-config", type=click.Path(path_type=Path),
              help="Write an `accelerate launch` FSDP config for --num-gpus and stop.")
@click.option("--num-gpus", type=int, default=1, show_default=True)
def train(checkpoint, out, data, seq_len, steps, global_batch, micro_batch, lr, weight_decay, warmup_steps,
          save_steps, eval_fraction, force_cpu, pure_bf16, loss_chunk, force, write_launch_config, num_gpus):
    """Continued training of a baked CHECKPOINT at the target length (paper defaults: AdamW lr 2e-5, no warmup,
    no weight decay, global batch 64).  Multi-GPU: `accelerate launch --config_file CFG -m convert.cli train ...`."""
    from convert.stages.train import TrainArgs, accelerate_config
    from convert.stages.train import train as run_train

    if write_launch_config:
        import yaml

        from convert.arch import lookup_arch, read_config

        cfg = read_config(checkpoint)
        cls = lookup_arch(cfg.get("model_type"), cfg.get("architectures")).decoder_layer
        write_launch_config.write_text(yaml.safe_dump(accelerate_config(num_gpus, layer_cls=cls), sort_keys=False))
        click.echo(f"accelerate config: {write_launch_config}")
        return
    s = run_train(checkpoint, out, TrainArgs(data, seq_len, steps, global_batch, micro_batch, lr, weight_decay,
                                             warmup_steps, save_steps=save_steps, eval_fraction=eval_fraction,
                                             pure_bf16=pure_bf16, loss_chunk=loss_chunk),
                  force_cpu=force_cpu, force=force)
    click.echo(f"trained {s['steps']} steps: held-out loss {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}; "
               f"output {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
