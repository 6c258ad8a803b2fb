"""Validation's speed: one perplexity window and one passkey prompt through transformers, our llama.cpp path and
llama.cpp's own tools, on SmolLM2-135M extended to 32k (or any GGUF: ours and llama.cpp's), in one run.

    python bench/validate_speed.py                                  # 16384 and 32768 (about an hour on 2 cores)
    python bench/validate_speed.py --lengths 4096 --tasks ppl       # a quick agreement check (minutes)
    python bench/validate_speed.py --model gemma3 --lengths 49152 --tasks ppl   # Gemma 3 270M (262k vocabulary)

Model (made once by ``validate_memory.prepare``, cached under bench/.data/validate-memory/): SmolLM2-135M extended
to ``--target`` with the default method, as a HF directory and a q8_0 GGUF.  ``--gguf PATH`` measures that file
instead (ours and the peers only: there is no HF checkpoint), ``--model gemma3`` the Gemma 3 270M Q4_K_M GGUF that
``make setup-gemma3`` assembles (.venv/models/gemma-3-270m-Q4_K_M.gguf); their results go to
validate-speed-<file stem>-<length>.md.  Text: validate's perplexity corpus (Python's docs, ~113k SmolLM2 tokens),
written to one file that every path reads, repeated where the model's tokenizer makes fewer than the 2 x length
tokens llama-perplexity needs (the scored window, inside the first copy, is unchanged).  Each (task, length, path)
runs in a fresh process (``_measure.measure``: wall time and peak RSS; CPU time is user + system of all its
threads, the better measure of cost on a shared machine).

- ``ppl``: one window of ``length`` tokens, the corpus as llama.cpp tokenises it with BOS first, the same tokens for
  every path.  ``llama-perplexity`` (ggml-org/llama.cpp ``tools/perplexity/perplexity.cpp``, ``perplexity``)
  scores only the second half of each ``n_ctx`` chunk (``first = n_ctx/2``: the tokens at positions
  ``n_ctx/2 + 1 .. n_ctx - 1``, each from the logits of the position before), so ours score exactly those tokens:
  ``hf`` with ``ChunkedHFLM``'s scorer (``convert.evaluate.lmeval_hf.chunked_token_logprobs``), ``ours`` with
  ``GGUFLM``'s (``GGUFModel.score`` over ``convert.runtimes.llamacpp.Decoder``), ``peer`` is ``llama-perplexity
  -c LENGTH --chunks 1`` on the corpus file.  Its mean log-probability is read from ``--ppl-output-type 1``
  (six decimals), so the perplexities compare to ~1e-6.
- ``passkey``: one prompt of validate's passkey task (the key at depth 0.5, ``length`` tokens) through lm-eval's
  ``generate_until`` of ``ChunkedHFLM`` (transformers' ``generate``) and of ``GGUFLM``; ``peer`` is llama-cpp-
  python's own ``Llama.create_completion`` (greedy), what a user of the binding runs.

Settings are the same for llama.cpp in all paths: threads (``--threads``; transformers gets the same number),
``n_ubatch`` (default: what validate runs the file with, 512 lowered for a large vocabulary so a ubatch's logits
stay within 256 MiB: 256 for Gemma 3, ``convert.runtimes.llamacpp.logit_rows``), KV cache type, flash attention,
context = length.  ``n_batch`` differs on purpose: ours sends a prompt
in one ``llama_decode`` call (n_batch = the context); llama-perplexity keeps its default 2048 (a larger one makes it
keep the logits of every scored row of a chunk at once), and so does the ``Llama`` peer; n_batch changes the number
of calls, not the ubatches computed.

``llama-perplexity`` keeps the logits of every scored row of its chunk (``logits.insert`` of each batch's
outputs): (length/2) x n_vocab x 4 bytes, 3.2 GB for SmolLM2 at 32k but 25.8 GB for Gemma 3 at 48k; where that and
its batch's output buffer do not fit the memory available, the peer is not run and the report says why.

``llama-perplexity`` is built once from the llama.cpp that the installed llama-cpp-python vendors (its sdist's
``vendor/llama.cpp``, fetched with ``pip download``), cached under bench/.data/llama-perplexity/<version>/.
Results: bench/results/validate-speed-<length>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import DATA, measure  # noqa: E402
from gguf_vs_llamacpp import llama_cpp_sdist_files  # noqa: E402
from validate_memory import prepare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# GGUFs measured by name (--model): the Gemma 3 270M Q4_K_M file `make setup-gemma3` assembles
MODELS = {"gemma3": ROOT / ".venv" / "models" / "gemma-3-270m-Q4_K_M.gguf"}
PPL_TOL = 1e-4  # ours vs llama-perplexity: same file, tokens, settings and ubatches; relative perplexity
PASSKEY_DEPTH = 0.5
TARGET_VS_HF, TARGET_VS_PEER = 1.0, 1.2  # ours / transformers, ours / the peer (score seconds)
GEN_KWARGS = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False, "temperature": 0.0}  # dprope_passkey.yaml
PATH_NAMES = {"hf": "transformers (ChunkedHFLM)", "ours": "ours: llama.cpp (GGUFLM)",
              "peer-ppl": "llama.cpp llama-perplexity", "peer-passkey": "llama-cpp-python Llama.create_completion"}


# ------------------------------------------------------------------------------------------- the peer, built once
def llama_cpp_python_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama_cpp_python")


def llama_perplexity(version: str | None = None, jobs: int | None = None) -> Path:
    """``llama-perplexity`` built from the sdist of llama-cpp-python ``version`` (default: the installed one), whose
    ``vendor/llama.cpp`` is the llama.cpp the binding was compiled from; cached under
    bench/.data/llama-perplexity/<version>/build/bin/ (the sources are unpacked in a temporary folder and dropped:
    Python files of theirs under bench/ would read as part of the package)."""
    version = version or llama_cpp_python_version()
    root = DATA / "llama-perplexity" / version
    exe = root / "build" / "bin" / "llama-perplexity"
    if exe.is_file():
        return exe
    root.mkdir(parents=True, exist_ok=True)
    build, log = root / "build", root / "build.log"
    with tempfile.TemporaryDirectory(prefix="llama-cpp-python-sdist-") as tmp:
        print(f"peer: downloading the llama-cpp-python {version} sdist", flush=True)
        vendor = llama_cpp_sdist_files(Path(tmp), ("vendor/llama.cpp/",), version) / "vendor" / "llama.cpp"
        print(f"peer: building llama-perplexity from its vendor/llama.cpp (once; ~8 min on 2 cores; log {log})",
              flush=True)
        with open(log, "w") as f:
            subprocess.run(["cmake", "-S", str(vendor), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                            "-DLLAMA_CURL=OFF"], check=True, stdout=f, stderr=subprocess.STDOUT)
            p = subprocess.Popen(["cmake", "--build", str(build), "--target", "llama-perplexity", "-j",
                                  str(jobs or os.cpu_count() or 1)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            shown = -10
            for line in p.stdout:
                f.write(line)
                m = re.match(r"\[\s*(\d+)%\]", line)
                if m and int(m.group(1)) >= shown + 10:
                    shown = int(m.group(1))
                    print(f"peer: build {shown}%", flush=True)
            if p.wait() != 0 or not exe.is_file():
                raise SystemExit(f"building llama-perplexity failed; see {log}")
    return exe


# llama.cpp's tools log through a leaked singleton whose worker thread prints the queued lines; lines it has not
# printed when the program exits are lost (ggml-org/llama.cpp common/log.cpp, common_log_main, and its issue 22142).
# On a busy CPU that happens to llama-perplexity's last lines, the perplexity among them.  A library preloaded into
# it pauses half a second at exit, which lets the worker print them; it changes nothing else.
_EXIT_PAUSE_C = "#include <unistd.h>\n__attribute__((destructor)) static void pause_at_exit(void) { usleep(500000); }\n"


def peer_env(exe: Path) -> dict:
    """The environment llama-perplexity runs in: its own shared libraries (build/bin) and the exit pause."""
    shim = exe.parent / "exit-pause.so"
    if not shim.is_file():
        src = shim.with_suffix(".c")
        src.write_text(_EXIT_PAUSE_C)
        subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", "-o", str(shim), str(src)],
                       check=True)
    return {**os.environ, "LD_LIBRARY_PATH": str(exe.parent), "LD_PRELOAD": str(shim)}


def peer_command(exe: Path, model: Path, text_file: Path, length: int, s: dict) -> list[str]:
    """llama-perplexity on one ``length``-token chunk with the shared settings ``s``."""
    return [str(exe), "-m", str(model), "-f", str(text_file), "-c", str(length), "--chunks", "1",
            "-b", str(s["peer_batch"]), "-ub", str(s["n_ubatch"]), "-t", str(s["threads"]), "-tb", str(s["threads"]),
            "-fa", "on" if s["flash_attn"] else "off", "-ctk", s["kv_cache"], "-ctv", s["kv_cache"],
            "--ppl-output-type", "1", *(["--no-repack"] if s.get("no_repack") else []), "--swa-full"]


def peer_memory_bytes(length: int, n_vocab: int, peer_batch: int) -> int:
    """What llama-perplexity holds in logits for one ``length`` chunk: every scored row (positions length/2 ..
    length - 1: its ``logits`` vector, ggml-org/llama.cpp ``tools/perplexity/perplexity.cpp``) plus llama.cpp's
    output buffer for one batch's rows, float32."""
    return (length - length // 2 + min(peer_batch, length)) * int(n_vocab) * 4


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_peer(output: str) -> dict:
    """Mean log-likelihood and perplexity from llama-perplexity's ``--ppl-output-type 1`` line
    (``<start>  <ppl>  <mean nll>  <its error>``), and its own seconds per pass."""
    rows = re.findall(r"^\s*\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.naif-]+)\s*$", output, flags=re.M)
    if not rows:
        raise RuntimeError(f"no perplexity line in llama-perplexity's output:\n{output[-2000:]}")
    nll = float(rows[-1][1])
    per_pass = re.search(r"([\d.]+) seconds per pass", output)
    return {"mean_nll": nll, "perplexity": float(rows[-1][0]),
            "compute_s": float(per_pass.group(1)) if per_pass else None}


# ------------------------------------------------------------------------------------------- what each child runs
def scored_tokens(ids: list[int], length: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of llama-perplexity's first chunk: ``ids`` (BOS first) cut to ``length``; the targets are
    the tokens at positions length/2 + 1 .. length - 1, predicted from positions length/2 .. length - 2."""
    if len(ids) < 2 * length:
        raise SystemExit(f"the corpus has {len(ids)} tokens; llama-perplexity needs 2 x {length}")
    window = ids[:length]
    return window[:-1], window[length // 2 + 1 :]


def corpus_ids(llm, text_file: Path) -> list[int]:
    """The text file as llama-perplexity tokenises it (common_tokenize(..., add_special=true, parse_special=false))."""
    return llm.tokenize(Path(text_file).read_text(encoding="utf-8").encode("utf-8"), add_bos=True, special=False)


def corpus_file(gguf: Path, lengths: list[int], dest: Path) -> Path:
    """validate's corpus (Python's docs) written to ``dest``, repeated until the GGUF's tokenizer makes at least the
    2 x length tokens llama-perplexity asks for; a window (the first ``length`` tokens) lies in the first copy."""
    from convert.evaluate.tasks.ppl import corpus_text
    from convert.runtimes.llamacpp import open_llama

    text = one = corpus_text(None)
    longest = max(lengths, default=0)
    vocab = open_llama(gguf, 64, vocab_only=True)
    try:
        count = lambda t: len(vocab.tokenize(t.encode("utf-8"), add_bos=True, special=False))  # noqa: E731
        if count(one) < longest:
            raise SystemExit(f"validate's corpus is {count(one)} tokens of {Path(gguf).name}: shorter than one "
                             f"{longest}-token window")
        while count(text) < 2 * longest:
            text += "\n\n" + one
    finally:
        vocab.close()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest


def gguf_options(s: dict):
    """Our path's options: the bench's ``n_ubatch`` as given (main sets it by validate's rule unless told), so the
    peers run the same ubatches."""
    from convert.runtimes.llamacpp import LlamaCppOptions

    return LlamaCppOptions(kv_cache=s["kv_cache"], flash_attn=s["flash_attn"], n_ubatch=s["n_ubatch"],
                           n_threads=s["threads"], logit_bytes=None)


def passkey_prompt(tokenizer_dir: Path, length: int) -> str:
    from convert.evaluate.tasks.common import tokenizer
    from convert.evaluate.tasks.passkey import build_prompt

    return build_prompt(tokenizer(str(tokenizer_dir)), length, PASSKEY_DEPTH, "58213")


def _request(prompt: str):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", {}, (prompt, dict(GEN_KWARGS)), 0)


def child(kind: str, task: str, models: dict, length: int, s: dict) -> dict:
    """One (path, task, length) in this process: its numbers, with ``score_s`` the time of the scoring or
    generation call alone."""
    import numpy as np

    out: dict = {}
    if kind == "hf":
        import torch

        from convert.evaluate.engine import load_hf_eval
        from convert.evaluate.lmeval_hf import chunked_lm_class, chunked_token_logprobs
        from convert.runtimes.llamacpp import open_llama

        torch.set_num_threads(s["threads"])
        model, tok = load_hf_eval(models["hf"])
        lm = chunked_lm_class()(pretrained=model, tokenizer=tok, max_length=length, batch_size=1, device="cpu",
                                max_batch_size=1)
        if task == "ppl":
            vocab = open_llama(models["gguf"], 64, vocab_only=True)
            inputs, targets = scored_tokens(corpus_ids(vocab, models["text"]), length)
            vocab.close()
            t = time.perf_counter()
            lp = chunked_token_logprobs(lm.model, torch.tensor([inputs]), targets, lm.logit_chunk)
            out["score_s"] = time.perf_counter() - t
        else:
            prompt = passkey_prompt(models["tokenizer"], length)
            t = time.perf_counter()
            out["answer"] = lm.generate_until([_request(prompt)], True)[0]
            out["score_s"] = time.perf_counter() - t
            out["prompt_tokens"] = len(tok(prompt).input_ids)
    elif kind == "ours":
        from convert.evaluate.lmeval_gguf import GGUFLM, GGUFModel
        from convert.runtimes.llamacpp import native_logs

        with native_logs():
            lm = GGUFLM(GGUFModel(models["gguf"], length, gguf_options(s)), max_length=length)
        if task == "ppl":
            inputs, targets = scored_tokens(corpus_ids(lm.model.llm, models["text"]), length)
            t = time.perf_counter()
            lp, _ = lm.model.score(inputs, targets)  # what GGUFLM.loglikelihood_rolling scores a window with
            out["score_s"] = time.perf_counter() - t
        else:
            prompt = passkey_prompt(models["tokenizer"], length)
            t = time.perf_counter()
            out["answer"] = lm.generate_until([_request(prompt)], True)[0]
            out["score_s"] = time.perf_counter() - t
            out["prompt_tokens"] = len(lm.tok_encode(prompt))
        d = lm.model.decoder
        # the rows of logits asked for (the scored tokens), the most in one call, and the vocabulary they span
        out.update(llama_decode_calls=d.n_calls, rows_out=d.n_outputs, peak_rows=d.peak_outputs, n_vocab=d.n_vocab,
                   n_ubatch=d.n_ubatch)
        lm.model.close()
    elif kind == "peer-passkey":
        from convert.runtimes.llamacpp import import_llama_cpp

        llama_cpp = import_llama_cpp()

        from convert.runtimes.llamacpp import KV_TYPES, native_logs

        with native_logs():
            llm = llama_cpp.Llama(str(models["gguf"]), n_ctx=length, n_batch=s["peer_batch"], n_ubatch=s["n_ubatch"],
                                  n_threads=s["threads"], n_threads_batch=s["threads"], flash_attn=s["flash_attn"],
                                  type_k=KV_TYPES[s["kv_cache"]], type_v=KV_TYPES[s["kv_cache"]], verbose=False)
        prompt = passkey_prompt(models["tokenizer"], length)
        t = time.perf_counter()
        r = llm.create_completion(prompt, max_tokens=GEN_KWARGS["max_gen_toks"], temperature=0.0,
                                  stop=GEN_KWARGS["until"])
        out["score_s"] = time.perf_counter() - t
        out["answer"] = r["choices"][0]["text"]
        out["prompt_tokens"] = r["usage"]["prompt_tokens"]
        llm.close()
    elif kind == "peer-ppl":
        exe = Path(models["peer"])
        p = subprocess.run(peer_command(exe, models["gguf"], Path(models["text"]), length, s), capture_output=True,
                           text=True, env=peer_env(exe))
        if p.returncode:
            raise RuntimeError(f"llama-perplexity failed:\n{(p.stdout + p.stderr)[-3000:]}")
        peer = parse_peer(p.stdout + p.stderr)
        out.update(perplexity=math.exp(peer["mean_nll"]), mean_nll=peer["mean_nll"], score_s=peer["compute_s"],
                   tokens=length - length // 2 - 1)  # its mean to six decimals, its perplexity printed to four
        use = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {**out, "cpu_s": use.ru_utime + use.ru_stime}
    if task == "ppl":
        lp = np.asarray(lp, dtype=np.float64)
        out.update(mean_nll=float(-lp.mean()), perplexity=float(np.exp(-lp.mean())), tokens=len(lp))
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {**out, "cpu_s": use.ru_utime + use.ru_stime}


# ------------------------------------------------------------------------------------------- the report
def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else ""


def report(length: int, target: int, rows: list[dict], s: dict, command: str, model: str | None = None,
           notes: list[str] = ()) -> str:
    """The markdown of one length: per task a table of the paths, with ours / each path (score, wall, CPU);
    ``model`` names the GGUF measured (default: SmolLM2 extended to ``target``), ``notes`` say what was not run."""
    today = datetime.date.today().isoformat()
    model = model or f"SmolLM2-135M extended to {target}, q8_0 GGUF"
    lines = [f"# `{command}`, {today}, this {os.cpu_count()}-core CPU; other jobs shared the CPU at times, so wall "
             "times are noisy and CPU s is the cost", "",
             f"{model}; llama.cpp: {s['threads']} threads, n_ubatch "
             f"{s['n_ubatch']}, KV cache {s['kv_cache']}, flash attention {'on' if s['flash_attn'] else 'off'}, "
             f"context {length}; n_batch: ours the context (one llama_decode call per prompt), the peers "
             f"{s['peer_batch']}; transformers (f32 checkpoint) {s['threads']} threads.  Both llama.cpp paths keep "
             "every position in a sliding-window model's cache (ours: swa_full; llama-perplexity: `--swa-full`; its "
             "default n_swa + n_ubatch cells change Gemma 3's logits, docs/validation.md)"
             + ("; both load without the extra (AMX) weight buffers this CPU's llama.cpp crashes with (ours: "
                "use_extra_bufts off; llama-perplexity: `--no-repack`)" if s.get("no_repack") else "")
             + ".  score s: the scoring or generation call alone (llama-perplexity: its own seconds per pass); wall, "
             "CPU and peak RSS: the whole process (load, tokenise, score).", ""]
    lines += [*notes, ""] if notes else []
    ratios = "ours / this: score, wall, CPU |"
    head = {"ppl": "| path | score s | wall s | CPU s | peak RSS MB | perplexity | vs peer | " + ratios,
            "passkey": "| path | prompt tokens | score s | wall s | CPU s | peak RSS MB | answer | " + ratios}
    for task in ("ppl", "passkey"):
        got = [r for r in rows if r["task"] == task]
        if not got:
            continue
        ours = next((r for r in got if r["path"] == "ours"), None)
        peer = next((r for r in got if r["path"].startswith("peer")), None)
        if task == "ppl":
            lines.append(f"Perplexity of one {length}-token window: the {got[0]['tokens']} tokens llama-perplexity "
                         "scores (the second half)")
        else:
            lines.append(f"One passkey prompt at {length} (key at depth {PASSKEY_DEPTH}, greedy, at most "
                         f"{GEN_KWARGS['max_gen_toks']} new tokens)")
        lines += ["", head[task], "|---" * 8 + "|"]
        for r in got:
            vs = "" if ours is None or r is ours else ", ".join(ratio(ours[k], r[k])
                                                               for k in ("score_s", "wall_s", "cpu_s"))
            cost = f"{r['score_s']:.0f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mb']:.0f}"
            if task == "ppl":
                rel = "" if peer is None or r is peer else f"{r['perplexity'] / peer['perplexity'] - 1:+.1e}"
                lines.append(f"| {PATH_NAMES[r['path']]} | {cost} | {r['perplexity']:.5f} | {rel} | {vs} |")
            else:
                lines.append(f"| {PATH_NAMES[r['path']]} | {r.get('prompt_tokens', '')} | {cost} | "
                             f"{json.dumps(r['answer'])} | {vs} |")
        lines.append("")
        if task == "ppl" and ours and ours.get("rows_out") is not None:
            mib = ours["peak_rows"] * ours["n_vocab"] * 4 / 2**20
            lines += [f"ours asked llama.cpp for {ours['rows_out']} rows of logits (the {ours['tokens']} scored "
                      f"tokens), at most {ours['peak_rows']} per llama_decode call ({ours['peak_rows']} x "
                      f"{ours['n_vocab']} x 4 bytes = {mib:.0f} MiB), in {ours['llama_decode_calls']} calls.", ""]
        hf = next((r for r in got if r["path"] == "hf"), None)
        if ours and (hf or peer):
            lines += [f"targets ({task}, score s): " + "; ".join(
                f"ours / {name} {ours['score_s'] / r['score_s']:.2f}x (<= {lim}x: "
                f"{'met' if ours['score_s'] <= lim * r['score_s'] else 'MISSED'})"
                for name, r, lim in (("transformers", hf, TARGET_VS_HF), ("the peer", peer, TARGET_VS_PEER)) if r),
                ""]
        if task == "ppl" and ours and peer:
            d = abs(ours["perplexity"] / peer["perplexity"] - 1)
            hf_note = ("; transformers runs the f32 checkpoint, so it differs by the q8_0 rounding" if hf else "")
            lines += [f"ours vs llama-perplexity: relative difference {d:.1e} (tolerance {PPL_TOL:.0e}: "
                      f"{'agree' if d <= PPL_TOL else 'DISAGREE'}){hf_note}.", ""]
    return "\n".join(lines)


# llama.cpp settings tried for our path: (flash attention, KV cache type, n_ubatch); the first is the default
SWEEP = [(True, "f16", 512), (False, "f16", 512), (True, "f32", 512), (False, "f32", 512), (True, "f16", 256),
         (True, "f16", 1024), (True, "f16", 2048), (False, "f16", 2048)]


def sweep(length: int, target: int, s: dict, run_child, command: str) -> str:
    """Our path's perplexity window under each llama.cpp setting of SWEEP, between two transformers runs of the same
    window (load drifts on a shared machine; both are shown), as markdown."""
    rows = [("transformers (first)", run_child("hf", "ppl", length, s))]
    for fa, kv, ub in SWEEP:
        rows.append((f"ours: flash attention {'on' if fa else 'off'}, KV {kv}, n_ubatch {ub}",
                     run_child("ours", "ppl", length, {**s, "flash_attn": fa, "kv_cache": kv, "n_ubatch": ub})))
    rows.append(("transformers (last)", run_child("hf", "ppl", length, s)))
    hf = min(r["score_s"] for name, r in rows if name.startswith("transformers"))
    lines = [f"# `{command}`, {datetime.date.today().isoformat()}, this {os.cpu_count()}-core CPU", "",
             f"SmolLM2-135M extended to {target}, q8_0 GGUF, one {length}-token perplexity window (the tokens "
             f"llama-perplexity scores), {s['threads']} threads; each row a fresh process, in this order. "
             "\"vs transformers\": score s over the faster of the two transformers runs.", "",
             "| path and llama.cpp setting | score s | CPU s | peak RSS MB | perplexity | vs transformers |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['score_s']:.1f} | {r['cpu_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['perplexity']:.5f} | {r['score_s'] / hf:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="16384,32768", help="window / prompt lengths, comma-separated")
    ap.add_argument("--target", type=int, default=32768, help="the extended SmolLM2's window")
    ap.add_argument("--model", choices=sorted(MODELS), help="measure this GGUF instead of the extended SmolLM2 "
                    "(gemma3: .venv/models/gemma-3-270m-Q4_K_M.gguf, from `make setup-gemma3`); ours and the peers")
    ap.add_argument("--gguf", type=Path, help="measure this GGUF file instead of the extended SmolLM2; ours and the "
                    "peers")
    ap.add_argument("--tasks", default="ppl,passkey", help="ppl, passkey")
    ap.add_argument("--paths", help="hf, ours, peer (llama-perplexity for ppl, llama-cpp-python's Llama for "
                    "passkey); default hf,ours,peer, with --model/--gguf ours,peer")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-ubatch", type=int, help="llama.cpp's physical batch, for every path (default: validate's, "
                    "512 or fewer for a large vocabulary: 256 for Gemma 3)")
    ap.add_argument("--peer-batch", type=int, default=2048, help="the peers' n_batch (llama.cpp's default 2048)")
    ap.add_argument("--kv-cache", default="f16", choices=["f16", "f32"])
    ap.add_argument("--flash-attn", default="on", choices=["on", "off"])
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for validate-speed-<length>.md")
    ap.add_argument("--sweep", action="store_true", help="instead: our path's perplexity window under each llama.cpp "
                    "setting of SWEEP, between two transformers runs (validate-speed-sweep-<length>.md; SmolLM2)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "TASK", "LENGTH", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--models", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from convert.runtimes.llamacpp import extra_buffers_off

    # where llama-cpp-python here loads models without repacked (AMX) weight buffers, llama-perplexity does too;
    # asked where llama.cpp runs (the transformers child never loads it)
    no_repack = (args.child is None or args.child[0] != "hf") and extra_buffers_off()
    s = {"threads": args.threads, "n_ubatch": args.n_ubatch, "peer_batch": args.peer_batch,
         "kv_cache": args.kv_cache, "flash_attn": args.flash_attn == "on", "no_repack": no_repack}
    if args.child:
        kind, task, length, result = args.child
        Path(result).write_text(json.dumps(child(kind, task, json.loads(args.models), int(length), s)))
        return 0
    from convert.runtimes.llamacpp import LlamaCppOptions, gguf_vocab_size, logit_rows

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    gguf = args.gguf or (MODELS[args.model] if args.model else None)
    paths = [p.strip() for p in (args.paths or ("ours,peer" if gguf else "hf,ours,peer")).split(",") if p.strip()]
    if gguf is not None:
        if not gguf.is_file():
            raise SystemExit(f"{gguf} does not exist" + (" (make setup-gemma3 assembles it)" if args.model else ""))
        if "hf" in paths or args.sweep:
            raise SystemExit("--paths hf and --sweep need the HF checkpoint only the extended SmolLM2 has; "
                             "with --model/--gguf use --paths ours,peer")
        models = {"gguf": str(gguf)}
        tag, label = f"{gguf.stem}-", f"`{gguf.name}`"
    else:
        made = prepare(args.target, ["q8_0"])
        models = {"hf": str(made["hf"]), "gguf": str(made["q8_0"]), "tokenizer": str(made["hf"])}
        tag, label = "", None
    n_vocab = gguf_vocab_size(Path(models["gguf"]))
    if s["n_ubatch"] is None:  # what validate runs the file with (LlamaCppOptions.for_vocab), for every path
        s["n_ubatch"] = logit_rows(n_vocab, LlamaCppOptions().n_ubatch)
        print(f"n_ubatch {s['n_ubatch']} (validate's for a {n_vocab}-token vocabulary)", flush=True)
    if "passkey" in tasks and "tokenizer" not in models:
        from convert.formats.checkpoint import gguf_tokenizer_dir

        models["tokenizer"] = str(gguf_tokenizer_dir(Path(models["gguf"])))
    if "ppl" in tasks:
        gg = Path(models["gguf"])
        models["text"] = str(corpus_file(gg, lengths, DATA / "validate-speed" / f"corpus-{gg.stem}.txt"))
    skip_peer = {}  # length -> why llama-perplexity is not run there: its logits do not fit the memory available
    if "peer" in paths and "ppl" in tasks:
        avail = available_memory()
        for length in lengths:
            need = peer_memory_bytes(length, n_vocab, s["peer_batch"])
            if avail is not None and need > avail:
                skip_peer[length] = (f"llama-perplexity not run at {length}: it keeps the logits of every scored row "
                                     f"of its chunk ({length - length // 2} rows) and of one batch "
                                     f"({min(s['peer_batch'], length)} rows), x {n_vocab} x 4 bytes = "
                                     f"{need / 1e9:.1f} GB, more than the {avail / 1e9:.1f} GB available here.")
                print(skip_peer[length], flush=True)
        if len(skip_peer) < len(lengths):  # built only where it will run
            models["peer"] = str(llama_perplexity())
            peer_env(Path(models["peer"]))  # its exit pause, built once
    command = "python bench/validate_speed.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run_child(kind: str, task: str, length: int, s: dict) -> dict:
        print(f"{task} @{length}: {PATH_NAMES[kind]} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "r.json"
            m = measure([sys.executable, __file__, "--models", json.dumps(models), "--threads", str(s["threads"]),
                         "--n-ubatch", str(s["n_ubatch"]), "--peer-batch", str(s["peer_batch"]), "--kv-cache",
                         s["kv_cache"], "--flash-attn", "on" if s["flash_attn"] else "off",
                         "--child", kind, task, str(length), str(res)], env=env)
            row = {"task": task, "path": kind, **m, **json.loads(res.read_text())}
        shown = f"ppl {row['perplexity']:.5f}" if task == "ppl" else f"answer {row['answer']!r}"
        print(f"  {shown}, score {row['score_s']:.1f} s, wall {row['wall_s']:.1f} s, CPU {row['cpu_s']:.1f} s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        return row

    if args.sweep:
        for length in lengths:
            text = sweep(length, args.target, s, run_child, command)
            print("\n" + text)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"validate-speed-sweep-{length}.md").write_text(text)
        return 0
    failed = False
    for length in lengths:
        rows, notes = [], [skip_peer[length]] if length in skip_peer else []
        for task in tasks:
            for path in paths:
                if path == "peer" and task == "ppl" and length in skip_peer:
                    continue
                rows.append(run_child(f"peer-{task}" if path == "peer" else path, task, length, s))
        text = report(length, args.target, rows, s, command, label, notes)
        print("\n" + text)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"validate-speed-{tag}{length}.md").write_text(text)
        ours = next((r for r in rows if r["task"] == "ppl" and r["path"] == "ours"), None)
        peer = next((r for r in rows if r["task"] == "ppl" and r["path"] == "peer-ppl"), None)
        if ours and peer and abs(ours["perplexity"] / peer["perplexity"] - 1) > PPL_TOL:
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
