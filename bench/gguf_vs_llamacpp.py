"""GGUF export: `dprope export-gguf` vs llama.cpp's own `convert_hf_to_gguf.py`, same checkpoint, same run.

    python bench/gguf_vs_llamacpp.py [--repeats 1]

The checkpoint is the Llama-3.2-1B-shaped random bf16 checkpoint of bench/extend.py (2.6 GB, SmolLM2 tokenizer).
The peer is the converter vendored in the llama-cpp-python source release that is installed here (fetched from
PyPI once, only its converter files are unpacked).  Both write f16 and q8_0 from the same input with a warm page
cache; each command runs in a fresh process and its wall time and peak RSS are measured.  The peer runs on the
base checkpoint (its Llama path has no longrope factors to carry), ours on the baked one (factors included).
Targets: no slower than the peer, peak RSS under the peer's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import DATA, big_llama, dir_size, measure, median_of  # noqa: E402


def llama_cpp_sdist_files(dest: Path, keep: tuple[str, ...], version: str | None = None) -> Path:
    """Unpack into ``dest`` the files of the llama-cpp-python ``version`` sdist (default: the installed one) whose path
    below the sdist's top folder starts with one of ``keep`` (e.g. ``vendor/llama.cpp/convert_hf_to_gguf.py``), and
    return ``dest``.  The sdist is fetched from PyPI into a temporary folder beside them and dropped; each file is
    moved into place whole, so an interrupted fetch leaves no partial file."""
    version = version or metadata.version("llama_cpp_python")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=dest) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        out = Path(tmp) / "files"
        with tarfile.open(next(Path(tmp).glob(f"llama_cpp_python-{version}.tar.gz"))) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[-1]
                if rel.startswith(keep) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(out, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        for f in sorted(x for x in out.rglob("*") if x.is_file()):
            target = dest / f.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
    return dest


def peer_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/, unpacked once under
    bench/.data/llama-cpp-python-<version>/vendor/llama.cpp/."""
    version = metadata.version("llama_cpp_python")
    root = DATA / f"llama-cpp-python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.exists():
        llama_cpp_sdist_files(root, ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                                     "vendor/llama.cpp/gguf-py/"), version)
    return script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    base = big_llama()
    baked = DATA / "llama-1b-baked"
    dprope = str(Path(sys.executable).with_name("dprope"))
    if not (baked / "config.json").exists():
        subprocess.run([dprope, "extend", str(base), str(baked), "--target-length", "32768", "--force"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script = peer_converter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    print(f"checkpoint: {base} ({dir_size(base) / 1e9:.2f} GB bf16); peer: {script}")
    print(f"{'type':>5} {'tool':>22} {'wall s':>8} {'peak RSS MB':>12} {'out GB':>7}")
    ok = True
    for outtype in ("f16", "q8_0"):
        ours_out, peer_out = DATA / f"ours-{outtype}.gguf", DATA / f"peer-{outtype}.gguf"
        ours, peer = [], []
        for _ in range(args.repeats):
            for f in (ours_out, peer_out):
                f.unlink(missing_ok=True)
            os.sync()
            peer.append(measure([sys.executable, str(script), str(base), "--outfile", str(peer_out), "--outtype",
                                 outtype], env=env))
            os.sync()
            ours.append(measure([dprope, "export-gguf", str(baked), str(ours_out), "--outtype", outtype], env=env))
        o, p = median_of(ours), median_of(peer)
        print(f"{outtype:>5} {'convert_hf_to_gguf.py':>22} {p['wall_s']:>8.1f} {p['peak_rss_mb']:>12.0f} "
              f"{peer_out.stat().st_size / 1e9:>7.2f}")
        print(f"{outtype:>5} {'dprope export-gguf':>22} {o['wall_s']:>8.1f} {o['peak_rss_mb']:>12.0f} "
              f"{ours_out.stat().st_size / 1e9:>7.2f}")
        t_ratio, m_ratio = o["wall_s"] / p["wall_s"], o["peak_rss_mb"] / p["peak_rss_mb"]
        met = t_ratio <= 1.0 and m_ratio < 1.0
        print(f"{outtype:>5} ours/peer: time {t_ratio:.2f}x, peak RSS {m_ratio:.2f}x "
              f"(targets <= 1x and < 1x: {'met' if met else 'MISSED'})")
        ok = ok and met
        for f in (ours_out, peer_out):
            f.unlink(missing_ok=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
